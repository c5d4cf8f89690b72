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
from ..stack import check_reference, stack_from_affine
from ..transforms import apply, box_corners, describe_motion
from .options import RegistrationOptions
from .report import stack_report
from .rigid import register_each, register_pair


def reconstruction_as_stack(volume, grid, modality="OT"):
    """A reconstruction volume on ``grid`` wrapped as a regular Stack (its slices are the grid's k planes)."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != tuple(grid.shape):
        raise InputError(f"reconstruction shape {volume.shape} does not match its grid {tuple(grid.shape)}")
    return stack_from_affine(
        volume, grid.index_to_lps_affine, thickness_mm=float(min(grid.spacing_mm)), modality=modality,
        description="reconstruction",
    )


def head_box_corners(grid, coverage=None):
    """The 8 LPS corners (mm) of the head's bounding box: the voxel-centre box of ``coverage > 0`` (the voxels
    some stack covers), or of the whole grid without ``coverage``; shape (8, 3)."""
    lo, hi = np.zeros(3), np.asarray(grid.shape, dtype=float) - 1.0
    if coverage is not None:
        c = np.asarray(coverage) > 0
        if c.any():
            for axis in range(3):
                other = tuple(a for a in range(3) if a != axis)
                hit = np.nonzero(c.any(axis=other))[0]
                lo[axis], hi[axis] = hit[0], hit[-1]
    kji = box_corners(lo, hi)
    return np.asarray(grid.index_to_physical(kji[:, 0], kji[:, 1], kji[:, 2]), dtype=float)


def max_box_shift_mm(old_transform, new_transform, corners_mm):
    """Largest distance (mm) any of ``corners_mm`` (patient points of the stack under ``old_transform``) moves
    when the stack's transform becomes ``new_transform`` (for a rigid change, the largest over the box)."""
    change = np.asarray(new_transform, float) @ np.linalg.inv(np.asarray(old_transform, float))
    return float(np.max(np.linalg.norm(apply(change, corners_mm) - corners_mm, axis=1)))


def refine_registration(stacks, reconstruction_volume, grid, *, options=None, monitor=None, reference=0,
                        coverage=None):
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
        geometry, ``cycle_translation_mm``/``cycle_rotation_deg`` this cycle's change,
        ``cycle_max_shift_mm`` the largest displacement of a stack corner in this cycle,
        ``cycle_box_shift_mm`` that of a corner of the head's box (:func:`head_box_corners`) and ``moved``:
        False when the box shift is at most ``options.unmoved_tolerance_mm``; such a stack keeps its transform
        exactly (the caller skips re-solving the reconstruction when no stack moved).
    """
    options = options or RegistrationOptions()
    monitor = Monitor.wrap(monitor)
    stacks = list(stacks)
    if not options.enabled or len(stacks) < 2:
        return stacks, []
    check_reference(stacks, reference)
    volume = np.asarray(reconstruction_volume, dtype=np.float32)
    if coverage is not None:
        volume = np.where(np.asarray(coverage) > 0, volume, np.float32(np.nan))
    target = reconstruction_as_stack(volume, grid, stacks[reference].modality)
    box = head_box_corners(grid, coverage)

    def register_one(n, span):
        s = stacks[n]
        r_start = np.linalg.inv(s.transform)
        # No large-motion search: the stacks come registered, and a cycle corrects what is left of it.
        r_final, info = register_pair(target, np.zeros(3), s, r_start=r_start, r_init=r_start, options=options,
                                      monitor=monitor, span=span, search="off")
        new = np.linalg.inv(r_final)
        box_shift = max_box_shift_mm(s.transform, new, box)
        # A kept start comes back as inv(inv(T)), off by round-off (1e-15 mm): that is no motion, and neither
        # is anything below the tolerance; the stack keeps its transform bit for bit.
        moved = box_shift > options.unmoved_tolerance_mm
        result = s.with_transform(new) if moved else s
        report = stack_report(n, result, "current geometry", info, metric=options.metric)
        change = describe_motion(result.transform @ np.linalg.inv(s.transform), s.corners_mm().mean(axis=0))
        report["cycle_translation_mm"] = change["translation_mm"]
        report["cycle_rotation_deg"] = change["rotation_deg"]
        # How far any corner of the stack moved in this cycle: below a fraction of a voxel, re-solving the
        # reconstruction with the new transforms cannot change it.
        report["cycle_max_shift_mm"] = float(np.max(np.linalg.norm(result.corners_mm() - s.corners_mm(), axis=1)))
        report["cycle_box_shift_mm"] = box_shift
        report["moved"] = bool(moved)
        if not moved and report.get("warning") is None:
            report["note"] = (f"update moves the head's box by {box_shift:.2g} mm "
                              f"(<= {options.unmoved_tolerance_mm:g} mm): unmoved")
        return result, report

    return register_each(stacks, reference, monitor=monitor, register_one=register_one,
                         target_name="the reconstruction")
