"""The memory check of a fusion in the stacks' current geometry: which srr operator path each stack takes
decides what it costs (:func:`srr_paths`), :func:`MultiPlaneFusionLib.memory.estimate_bytes` turns that
into bytes, and :class:`Budget` checks it against the limit whenever the geometry may have changed.

It lives with the reconstruction because it asks the operators which path they would take; the memory
model itself (its constants, the limit, the process's memory) is :mod:`MultiPlaneFusionLib.memory`.
"""

import logging
import math

import numpy as np

from .. import memory
from ..sampling.psf import WIDTH_FACTORS, SliceProfile
from .operators import separable_axes
from .options import SrrOptions
from .skew_operator import pre_shear_voxels, skew_path_applies
from .stack_operator import PARALLEL_TOLERANCE_VOXELS


def srr_paths(stacks, grid):
    """``(path, n_samples)`` of each stack as srr's operators would take it now (geometry only, no
    allocation): separable when aligned with the grid axes, skew when tilted very slightly, skew_pre (the skew
    path with its pre-shear: moved stacks, gantry tilts, oblique planes), else general ("trilinear"
    when none of its axes runs along a grid axis). The skew tests take the widest profile srr may choose (a
    Gaussian of the largest width factor): the estimate never counts a stack as skew that srr sends down a
    more costly path."""
    widest = SliceProfile("gaussian", max(WIDTH_FACTORS))
    out = []
    for s in stacks:
        if separable_axes(s, grid) is not None:
            path = "separable"
        elif skew_path_applies(widest.apply(s), grid, "gaussian"):
            path = "skew"
        elif _pre_shear_level(widest.apply(s), grid):
            path = "skew_pre"
        else:
            path = "general" if _shares_grid_axis(s, grid) else "trilinear"
        out.append((path, int(s.n_voxels)))
    return out


def _pre_shear_level(stack, grid):
    """The skew path's pre-shear ``stack`` would take (1: one axis, 2: both), or 0 when it takes none."""
    for level in (1, 2):
        if skew_path_applies(stack, grid, "gaussian", pre_shear=level):
            return level
    return 0


def _lattice_nodes(stack, grid):
    """About the general path's lattice nodes over the grid: in-plane an integer fraction of the pixel no
    coarser than 1.25 grid spacings, through-plane about one grid spacing; x1.5 for the rotated box."""
    g = float(min(grid.spacing_mm))
    factor = 1.5
    for pix in stack.pixel_spacing_mm:
        step = float(pix) / math.ceil(float(pix) / (1.25 * g) - 1e-9)
        factor *= g / step
    return int(factor * grid.n_voxels)


def _shares_grid_axis(stack, grid):
    """Whether a stack axis (row, column, normal, after its transform) runs along a grid axis, within the
    operators' tolerance over the stack's extent: the general path then interpolates bilinearly."""
    r = np.asarray(stack.transform, float)[:3, :3]
    corners = np.asarray(stack.corners_mm())
    extent = float(np.linalg.norm(corners.max(axis=0) - corners.min(axis=0)))
    grid_axes = np.asarray(grid.direction_matrix, float)
    for axis in (stack.row_direction, stack.column_direction, stack.normal):
        e = r @ np.asarray(axis, float)
        cos = np.abs(grid_axes.T @ (e / np.linalg.norm(e))).max()
        if np.sqrt(max(0.0, 1.0 - cos**2)) * extent <= PARALLEL_TOLERANCE_VOXELS * float(np.min(grid.spacing_mm)):
            return True
    return False


def estimate_fusion_bytes(stacks, grid, method, baseline_bytes=0, register=False, resolve=False, srr_options=None):
    """:func:`~MultiPlaneFusionLib.memory.estimate_bytes` for ``stacks`` on ``grid`` in their current geometry
    (``srr_options``: the srr settings, None for the defaults; their prior decides the solver's memory)."""
    paths = srr_paths(stacks, grid) if method == "srr" else []
    nodes = [_lattice_nodes(s, grid) for s, (p, _) in zip(stacks, paths) if p == "trilinear"]
    widest = SliceProfile("gaussian", max(WIDTH_FACTORS))
    sheared = [pre_shear_voxels(s, grid, _pre_shear_level(widest.apply(s), grid))
               for s, (p, _) in zip(stacks, paths) if p == "skew_pre"]
    return memory.estimate_bytes(grid.n_voxels, sum(int(s.n_voxels) for s in stacks), method=method,
                                 baseline_bytes=baseline_bytes, stack_paths=paths,
                                 trilinear_nodes=max(nodes, default=0), register=register and len(stacks) > 1,
                                 resolve=resolve, pre_shear_voxels=max(sheared, default=0),
                                 edge_preserving=_edge_preserving(srr_options))


def _edge_preserving(srr_options):
    """Whether srr's prior reweights (Huber or hybrid); "auto" may choose Huber, so it counts as one."""
    opts = SrrOptions() if srr_options is None else srr_options
    return opts.edge_preserving or opts.regularizer == "auto"


class Budget:
    """The memory check of one fusion, made again whenever the stacks' geometry may have changed.

    Registration can turn a stack off the grid axes, which moves it from srr's separable path to the
    skew path, with its pre-shear (more memory), and a refinement that moves a stack makes srr solve again: each
    :meth:`check` estimates for the stacks as they are, refuses above the limit and keeps the highest
    estimate in ``peak_bytes`` (what the summary records). The baseline is the process's memory at the
    first check.
    """

    def __init__(self, grid, method, limit_gb, what, register=False, srr_options=None):
        self.grid, self.method, self.limit_gb, self.what, self.register = grid, method, limit_gb, what, register
        self.srr_options = srr_options
        self.baseline_bytes = None
        self.peak_bytes = 0

    def check(self, stacks, resolve=False):
        """Estimate, check against the limit (MemoryLimitError) and return the estimate in bytes."""
        if self.baseline_bytes is None:
            self.baseline_bytes = memory.current_rss_bytes()
        need = estimate_fusion_bytes(stacks, self.grid, self.method, baseline_bytes=self.baseline_bytes,
                                     register=self.register, resolve=resolve, srr_options=self.srr_options)
        memory.check_limit(need, self.limit_gb, self.what)
        if self.peak_bytes and need > self.peak_bytes:
            logging.getLogger("MultiPlaneFusionLib").info(
                "estimated peak memory now %.2f GB (%s)", need / 1024**3,
                "a second srr solve" if resolve else "stacks moved off the grid axes")
        self.peak_bytes = max(self.peak_bytes, need)
        return need
