"""Settings from the data: slice profile per stack, regularisation weight, and the self-check.

All three are measured on a *probe block*: a cube of the reconstruction grid (full resolution,
``SrrOptions.probe_block_voxels`` a side) placed where the inputs show the most structure (bone edges), so
the choices see the details they decide about and cost a fraction of the full reconstruction. Each stack
is cropped to the block (plus the reach of its profile) and only samples well inside the block are scored
(the model truncates PSFs at the block's faces).

- **Slice profile** (:func:`estimate_profiles`): leave one stack out. The others are fused (Tikhonov at
  the default weight, to convergence) and pushed through every candidate profile of the left-out stack
  (:func:`.psf.candidates`: box and Gaussian, width 0.8-1.25 x the nominal thickness); the profile whose
  prediction fits the stack's samples best (least squares) is kept. The other stacks see this stack's
  slice direction in-plane, at their pixel spacing, so the fit measures the through-plane profile. Where
  they do not (stacks sharing nearly one normal: an axial series with gantry-tilted axial ones), their own
  profiles blur the fusion along the left-out normal and the fit makes up for it by a narrower profile:
  on the real Philips 5 mm + tilted series it chose box x1.1 for the 5 mm series and Gaussians x1.1-1.25
  for the tilted ones, 0.002 lower in correlation and 0.04 mm worse in surface than the nominal
  Gaussians. So a stack is measured only when some other stack blurs its normal by at most
  ``PROFILE_MAX_BLUR_RATIO`` of its own profile variance (:func:`through_plane_blur_ratio`); the
  others keep their nominal profile (:func:`.psf.nominal_profile`: from the acquisition in the header).
  Two things keep the comparison about the profile (each measured on
  the realistic panel, where without them Gaussian profiles won on box data):

  * the two sides are made alike: along the left-out normal the fusion is a deconvolution of the
    others' in-plane PSF (sharper than the object wherever the assumed in-plane blur exceeds the real
    one, ringing at edges), so that PSF is applied to it again before the candidates are;
  * the residual is smoothed in-plane (Gaussian, ``PROFILE_SMOOTH_MM``) before it is scored. The others
    are as thick as their slices along their own normals, which lie in this stack's plane: the
    in-plane detail they cannot reproduce (and this stack's noise) is the same for every candidate and
    drowned the profile's effect, which acts along the normal and survives the in-plane smoothing.
- **In-plane width** (:func:`estimate_in_plane`, ``--in-plane-psf auto``; opt-in): leave one stack out
  again, now over the in-plane Gaussian's FWHM (``psf.IN_PLANE_FACTORS`` x pixel spacing). For every
  candidate f the others are fused with in-plane width f (their chosen through-plane profiles kept) and
  each left-out stack is predicted through f: the *common* width is the f under which the stacks predict
  each other best. Then each stack's *own* width (``psf.IN_PLANE_OWN_FACTORS``, up to 2.0) is the one
  that predicts it best from the others at the common width: no further solve. The residual is scored
  at full resolution (``IN_PLANE_SCORE``). Measured on the analytic phantom with known in-plane kernels
  (Testing/test_in_plane_psf.py): the *differences* between stacks are identified (a series through a
  2.4-pixel kernel among blur-free ones is given 2.0, the others 0.3), the *common level* is not: adding
  one isotropic blur to the object and removing it from every model changes no prediction, so nothing in
  the between-stack consistency fixes it, and what the score does prefer follows the fusion weight, not
  the data (kernels of none, 1.2 and 2.4 pixels on all three series: at the weight 0.1 it is 0.3 for each;
  at 0.01 it is 0.9, 0.9 and 0.6, at 0.003 1.2, 1.2 and 0.9: if anything reversed).
- **Regularisation weight** (:func:`choose_alpha`): K-fold cross-validation over held-out slices. Every
  stack's slices are dealt into K folds (slice k goes to fold k mod K); for each fold the block is
  reconstructed from the remaining slices and scored on predicting the held-out ones (squared error,
  data-weighted as in the objective). The weight with the lowest total error over a log-spaced ladder
  wins, refined once between its neighbours (parabola in log alpha). A held-out slice carries its own
  noise, which no reconstruction can predict, so the score is minimal where noise fitting and
  over-smoothing balance: the classical CV argument, with no noise model to calibrate.
- **Prior and weight** (:func:`choose_prior`, ``--regularizer auto``): the same held-out-slice CV over
  (regularizer, weight) pairs (``PRIOR_LADDER``); the pair with the lowest held-out error wins, then the
  one-standard-error rule along its regularizer's weights, with the standard error of the paired
  differences over the same (fold, stack) units (:func:`one_standard_error_choice`).
- **Self-check** (:func:`self_check`): after the choices, each stack is predicted by the fusion of the
  others made with the final settings (chosen profiles and weight, the regularizer) and by every other
  single series alone (B-spline resampled, then through this stack's profile). When the fusion does not
  predict some stack better than the best single series, the reconstruction is not trustworthy there
  (misregistration, a stack that does not belong): flagged. The verdict per stack is graded: "on par" when
  the fusion's RMS error is within ``SELF_CHECK_TIE_FRACTION`` of the single series' (the other series add
  nothing measurable for that stack, as for two nearly parallel tilted series with a third one across
  them), "worse" beyond it, which is what a misregistered or foreign series gives (README).

The block solves use the objective of :mod:`.srr` on the same normalised intensities, so a weight chosen
here means the same on the full grid (alpha is a squared length, independent of the grid spacing).
"""

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError
from ..grid import Grid
from ..sampling.psf import FWHM_PER_SIGMA, IN_PLANE_FACTORS, IN_PLANE_OWN_FACTORS, candidates
from ..sampling.resample import resample_stack
from .operators import make_operator
from .options import EDGE_PRESERVING
from .smoothing import GaussianBlur
from .solvers import NormalEquations, data_weights, penalty_weight, solve_huber, solve_tikhonov

