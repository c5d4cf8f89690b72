"""Per-stack linear intensity matching and the agreement check between stacks.

Stacks are compared at a common coarse resolution, where their different slice profiles no longer
matter: each stack is block-averaged in-plane, back-projected through its own forward model onto a
coarse grid (``A^T y / A^T 1``: a PSF-weighted average, no aliasing), and smoothed with an isotropic
Gaussian as wide as the thickest slice. On the voxels two stacks both see well:

- matching fits ``ref ~ scale * stack + offset`` by least squares (reference = stack 0);
- agreement is their Pearson correlation (independent of any linear intensity change).

Why matching is off for CT in HU (``intensity_matching=None``): Hounsfield units are calibrated (air
-1000, water 0) identically for every series of a scanner, so the series already agree; a fit between
differently blurred images would only add bias (thin bone loses contrast at 5 mm). MR (and anything not
in HU) has arbitrary per-series scaling (receive-coil gain, sequence), which would otherwise appear as
steps between regions seen by different stacks.
"""

import logging
import math
from dataclasses import dataclass, field, replace
from typing import List

import numpy as np

from ..grid import Grid
from .banded import Banded
from .operators import make_operator

LOGGER = logging.getLogger("MultiPlaneFusionLib")

# Minimum number of coarse voxels two stacks must share to be compared.
_MIN_OVERLAP = 50


@dataclass
class IntensityReport:
    """Outcome of the comparison of the stacks (lists are per stack, in input order).

    ``scale``/``offset``: the linear map applied to each stack's intensities (1 / 0 when matching is off
    or impossible); ``correlation``: best correlation with any other stack on their overlap (None when a
    stack overlaps no other); ``pairwise``: the full matrix (None entries without overlap);
    ``disagreeing``: indices of stacks whose best correlation is below the threshold.
    """

    scale: List[float] = field(default_factory=list)
    offset: List[float] = field(default_factory=list)
    correlation: List[object] = field(default_factory=list)
    pairwise: List[List[object]] = field(default_factory=list)
    disagreeing: List[int] = field(default_factory=list)
    matched: bool = False
    coarse_spacing_mm: float = 0.0


def coarse_grid(grid, spacing_mm):
    """A grid with the same box and axes as ``grid`` and (at least) ``spacing_mm`` voxels."""
    extent = np.asarray(grid.shape[::-1], float) * np.asarray(grid.spacing_mm, float)  # (i, j, k) mm
    n = np.maximum(1, np.ceil(extent / spacing_mm - 1e-9)).astype(int)
    sp = extent / n
    lo = np.asarray(grid.origin_mm) - grid.direction_matrix @ (0.5 * np.asarray(grid.spacing_mm, float))
    origin = lo + grid.direction_matrix @ (0.5 * sp)
    return Grid(
        shape=(int(n[2]), int(n[1]), int(n[0])),
        spacing_mm=tuple(float(v) for v in sp),
        origin_mm=tuple(float(v) for v in origin),
        direction=grid.direction,
    )


def block_average(stack, factor):
    """The stack with its pixels averaged over ``factor x factor`` in-plane blocks (cropping the rest)."""
    f = int(factor)
    if f <= 1:
        return stack
    nk, nj, ni = stack.shape
    mj, mi = nj // f, ni // f
    if mj < 1 or mi < 1:
        return stack
    px = stack.pixels[:, : mj * f, : mi * f].reshape(nk, mj, f, mi, f).mean(axis=(2, 4), dtype=np.float64)
    di, dj = stack.pixel_spacing_mm
    shift = 0.5 * (f - 1) * (di * stack.row_direction + dj * stack.column_direction)
    return replace(
        stack,
        pixels=px.astype(np.float32),
        slice_origins_mm=stack.slice_origins_mm + shift[None, :],
        pixel_spacing_mm=(di * f, dj * f),
    )


def _smooth(volume, grid, sigma_mm, workers=None):
    """Separable Gaussian smoothing (normalised at the borders; any array size)."""
    out = volume.astype(np.float32)
    h = grid.spacing_mm[::-1]  # along k, j, i
    for axis, n in enumerate(out.shape):
        m = Banded.from_psf(np.arange(n, dtype=float), n, "gaussian", sigma_mm / h[axis])
        out = m.apply(out, axis, workers=workers)
    return out


