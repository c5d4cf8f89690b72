"""Refinement cycles: re-register every stack against the current reconstruction.

Between super-resolution cycles each (non-reference) stack is registered to the reconstruction seen through
that stack's own forward model: the reconstruction is resampled onto a lattice aligned with the stack and
blurred by the stack's PSF (in-plane FWHM 1.2 x pixel, thickness through-plane), i.e. ``B_k W_k x``, and
compared with the stack's own pixels. This equals comparing ``y_k`` with the operator's ``A_k x`` except that
the comparison points form a regular lattice instead of the stack's pixel centres, which lets SimpleITK
interpolate continuously while the optimiser moves ``W_k`` (a forward projection per metric evaluation
would cost orders of magnitude more). The reference stack keeps its transform so the patient frame (and
the grid) stays put.
"""

import numpy as np

from ..errors import InputError
from ..progress import Monitor
from ..stack import stack_from_affine
from .options import RegistrationOptions
from .report import describe_motion
from .rigid import STAGE, _log_report, _stack_report, reference_report, register_pair


def reconstruction_as_stack(volume, grid, modality="OT"):
    """A reconstruction volume on ``grid`` wrapped as a regular Stack (its slices are the grid's k planes)."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != tuple(grid.shape):
        raise InputError(f"reconstruction shape {volume.shape} does not match its grid {tuple(grid.shape)}")
    return stack_from_affine(
        volume, grid.index_to_lps_affine, thickness_mm=float(min(grid.spacing_mm)), modality=modality,
        description="reconstruction",
    )


def refine_registration(stacks, reconstruction_volume, grid, options=None, monitor=None, reference=0, coverage=None):
    """Register every stack except ``reference`` to the current reconstruction, starting from its transform.

    Parameters
    ----------
    stacks : sequence of Stack
        With their current transforms (from :func:`register_stacks` or a previous cycle).
    reconstruction_volume : ndarray, shape grid.shape
    grid : Grid
    options : RegistrationOptions or None
        The guards (max translation/rotation, metric not worse) apply to the change made in this cycle; a
        rejected stack keeps the transform it came with.
    monitor : Monitor or None
        Stage "register".
    reference : int
        The stack that is not moved (0 in the pipeline, which puts the reference first).
    coverage : ndarray, shape grid.shape, optional
        Stacks covering each voxel (the average fusion's ``coverage``): voxels with 0 hold only the background
        value, and are left out of the comparison so the edge of the data is not taken for an edge of the body
        (matters with ``--extent union``).

    Returns
    -------
    stacks : list of Stack
    reports : list of dict
        As :func:`register_stacks`, with ``translation_mm``/``rotation_deg`` the total motion from the scanner
        geometry, ``cycle_translation_mm``/``cycle_rotation_deg`` this cycle's change and
        ``cycle_max_shift_mm`` the largest displacement of a stack corner in this cycle (a caller may skip
        re-solving the reconstruction when it is a small fraction of a voxel for every stack).
    """
    options = options or RegistrationOptions()
    monitor = Monitor.wrap(monitor)
    stacks = list(stacks)
    if not options.enabled or len(stacks) < 2:
        return stacks, []
    if not 0 <= reference < len(stacks):
        raise InputError(f"reference stack {reference} does not exist (there are {len(stacks)} stacks)")
    volume = np.asarray(reconstruction_volume, dtype=np.float32)
    if coverage is not None:
        volume = np.where(np.asarray(coverage) > 0, volume, np.float32(np.nan))
    target = reconstruction_as_stack(volume, grid, stacks[reference].modality)
    others = [n for n in range(len(stacks)) if n != reference]
    out, reports = list(stacks), []
    monitor.report(STAGE, 0.0)
    for done, n in enumerate(others):
        s = stacks[n]
        r_start = np.linalg.inv(s.transform)
        span = (done / len(others), (done + 1) / len(others))
        r_final, info = register_pair(target, np.zeros(3), s, r_start, r_start, options, monitor, span)
        out[n] = s.with_transform(np.linalg.inv(r_final))
        report = _stack_report(n, out[n], "current geometry", info, options)
        change = describe_motion(out[n].transform @ np.linalg.inv(s.transform), s.corners_mm().mean(axis=0))
        report["cycle_translation_mm"] = change["translation_mm"]
        report["cycle_rotation_deg"] = change["rotation_deg"]
        # How far any corner of the stack moved in this cycle: below a fraction of a voxel, re-solving the
        # reconstruction with the new transforms cannot change it.
        report["cycle_max_shift_mm"] = float(
            np.max(np.linalg.norm(out[n].corners_mm() - s.corners_mm(), axis=1))
        )
        reports.append(report)
        _log_report(report, "the reconstruction")
    reports = sorted(reports + [reference_report(reference, stacks[reference])], key=lambda r: r["index"])
    monitor.report(STAGE, 1.0)
    return out, reports