LOGGER = logging.getLogger("MultiPlaneFusionLib")

# Weight of the leave-one-out fusions that judge slice profiles (mm^2): the reconstruction's default weight
# until 2026-12-03 (0.07 since), kept for the profile choice, with which the panel figures of the current
# defaults were measured (at 0.03 the fusions' ringing along the left-out normal favoured Gaussian profiles
# on box data).
PROFILE_ALPHA = 0.1
# Sigma (mm) of the in-plane smoothing of the prediction residuals the profiles are judged on.
PROFILE_SMOOTH_MM = 4.0
# A stack's profile is measured only when the others blur its normal by at most this fraction of its own
# profile variance (through_plane_blur_ratio): half the variance step between the ladder's widths 1.0 and
# 1.1 (0.21), so that the fit's bias stays below the resolution of the search.
PROFILE_MAX_BLUR_RATIO = 0.1
# How the in-plane width candidates are scored (estimate_in_plane): "full" or "smoothed".
IN_PLANE_SCORE = "full"
# Weight of the leave-one-out fusions that judge the in-plane widths (mm^2).
IN_PLANE_ALPHA = PROFILE_ALPHA
# Candidate weights (mm^2), a factor ~3 apart, per regularizer (Huber's penalty is weaker at edges).
ALPHA_LADDER = {"tikhonov": (0.003, 0.01, 0.03, 0.1), "huber": (0.03, 0.1, 0.3, 1.0),
                "hybrid": (0.003, 0.01, 0.03, 0.1)}
CV_FOLDS = 2
# Candidate (regularizer, weight) pairs of the prior choice (``--regularizer auto``): each prior's fixed
# default weight and a factor ~3 either side (the grid of the panel's exhaustive sweep).
PRIOR_LADDER = (("tikhonov", 0.03), ("tikhonov", 0.1), ("tikhonov", 0.3),
                ("huber", 0.15), ("huber", 0.5), ("huber", 1.5))
# Self-check: a fusion whose RMS prediction error of a stack exceeds the best single series' by at most this
# fraction is "on par", not "worse" (measured on the real registered Philips series, where one tilted series was
# predicted as well by the other as by the fusion: +0.1 % with in-plane width 0.6, +0.4 % with 0.3; the same
# series left in scanner geometry, about 1 mm apart: +30 % and +52 %).
SELF_CHECK_TIE_FRACTION = 0.01
# Block solves: converged when an iteration changes x by less than this fraction (relative).
_BLOCK_SOLUTION_TOL = 1e-3
_BLOCK_MAX_ITER = 60


@dataclass
class Normalisation:
    offset: float
    scale: float


def choose_block(stacks, grid, size_voxels):
    """Sub-grid of ``grid`` (at most ``size_voxels`` a side) where the inputs show the most structure.

    The average of the stacks on a ~4 mm grid is differentiated; the block is centred on the window of
    its size with the largest summed gradient magnitude among voxels every stack covers.
    """
    from .average import fuse_average
    from .intensity import coarse_grid

    shape = np.asarray(grid.shape)
    n = np.minimum(shape, int(size_voxels))
    if np.all(n == shape):
        return grid, (0, 0, 0)
    h = float(max(grid.spacing_mm))
    cg = coarse_grid(grid, max(4.0, 2 * h))
    avg = fuse_average(stacks, cg, "linear")
    v = avg.volume.astype(np.float64)
    g = np.zeros_like(v)
    for ax in range(3):
        if v.shape[ax] > 1:
            g += np.gradient(v, axis=ax) ** 2
    g = np.sqrt(g) * (avg.coverage >= len(stacks))
    # window size in coarse voxels along each array axis
    cs = np.asarray(cg.spacing_mm[::-1], float)
    hs = np.asarray(grid.spacing_mm[::-1], float)
    w = np.maximum(1, np.round(n * hs / cs).astype(int))
    w = np.minimum(w, g.shape)
    c = np.pad(g, ((1, 0), (1, 0), (1, 0))).cumsum(0).cumsum(1).cumsum(2)
    a, b, d = w
    sums = (c[a:, b:, d:] - c[:-a, b:, d:] - c[a:, :-b, d:] - c[a:, b:, :-d]
            + c[:-a, :-b, d:] + c[:-a, b:, :-d] + c[a:, :-b, :-d] - c[:-a, :-b, :-d])
    best = np.unravel_index(int(np.argmax(sums)), sums.shape)
    centre_c = np.asarray(best, float) + (w - 1) / 2.0  # coarse index (k, j, i)
    p = cg.index_to_physical(*centre_c)
    kc = np.asarray(grid.physical_to_index(p), float)
    lo = np.clip(np.round(kc - (n - 1) / 2.0).astype(int), 0, shape - n)
    origin = grid.index_to_physical(*lo.astype(float))
    sub = Grid(shape=tuple(int(v) for v in n), spacing_mm=grid.spacing_mm,
               origin_mm=tuple(float(v) for v in origin), direction=grid.direction)
    return sub, tuple(int(v) for v in lo)