def low_resolution_views(stacks, grid, *, psf="gaussian", monitor=None, workers=None):
    """Each stack seen at a common coarse resolution on a coarse copy of ``grid``.

    Returns
    -------
    views : list of ndarray (float32, coarse grid shape)
        Smoothed PSF-weighted back-projections.
    support : list of ndarray (bool)
        Where each view is reliable (well inside the stack's footprint).
    coarse : Grid
    """
    t_max = max(s.thickness_mm for s in stacks)
    spacing = max(3.0, 0.75 * t_max, 2.0 * float(max(grid.spacing_mm)))
    coarse = coarse_grid(grid, spacing)
    views, support = [], []
    for n, s in enumerate(stacks):
        if monitor is not None:
            monitor.check()
        factor = max(1, int(math.floor(0.5 * spacing / max(min(s.pixel_spacing_mm), 1e-6))))
        small = block_average(s, factor)
        op = make_operator(small, coarse, psf)
        ones = op.adjoint(op.valid.astype(np.float32), workers)
        bp = op.adjoint(np.where(op.valid, small.pixels, 0.0).astype(np.float32), workers)
        # A^T 1 varies with the phase of the voxels between slices and grows at the grid border; compare
        # with its typical value, not its peak.
        positive = ones[ones > 0]
        typical = float(np.median(positive)) if positive.size else 0.0
        good = ones > 0.5 * typical if typical > 0 else np.zeros(coarse.shape, dtype=bool)
        view = np.where(good, bp / np.where(good, ones, 1.0), 0.0).astype(np.float32)
        # Fill outside the footprint with the mean before smoothing, so the border does not bleed.
        if good.any():
            view[~good] = float(view[good].mean())
        views.append(_smooth(view, coarse, t_max / 2.3548 + spacing / 2.0, workers))
        # Trust only voxels a smoothing radius inside the footprint.
        inner = _smooth(good.astype(np.float32), coarse, t_max / 2.3548 + spacing / 2.0, workers) > 0.9
        support.append(inner & good)
        del op
        LOGGER.debug("intensity view %d: block %d, coarse %s", n, factor, coarse.shape)
    return views, support, coarse


def compare_stacks(stacks, grid, *, match, threshold, psf="gaussian", reference=0, monitor=None, workers=None):
    """Fit per-stack linear intensity maps against ``reference`` and flag disagreeing stacks.

    Parameters
    ----------
    stacks : list of Stack
    grid : Grid
    match : bool
        Fit and report scale/offset (otherwise they stay 1/0).
    threshold : float
        A stack whose best correlation with any other stack is below this is "disagreeing".
    reference : int
    monitor : progress.Monitor, optional
    workers : parallel.Workers, optional
        Threads for the back-projections and smoothing.

    Returns
    -------
    IntensityReport
    """
    n = len(stacks)
    report = IntensityReport(scale=[1.0] * n, offset=[0.0] * n, correlation=[None] * n, matched=bool(match))
    report.pairwise = [[None] * n for _ in range(n)]
    if n == 0:
        return report
    views, support, coarse = low_resolution_views(stacks, grid, psf=psf, monitor=monitor, workers=workers)
    report.coarse_spacing_mm = float(max(coarse.spacing_mm))
    for a in range(n):
        report.pairwise[a][a] = 1.0
        for b in range(a + 1, n):
            both = support[a] & support[b]
            if int(both.sum()) < _MIN_OVERLAP:
                continue
            va, vb = views[a][both].astype(np.float64), views[b][both].astype(np.float64)
            va -= va.mean()
            vb -= vb.mean()
            den = math.sqrt(float(va @ va) * float(vb @ vb))
            r = float(va @ vb) / den if den > 0 else 0.0
            report.pairwise[a][b] = report.pairwise[b][a] = r
    for a in range(n):
        others = [report.pairwise[a][b] for b in range(n) if b != a and report.pairwise[a][b] is not None]
        report.correlation[a] = max(others) if others else None
        if others and max(others) < threshold:
            report.disagreeing.append(a)
    if match:
        ref = views[reference]
        for k in range(n):
            if k == reference:
                continue
            both = support[reference] & support[k]
            if int(both.sum()) < _MIN_OVERLAP:
                LOGGER.warning("stack %d shares too little volume with the reference to match intensities", k)
                continue
            x = views[k][both].astype(np.float64)
            y = ref[both].astype(np.float64)
            vx = float(np.var(x))
            if vx <= 0:
                continue
            a = float(np.mean((x - x.mean()) * (y - y.mean()))) / vx
            if not a > 0:  # an inverted or flat relation is a disagreement, not a calibration
                LOGGER.warning("stack %d: intensity fit against the reference has slope %.3g; not applied", k, a)
                continue
            report.scale[k] = a
            report.offset[k] = float(y.mean() - a * x.mean())
    return report
