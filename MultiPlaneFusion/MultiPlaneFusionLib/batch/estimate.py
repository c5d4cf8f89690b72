"""A case's peak memory estimated before anything is allocated. Pure Python (no Dask).

The reader has no header-only path, so DICOM series are laid out here from their headers alone (the
positions, orientation, matrix and spacing ``scan_folder`` reads with the pixel data left on disk): the
stacks' pixels are zero-stride arrays of the right shape, and ``pipeline.plan_grid`` and
``memory.estimate_bytes`` then give what ``run`` would estimate. Volume files are read whole (they are
one file each, small beside the reconstruction grid).
"""

import os
from dataclasses import replace

import numpy as np

from .. import memory
from ..errors import MultiPlaneFusionError
from ..pipeline import plan_grid
from ..reconstruction.budget import estimate_fusion_bytes
from ..stack import Stack


def _header_stack(files):
    """``(geometry-only Stack, input voxels)`` of one series' ``(path, header)`` list; None for a single
    slice (the reader skips those)."""
    ds0 = files[0][1]
    iop = np.asarray([float(v) for v in ds0.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    # Several echoes or acquisitions in one series repeat positions: the reader splits them into
    # stacks of the same geometry, so one of them gives the grid (all count as input voxels).
    positions = {}
    for _, ds in files:
        p = np.asarray([float(v) for v in ds.ImagePositionPatient])
        positions.setdefault(round(float(p @ normal), 3), p)
    if len(positions) < 2:
        return None
    origins = np.asarray([positions[k] for k in sorted(positions)])
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    dj, di = (float(v) for v in ds0.PixelSpacing)
    steps = np.diff(sorted(positions))
    thickness = float(ds0.get("SliceThickness", 0) or 0) or float(np.median(steps))
    pixels = np.broadcast_to(np.zeros((), np.float32), (len(origins), rows, cols))
    stack = Stack(pixels=pixels, slice_origins_mm=origins, row_direction=iop[:3], column_direction=iop[3:],
                  pixel_spacing_mm=(di, dj), thickness_mm=thickness, source=os.path.dirname(files[0][0]))
    return stack, len(files) * rows * cols


def case_stacks_from_headers(paths, groups=None):
    """``(geometry-only stacks, input voxels)`` of a case's paths (``groups``: the DICOM headers the
    discovery already read)."""
    from ..reading import read_volume_stack, scan_folder

    stacks, n_input = [], 0
    if groups is None:
        groups = []
        for p in paths:
            if os.path.isdir(p):
                groups.extend(scan_folder(p)[0])
            else:
                s = read_volume_stack(p)
                s = Stack(**{**s.__dict__, "pixels": np.broadcast_to(np.zeros((), np.float32), s.shape)})
                stacks.append(s)
                n_input += s.n_voxels
    for files in groups:
        made = _header_stack(files)
        if made is not None:
            stacks.append(made[0])
            n_input += made[1]
    return stacks, n_input


def estimate_case_bytes(paths, fuse_options, groups=None, baseline_bytes=None):
    """Estimated peak bytes of running one case (fusion, then the model on the fused grid), or None
    when the headers do not tell (the case's own run then reports why)."""
    try:
        stacks, n_input = case_stacks_from_headers(paths, groups)
        if not stacks:
            return None
        ref = min(max(int(fuse_options.reference), 0), len(stacks) - 1)
        stacks = [stacks[ref]] + [s for n, s in enumerate(stacks) if n != ref]
        grid = plan_grid(stacks, replace(fuse_options, reference=0))
    except (MultiPlaneFusionError, ValueError, AttributeError, TypeError, KeyError, IndexError):
        return None
    base = memory.current_rss_bytes() if baseline_bytes is None else baseline_bytes
    return case_peak_bytes(stacks, grid, n_input, fuse_options, base)


def case_peak_bytes(stacks, grid, n_input, fuse_options, baseline_bytes):
    """The larger of the fusion's estimate (srr operator path per stack, as ``run`` checks it) and the
    model + report picture's, which ``run`` estimates on top of the process holding the inputs and the
    fused volume (on small cases the report's offscreen rendering is the peak)."""
    fusion = estimate_fusion_bytes(stacks, grid, fuse_options.method, baseline_bytes=baseline_bytes,
                                   register=fuse_options.register, srr_options=fuse_options.srr)
    held = float(baseline_bytes) + 4.0 * (int(grid.n_voxels) + int(n_input))
    return max(fusion, memory.estimate_model_bytes(grid.n_voxels, held, report=True))