def crop_stack(stack, grid, margin_mm):
    """``stack`` restricted to the slices and pixel rows/columns that can reach ``grid`` (plus
    ``margin_mm``), or None when it misses it. Geometry is exact (slice origins moved with the crop)."""
    nk, nj, ni = grid.shape
    cs = np.array(np.meshgrid([-0.5, nk - 0.5], [-0.5, nj - 0.5], [-0.5, ni - 0.5], indexing="ij")).reshape(3, -1)
    corners = grid.index_to_physical(cs[0], cs[1], cs[2])
    k, j, i = stack.physical_to_index(corners)
    di, dj = stack.pixel_spacing_mm
    step = max(stack.slice_step_mm, 1e-6)
    mk, mj, mi = margin_mm / step, margin_mm / dj + 1, margin_mm / di + 1
    sk, sj, si = stack.shape
    k0, k1 = max(0, int(math.floor(k.min() - mk))), min(sk, int(math.ceil(k.max() + mk)) + 1)
    j0, j1 = max(0, int(math.floor(j.min() - mj))), min(sj, int(math.ceil(j.max() + mj)) + 1)
    i0, i1 = max(0, int(math.floor(i.min() - mi))), min(si, int(math.ceil(i.max() + mi)) + 1)
    if k1 <= k0 or j1 <= j0 or i1 <= i0:
        return None
    shift = i0 * di * stack.row_direction + j0 * dj * stack.column_direction
    return replace(stack, pixels=np.ascontiguousarray(stack.pixels[k0:k1, j0:j1, i0:i1]),
                   slice_origins_mm=stack.slice_origins_mm[k0:k1] + shift[None, :])


def select_slices(stack, keep):
    """The stack with only the slices where ``keep`` (bool per slice) is True."""
    keep = np.asarray(keep, bool)
    return replace(stack, pixels=np.ascontiguousarray(stack.pixels[keep]),
                   slice_origins_mm=stack.slice_origins_mm[keep])


class BlockProblem:
    """The reconstruction objective restricted to a probe block (see the module docstring).

    ``stacks``: the (intensity-matched) stacks, already cropped to the block; ``norm``: the normalisation
    of the full reconstruction; ``margin_mm``: samples closer than this to the block's faces are not
    scored; ``check``: called before every block solve (a Monitor's ``check``: raises CancelledError when
    the run was cancelled, so a cancel during the automatic choices takes effect within one solve).
    """

    def __init__(self, stacks, grid, norm, *, margin_mm, workers=None, check=None):
        self.check = check or (lambda: None)
        self.stacks = stacks
        self.grid = grid
        self.norm = norm
        self.workers = workers
        self.margin_mm = float(margin_mm)
        self.n_solves = 0
        self.n_iterations = 0
        self._interior = {}  # per stack (by id): samples inside the scored region (geometry only)
        self._singles = {}  # per stack index: its B-spline resampling onto the block (self-check)

    def normalised(self, stack):
        return (stack.pixels - np.float32(self.norm.offset)) * np.float32(1.0 / self.norm.scale)

    def interior(self, stack, valid):
        """Bool per sample: valid and at least ``margin_mm`` inside the block."""
        key = id(stack)
        if key not in self._interior:
            self._interior[key] = (stack, self._inside(stack))  # the stack is kept so its id stays unique
        return valid & self._interior[key][1]

    def _inside(self, stack):
        nk, nj, ni = stack.shape
        kk, jj, ii = np.meshgrid(np.arange(nk, dtype=float), np.arange(nj, dtype=float),
                                 np.arange(ni, dtype=float), indexing="ij")
        g = self.grid.physical_to_index(stack.index_to_physical(kk, jj, ii))
        h = np.asarray(self.grid.spacing_mm[::-1], float)
        ok = np.ones(stack.shape, dtype=bool)
        for a in range(3):
            m = self.margin_mm / h[a]
            ok &= (g[a] >= m - 0.5) & (g[a] <= self.grid.shape[a] - 0.5 - m)
        return ok

    def solve(self, stacks, profiles, alpha, *, regularizer="tikhonov", huber=None, x0=None):
        """Normalised reconstruction of the block from ``stacks`` with per-stack ``profiles``."""
        self.check()
        grid = self.grid
        ops = [make_operator(p.apply(s), grid, p.kind) for s, p in zip(stacks, profiles)]
        c = data_weights(stacks, grid)
        b = np.zeros(grid.shape, np.float32)
        rows = np.zeros(grid.shape, np.float32)
        for s, op, ck in zip(stacks, ops, c):
            y = self.normalised(s) * np.float32(ck)
            y[~op.valid] = 0.0
            op.adjoint_add(y, b, workers=self.workers)
            op.adjoint_ones(out=rows, scale=ck, workers=self.workers)
        if x0 is None:
            x = b / np.maximum(rows, np.float32(1e-6))
        else:
            x = x0.copy()
        x[rows <= 0] = 0.0
        spacing = tuple(float(v) for v in grid.spacing_mm[::-1])
        delta, edge_scale, outer, huber_alpha = huber if huber is not None else (None, 0.0, 1, 0.0)
        weight, floor = penalty_weight(regularizer, alpha, huber_alpha)
        system = NormalEquations(ops, c, weight, spacing, rows, workers=self.workers)
        if regularizer in EDGE_PRESERVING:
            info = solve_huber(system, b, x, delta, outer_iterations=outer, max_iterations=_BLOCK_MAX_ITER,
                               tolerance=1e-6, edge_scale_mm=edge_scale, solution_tolerance=_BLOCK_SOLUTION_TOL,
                               floor=floor)
        else:
            info = solve_tikhonov(system, b, x, max_iterations=_BLOCK_MAX_ITER, tolerance=1e-6, overwrite=True,
                                  solution_tolerance=_BLOCK_SOLUTION_TOL)
        self.n_solves += 1
        self.n_iterations += int(info["iterations"])
        return x

    def predict(self, stack, profile, x):
        """(prediction, measured, scored mask) of ``stack``'s samples from normalised ``x``, normalised."""
        op = make_operator(profile.apply(stack), self.grid, profile.kind)
        pred = op.forward(x, self.workers)
        return pred, self.normalised(stack), self.interior(stack, op.valid)


def choose_profile(predictions, measured, weights=None):
    """Index of the candidate whose prediction fits ``measured`` best, and every candidate's error.

    Parameters
    ----------
    predictions : list of ndarray
        Per candidate, the predicted samples (same shape as ``measured``).
    measured : ndarray
        The stack's samples being predicted.
    weights : ndarray of bool or float, optional
        Samples to score (e.g. well inside the region the prediction is reliable in).

    Returns
    -------
    best : int
    rms : list of float
        Root-mean-square prediction error per candidate, input units.

    The error is plain least squares in the data's units: the same functional the reconstruction
    minimises, so the chosen profile is the one under which the stacks are most consistent.
    """
    m = np.asarray(measured, dtype=np.float64)
    w = np.ones(m.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    tw = float(w.sum())
    if tw <= 0:
        raise InputError("no samples to compare slice profiles on")
    rms = []
    for p in predictions:
        d = np.asarray(p, dtype=np.float64) - m
        rms.append(float(np.sqrt(float((w * d * d).sum()) / tw)))
    return int(np.argmin(rms)), rms


def in_plane_smoother(stack, sigma_mm):
    """(along j, along i) dense row-normalised Gaussian matrices of ``sigma_mm`` on ``stack``'s pixel lattice
    (taps to 3 sigma), for residuals of its cropped samples [k, j, i]."""
    mats = []
    for n, h in zip(stack.shape[1:], stack.pixel_spacing_mm[::-1]):
        s = float(sigma_mm) / float(h)
        d = np.arange(n)[:, None] - np.arange(n)[None, :]
        w = np.where(np.abs(d) <= math.ceil(3.0 * s), np.exp(-0.5 * (d / max(s, 1e-9)) ** 2), 0.0)
        mats.append(w)
    return mats


def _smooth(a, mats):
    mj, mi = mats
    return np.matmul(np.matmul(mj, a), mi.T)


def smoothed_in_plane(values, mask, mats):
    """Normalised convolution of ``values`` within ``mask`` by the in-plane matrices ``mats``: (smoothed
    values, bool of the samples it is defined on: in ``mask`` with at least half the kernel's weight there)."""
    m = mask.astype(np.float64)
    num = _smooth(np.where(mask, values, 0.0).astype(np.float64), mats)
    den = _smooth(m, mats)
    full = _smooth(np.ones(m.shape[1:]), mats)
    ok = mask & (den >= 0.5 * full[None])
    return num / np.maximum(den, 1e-12), ok


def through_plane_blur_ratio(stacks, profiles):
    """Per stack k: how much the other stacks' slice profiles blur k's slice normal, as a fraction of k's own
    profile variance (the smallest over the others; inf when there are none).

    For another stack i whose normal makes the cosine c with k's normal, its PSF's variance along k's normal
    is c^2 sigma_T^2 + (1 - c^2) sigma_p^2 (sigma_T its through-plane, sigma_p its in-plane standard
    deviation, nominal Gaussian widths). The in-plane part is what :func:`estimate_profiles` compensates;
    the rest, c^2 (sigma_T^2 - sigma_p^2), is blur the leave-one-out fusion carries along k's normal, which
    the fit makes up for by a narrower profile (its variance is biased low by about that much). Orthogonal
    stacks give 0; stacks sharing nearly one normal (an axial series with gantry-tilted axial ones) give
    about their variance ratio."""
    normals, s_t, s_p = [], [], []
    for s, p in zip(stacks, profiles):
        normals.append(s.world_normal)
        s_t.append(float(s.thickness_mm) / FWHM_PER_SIGMA)
        s_p.append(p.effective_in_plane_factor * max(s.pixel_spacing_mm) / FWHM_PER_SIGMA)
    out = []
    for k in range(len(stacks)):
        excess = [float(normals[i] @ normals[k]) ** 2 * max(s_t[i] ** 2 - s_p[i] ** 2, 0.0)
                  for i in range(len(stacks)) if i != k]
        out.append(min(excess) / s_t[k] ** 2 if excess else math.inf)
    return out


def estimate_profiles(problem, initial, kinds, *, alpha=PROFILE_ALPHA, smooth_mm=PROFILE_SMOOTH_MM,
                      max_blur_ratio=PROFILE_MAX_BLUR_RATIO):
    """Per stack the best-predicting candidate profile (leave one stack out, module docstring).

    ``initial``: the profiles assumed for the other stacks; ``kinds``: the families searched. A stack whose
    normal no other stack resolves (:func:`through_plane_blur_ratio` above ``max_blur_ratio``) keeps its
    initial profile: the fit would be biased towards narrower profiles by more than half a step of the
    width ladder.
    Returns (profiles, report, ratios) where report[k] holds every candidate's RMS error (input units) of
    the in-plane smoothed prediction residual (None where not measured) and ratios[k] the blur ratio."""
    stacks = problem.stacks
    out, report = [], []
    ratios = through_plane_blur_ratio(stacks, initial)
    spacing_kji = tuple(float(v) for v in problem.grid.spacing_mm[::-1])
    for k, s in enumerate(stacks):
        others = [i for i in range(len(stacks)) if i != k]
        if not others or ratios[k] > max_blur_ratio:
            out.append(initial[k])
            report.append(None)
            continue
        x = problem.solve([stacks[i] for i in others], [initial[i] for i in others], alpha)
        # the others' in-plane PSF, applied again (module docstring: the two sides of the comparison)
        sigma = max(initial[i].effective_in_plane_factor * max(stacks[i].pixel_spacing_mm)
                    for i in others) / FWHM_PER_SIGMA
        x = GaussianBlur(x.shape, spacing_kji, sigma)(x, problem.workers)
        mats = in_plane_smoother(s, smooth_mm)
        cands = candidates(kinds, in_plane_factor=initial[k].in_plane_factor)
        preds, meas, ok = [], None, None
        for cand in cands:
            p, m, mask = problem.predict(s, cand, x)
            if meas is None:
                meas, ok = smoothed_in_plane(m, mask, mats)
            preds.append(smoothed_in_plane(p, mask, mats)[0])
        if not ok.any():
            out.append(initial[k])
            report.append(None)
            continue
        best, rms = choose_profile(preds, meas, ok)
        out.append(cands[best])
        report.append({c.label(): round(r * problem.norm.scale, 3) for c, r in zip(cands, rms)})
    return out, report, ratios


def estimate_in_plane(problem, profiles, *, factors=IN_PLANE_FACTORS, own_factors=IN_PLANE_OWN_FACTORS, alpha=None,
                      score="full"):
    """Per stack the in-plane PSF width (FWHM / pixel spacing) that predicts it best (module docstring).

    Two levels from one set of solves. For every candidate width f, every stack is left out in turn and
    predicted from the fusion of the others, all of them modelled with in-plane width f (their
    through-plane ``profiles`` kept), through every candidate width of its own. The *common* width is the f
    under which the stacks predict each other best (mean over stacks of the mean squared error with the left-
    out stack at f as well); the left-out stack's through-plane axis lies in the others' planes, which
    anchors the level (a model too narrow for the others' data leaves their blur in the fusion, which
    then predicts the thick axis too smooth, and the reverse). Then, per stack, the width of its own
    that predicts it best from the others at the common width (the difference between stacks).

    ``score``: "full" scores the residual at full resolution; "smoothed" smooths it in-plane first
    (``PROFILE_SMOOTH_MM``, as :func:`estimate_profiles`), which keeps the through-plane axis only.

    Returns (profiles with ``in_plane_factor`` set, report): report holds the common width, its score per
    candidate and per stack the RMS (input units) of every own candidate at the common width."""
    stacks = problem.stacks
    n = len(stacks)
    alpha = IN_PLANE_ALPHA if alpha is None else float(alpha)
    factors = tuple(float(f) for f in factors)
    own_factors = tuple(sorted(set(float(f) for f in own_factors) | set(factors)))
    if n < 2 or not factors:
        return list(profiles), None
    mse = {}  # (common, stack) -> list over own candidates, normalised units
    starts = {}
    for fc in factors:
        at = [p.with_in_plane(fc) for p in profiles]
        for k, s in enumerate(stacks):
            others = [i for i in range(n) if i != k]
            x = problem.solve([stacks[i] for i in others], [at[i] for i in others], alpha, x0=starts.get(k))
            starts[k] = x
            row = []
            mats = in_plane_smoother(s, PROFILE_SMOOTH_MM) if score == "smoothed" else None
            for fo in own_factors:
                pred, meas, mask = problem.predict(s, profiles[k].with_in_plane(fo), x)
                if mats is not None:
                    ms, ok = smoothed_in_plane(meas, mask, mats)
                    ps = smoothed_in_plane(pred, mask, mats)[0]
                    d = (ps - ms)[ok]
                else:
                    d = (pred - meas)[mask].astype(np.float64)
                row.append(float(d @ d) / d.size if d.size else float("nan"))
            mse[(fc, k)] = row
    judged = [k for k in range(n) if all(np.isfinite(mse[(fc, k)]).all() for fc in factors)]
    if not judged:
        return list(profiles), None
    own = {fc: own_factors.index(fc) for fc in factors}
    common_score = {fc: float(np.mean([mse[(fc, k)][own[fc]] for k in judged])) for fc in factors}
    common = min(common_score, key=common_score.get)
    out, per = [], []
    for k, p in enumerate(profiles):
        if k in judged:
            best = own_factors[int(np.argmin(mse[(common, k)]))]
            out.append(p.with_in_plane(best))
            per.append({f"{fo:g}": round(math.sqrt(v) * problem.norm.scale, 3)
                        for fo, v in zip(own_factors, mse[(common, k)])})
        else:
            out.append(p.with_in_plane(common))
            per.append(None)
    report = {"common_factor": common,
              "common_rms_by_factor": {f"{fc:g}": round(math.sqrt(v) * problem.norm.scale, 3)
                                       for fc, v in common_score.items()},
              "rms_by_own_factor": per}
    return out, report


def _cv_errors(problem, profiles, alpha, *, folds, regularizer, huber, starts):
    """Held-out-slice mean squared errors (normalised units) keyed by unit, (fold, stack index), for the
    (fold, stack) pairs with scored samples. Keyed so that candidates are compared unit by unit
    (:func:`one_standard_error_choice` pairs them)."""
    out = {}
    for f in range(folds):
        train, held = [], []
        for n, (s, p) in enumerate(zip(problem.stacks, profiles)):
            idx = np.arange(s.shape[0]) % folds
            if s.shape[0] >= 2 * folds:
                train.append((select_slices(s, idx != f), p))
                held.append((n, select_slices(s, idx == f), p))
            else:
                train.append((s, p))
        x = problem.solve([t[0] for t in train], [t[1] for t in train], alpha, regularizer=regularizer, huber=huber,
                          x0=starts.get(f))
        starts[f] = x
        for n, s, p in held:
            pred, meas, mask = problem.predict(s, p, x)
            if mask.any():
                d = (pred - meas)[mask].astype(np.float64)
                out[(f, n)] = float(d @ d) / d.size
    return out


def _aligned(by_candidate):
    """{candidate: {unit: mse}} -> {candidate: 1-D array over the units every candidate has, in one order}.

    A unit scored for some candidates only is dropped from all: the rule compares candidates unit by unit.
    """
    units = sorted(set.intersection(*(set(e) for e in by_candidate.values())))
    return {c: np.array([e[u] for u in units], dtype=np.float64) for c, e in by_candidate.items()}


def one_standard_error_choice(errors, order, *, paired=True):
    """The one-standard-error rule, by default with the standard error of PAIRED differences.

    Parameters
    ----------
    errors : dict
        Per candidate, a 1-D array of held-out mean squared errors, one per unit (fold x stack), all over
        the same units in the same order; NaN marks a unit missing for that candidate, and such a unit is
        dropped for every candidate (the comparison stays paired).
    order : sequence
        The candidates, smoother first.
    paired : bool
        False: the earlier, unpaired rule (each candidate's ``standard_error`` is that of its own errors,
        and the excess is compared with the minimum-mean candidate's); kept for :func:`choose_alpha`.

    Returns
    -------
    chosen
        The first candidate of ``order`` whose mean excess over the minimum-mean candidate is within one
        standard error of the per-unit differences.
    rows : dict
        Per candidate: ``mean`` (its mean error over the kept units), ``excess`` (mean minus the minimum
        mean), ``standard_error`` (paired: of its per-unit differences to the minimum-mean candidate, 0 for
        that one), ``within``.

    Why paired: every candidate predicts the same held-out slices, and some stacks are predicted far worse
    than others whatever the setting. The spread between units is common to all candidates; the standard
    error of one candidate's errors carries it (on the real Philips series it made every Huber weight look
    equivalent and the rule took the largest, which erased thin bone plates), the standard error of the
    differences does not. A single unit gives a standard error of 0 (no evidence of equivalence).
    """
    order = list(order)
    if len(order) != len(errors) or set(order) != set(errors):
        raise ValueError("order must list every candidate of errors once")
    e = np.array([np.asarray(errors[c], dtype=np.float64) for c in order])
    if e.ndim != 2:
        raise ValueError("every candidate needs a 1-D array over the same units")
    e = e[:, np.all(np.isfinite(e), axis=0)]
    n = e.shape[1]
    if n == 0:
        raise InputError("no held-out samples common to every candidate")
    means = e.mean(axis=1)
    best = int(np.argmin(means))  # the first of equal means: the smoother one
    d = e - e[best]
    excess = d.mean(axis=1)
    se = (d if paired else e).std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(len(order))
    within = excess <= (se if paired else se[best])
    chosen = order[int(np.argmax(within))]  # the best itself is always within (excess 0)
    rows = {c: {"mean": float(means[i]), "excess": float(excess[i]), "standard_error": float(se[i]),
                "within": bool(within[i])} for i, c in enumerate(order)}
    return chosen, rows


def choose_alpha(problem, profiles, *, regularizer="tikhonov", huber=None, ladder=None, folds=CV_FOLDS):
    """The CV weight (module docstring) with the one-standard-error rule (:func:`one_standard_error_choice`):
    the largest weight of the ladder whose mean held-out error is within one standard error of the
    minimum. Held-out thick slices cannot see errors along directions no stack resolves (ringing there
    costs volume accuracy but not prediction), so among equivalent weights the smoothest is kept.

    The standard error here is still the UNPAIRED one (over the fold x stack units of the best weight),
    unlike :func:`choose_prior`: measured on the phantom of Testing/test_autotune.py (20 HU noise), the
    held-out error falls all the way down the ladder, and the paired rule then takes 0.003 (23.2 dB)
    where the unpaired one takes 0.03 (25.9 dB, the best weight of the ladder): the between-stack spread
    in the unpaired error is what keeps ``--alpha auto`` off the ladder's low end there.

    Returns (alpha, {alpha: cv rms in input units}, {alpha: standard error of its mean squared error,
    input units squared})."""
    ladder = ALPHA_LADDER[regularizer] if ladder is None else ladder
    by_alpha = {}
    starts = {}
    # From the largest weight down: each solve warm-starts from the smoother previous one.
    for a in sorted(ladder, reverse=True):
        by_alpha[a] = _cv_errors(problem, profiles, a, folds=folds, regularizer=regularizer, huber=huber,
                                 starts=starts)
    best, rows = one_standard_error_choice(_aligned(by_alpha), sorted(ladder, reverse=True), paired=False)
    rms = {round(a, 6): round(math.sqrt(r["mean"]) * problem.norm.scale, 3) for a, r in sorted(rows.items())}
    se = {round(a, 6): round(r["standard_error"] * problem.norm.scale ** 2, 3) for a, r in sorted(rows.items())}
    return best, rms, se


def choose_prior(problem, profiles, *, huber=None, ladder=PRIOR_LADDER, folds=CV_FOLDS):
    """Regularizer and weight together, by the held-out-slice cross-validation of :func:`choose_alpha`
    over ``ladder`` ((regularizer, alpha) pairs): the regularizer of the pair with the lowest mean held-out
    error, then the one-standard-error rule (:func:`one_standard_error_choice`, paired) along that
    regularizer's weights: the largest whose excess over the minimum is within one standard error.
    Returns (regularizer, alpha, rows): one row per candidate, in ``ladder`` order, with its CV RMS (input
    units, ``cv_rms``), its mean squared error's excess over the minimum (``cv_mse_excess``) and the paired
    standard error of that excess (``cv_mse_standard_error``), both input units squared, and
    ``within_one_standard_error``.

    Caveat (measured, ``benchmarks/rank_check.py``): held-out data are predicted through the model's
    PSFs, so the score ranks settings by how well they fit the data *under the model*. Where the model's
    in-plane PSF is wider than the data's (the simulated real-anatomy panel cases), deconvolving
    settings (low weights, Huber) predict better and reconstruct worse."""
    by_pair = {}
    starts = {}
    for reg, a in sorted(ladder, key=lambda ra: (ra[0], -ra[1])):
        by_pair[(reg, a)] = _cv_errors(problem, profiles, a, folds=folds, regularizer=reg, huber=huber,
                                       starts=starts.setdefault(reg, {}))
    errors = _aligned(by_pair)
    _, rows = one_standard_error_choice(errors, list(ladder))
    r_min = min(rows, key=lambda c: rows[c]["mean"])[0]
    # the rule only along the winner's weights: the two priors' weights are not on one smoothness scale
    own = sorted((c for c in ladder if c[0] == r_min), key=lambda c: -c[1])
    _, best = one_standard_error_choice({c: errors[c] for c in own}, own)[0]
    s2 = problem.norm.scale ** 2
    out = [{"regularizer": r, "alpha": a, "cv_rms": round(math.sqrt(rows[(r, a)]["mean"]) * problem.norm.scale, 3),
            "cv_mse_standard_error": round(rows[(r, a)]["standard_error"] * s2, 3),
            "cv_mse_excess": round(rows[(r, a)]["excess"] * s2, 3),
            "within_one_standard_error": rows[(r, a)]["within"]} for (r, a) in ladder]
    return r_min, best, out


def self_check_verdict(excess, tie=SELF_CHECK_TIE_FRACTION):
    """"better", "on par" or "worse" for the fusion's RMS prediction error relative to the best single series'
    (``excess`` = fusion RMS / single RMS - 1): "on par" when the fusion does not beat the series but is within
    ``tie`` of it, "worse" beyond."""
    if excess < 0.0:
        return "better"
    return "on par" if excess <= tie else "worse"


def self_check(problem, profiles, alpha, *, regularizer="tikhonov", huber=None):
    """Per stack: RMS error (input units) of predicting it from the fusion of the others and from each
    other single series alone; ``fusion_beats_best_single`` per stack and overall.

    The fusions of the others are solved here with the FINAL settings (``profiles``, ``alpha``, the
    regularizer): the check judges the reconstruction that is delivered, not the fusions the automatic
    choices were made from (those use other weights and the profiles assumed before the choice)."""
    stacks = problem.stacks
    per = []
    for k, s in enumerate(stacks):
        others = [i for i in range(len(stacks)) if i != k]
        if not others:
            per.append(None)
            continue
        x = problem.solve([stacks[i] for i in others], [profiles[i] for i in others], alpha,
                          regularizer=regularizer, huber=huber)
        pred, meas, mask = problem.predict(s, profiles[k], x)
        if not mask.any():
            per.append(None)
            continue
        err = (pred - meas).astype(np.float64)
        fused = float(np.sqrt(np.mean(err[mask] ** 2))) * problem.norm.scale
        singles, fused_same = {}, {}
        for i in others:
            if i not in problem._singles:
                v, cov = resample_stack(stacks[i], problem.grid, "bspline")
                v = (v - np.float32(problem.norm.offset)) * np.float32(1.0 / problem.norm.scale)
                v[~cov] = 0.0
                problem._singles[i] = (v, cov)
            xs, cov = problem._singles[i]
            p1, _, m1 = problem.predict(s, profiles[k], xs)
            # only samples whose profile lies inside that series' coverage (it predicts nothing elsewhere)
            seen, _, _ = problem.predict(s, profiles[k], cov.astype(np.float32))
            inside = m1 & mask & (seen > 0.999)
            if inside.sum() < 0.5 * mask.sum():
                continue
            singles[i] = float(np.sqrt(np.mean((p1 - meas)[inside].astype(np.float64) ** 2))) * problem.norm.scale
            fused_same[i] = float(np.sqrt(np.mean(err[inside] ** 2))) * problem.norm.scale
        best = min(singles, key=singles.get) if singles else None
        excess = None if best is None else fused_same[best] / max(singles[best], 1e-12) - 1.0
        per.append({
            "fusion_of_others_rms": round(fused, 3),
            "single_series_rms": {int(i): round(v, 3) for i, v in singles.items()},
            "best_single": None if best is None else int(best),
            "best_single_rms": None if best is None else round(singles[best], 3),
            "fusion_rms_where_best_single_covers": None if best is None else round(fused_same[best], 3),
            "fusion_beats_best_single": None if best is None else bool(fused_same[best] < singles[best]),
            "fusion_excess_over_best_single": None if excess is None else round(excess, 4),
            "verdict": None if excess is None else self_check_verdict(excess),
        })
    return per


__all__ = ["BlockProblem", "Normalisation", "PRIOR_LADDER", "choose_alpha", "choose_block", "choose_prior",
           "choose_profile", "crop_stack", "estimate_in_plane", "estimate_profiles", "in_plane_smoother",
           "one_standard_error_choice", "select_slices", "self_check", "self_check_verdict", "smoothed_in_plane",
           "through_plane_blur_ratio"]
