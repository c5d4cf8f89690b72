"""Super-resolution reconstruction (SRR): one sharp volume from thick-slice stacks in several planes.

Every stack k is modelled as ``y_k = A_k x`` (:mod:`.operators`: registration, slice-profile PSF,
sampling at the pixel centres) and the volume is

    x = argmin  sum_k c_k ||A_k x - y_k||^2 + alpha R(x)

with c_k = (stack voxel volume) / (grid voxel volume), so that every stack weighs the same per unit of
volume whatever its resolution and both terms approximate integrals over the volume: alpha is then a
squared length (mm^2) and does not change with the grid spacing. Intensities are normalised internally
((value - background) / robust range), which makes alpha and the Huber delta scale-invariant. R is
Huber on the gradient magnitude (edge-preserving, the default: iteratively reweighted least squares,
each step a few conjugate-gradient iterations on the normal equations, started from the PSF-weighted
average of the stacks)
or first-order Tikhonov (conjugate gradients); see :mod:`.solvers`. Why Huber is the default: on the
analytic head phantom (hard-edged bone, no inverse crime) Tikhonov cannot recover the frequencies every
thick-slice stack has lost (those oblique to all three slice normals) and leaves the 300 HU surface
blurred outwards (0.36 mm against 0.55 mm for the axial stack alone); Huber keeps the bone edges sharp
(see the figures in the README).

Use :func:`reconstruct_srr`; :class:`SrrOptions` holds the settings, :func:`add_srr_arguments` and
:func:`srr_options_from_args` connect them to the command line.
"""

import logging
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import InputError
from ..progress import Monitor
from . import autotune
from .intensity import compare_stacks
from .operators import Scratch, make_operator
from .parallel import Workers, row_slabs
from .psf import PSF_KINDS, WIDTH_FACTORS, SliceProfile, validate_psf
from .solvers import NormalEquations, solve_huber, solve_tikhonov

LOGGER = logging.getLogger("MultiPlaneFusionLib")

# Defaults chosen on the realistic panel (benchmarks/bench_panel.py; figures in the README): Tikhonov with a
# fixed alpha 0.1 beats the best single series on every case; the cross-validated alpha ("auto") picked a
# weight too small on overlapping 3 mm slices (worse than one series), so it is opt-in.
DEFAULT_ALPHA = {"tikhonov": 0.1, "huber": 0.5}
DEFAULT_HUBER_DELTA = 0.05
DEFAULT_REGULARIZER = "tikhonov"
# The choices of SrrOptions.regularizer (the default first), for front ends that list them.
REGULARIZERS = ("tikhonov", "huber")
# Cap on CG iterations: Tikhonov stops on the tolerance long before. Huber spends its budget over 4
# reweightings (2 + 2 + 2 + 1 CG iterations): on the phantom the number of reweightings matters more than
# CG iterations per reweighting (bench_srr.py: 4 x 2 beat 3 x 3 in every sweep case at the same cost;
# 7 iterations over 4 reweightings is better than 9 over 3 and 20 % cheaper).
DEFAULT_ITERATIONS = {"tikhonov": 100, "huber": 100}
DEFAULT_OUTER_ITERATIONS = 10
# Converged: an iteration changes the (normalised) volume by less than this fraction of its norm.
DEFAULT_SOLUTION_TOLERANCE = 1e-3
# Sigma of the Gaussian the Huber edge test looks through, mm (see solvers.huber_weights).
DEFAULT_EDGE_SCALE_MM = 0.35


@dataclass
class SrrOptions:
    """Settings of :func:`reconstruct_srr`.

    Attributes
    ----------
    alpha : float, "auto" or None
        Regularisation weight, mm^2 (squared smoothing length per unit data weight). Scale-invariant:
        intensities are normalised internally. Larger is smoother. None (default): the default of the
        regularizer (``DEFAULT_ALPHA``: 0.1 for tikhonov, 0.5 for huber, whose penalty is weaker at
        edges). "auto": chosen by cross-validation over held-out slices on a probe block
        (``autotune.choose_alpha``; opt-in, see the README for where it under-regularises).
    regularizer : {"huber", "tikhonov"}
        First-order Tikhonov (smooth gradient; the default: it beat Huber on the real-anatomy cases of
        the realistic panel and is more forgiving when the stacks are not quite aligned) or Huber on the
        gradient magnitude (edge-preserving: better on piecewise-constant, hard-edged objects).
    psf : {"auto", "gaussian", "box"}
        Through-plane slice profile. "auto" (default): per stack, box or Gaussian and a width factor
        around the nominal thickness, whichever predicts that stack best from a reconstruction of the
        others on a probe block (``autotune.choose_profile``). "gaussian": FWHM = slice thickness;
        "box": the slice thickness (slab-averaged MPR reformats). In-plane: Gaussian, FWHM 1.2 x pixel spacing.
    max_iterations : int or None
        Cap on conjugate-gradient iterations (Huber: in total over the outer iterations). None: the
        regularizer's default (``DEFAULT_ITERATIONS``: 100, a cap; the solvers stop on ``tolerance`` and
        ``solution_tolerance`` long before).
    tolerance : float
        Stop when the relative residual ``||b - H x|| / ||b||`` of the normal equations falls below it.
    intensity_matching : bool or None
        Per-stack linear intensity matching against stack 0. None (auto): off when every stack is CT
        (Hounsfield units are calibrated, a fit between differently blurred series would only add
        bias), on otherwise (MR intensities are arbitrary per series).
    huber_delta : float
        Huber threshold on the gradient magnitude, normalised intensity per mm: gradients above it
        (edges) are penalised linearly instead of quadratically.
    outer_iterations : int
        Huber: number of reweightings (default 4); the CG iterations are split evenly between them.
    edge_scale_mm : float
        Huber: sigma (mm) of the Gaussian through which the gradient is measured for the weights, so
        that pixel noise on a fine grid does not count as an edge; 0 gives plain Huber IRLS.
    background_value : float or None
        Value of voxels no stack covers; None: -1024 for CT, else 0.
    disagreement_threshold : float
        Stacks whose best low-resolution correlation with any other stack is below this are reported
        as disagreeing (info["disagreeing_stacks"]) with a warning. Measured on the phantom: series of
        one head correlate at 0.99+ (the real Philips series 0.993 even 1 mm apart); a 10 mm
        misplacement gives 0.6-0.85, 20 mm 0.3-0.6. 0.75 flags what registration has not fixed.
    exclude_disagreeing : bool
        Leave disagreeing stacks out of the reconstruction (default). Stack 0, the reference, is never
        left out. False: use them anyway (still reported).
    clip_to_input_range : bool
        Clip the result to the range of the input intensities (removes faint overshoot at edges).
    threads : int or None
        Threads the operators and the solver split their work between; None: the CPUs available (at
        most 8). The result does not depend on it beyond float32 round-off (sums run in another order).
    """

    alpha: Union[float, str, None] = None
    regularizer: str = DEFAULT_REGULARIZER
    psf: str = "auto"
    max_iterations: Optional[int] = None
    tolerance: float = 3e-4
    solution_tolerance: float = DEFAULT_SOLUTION_TOLERANCE
    intensity_matching: Optional[bool] = None
    huber_delta: float = DEFAULT_HUBER_DELTA
    outer_iterations: int = DEFAULT_OUTER_ITERATIONS
    edge_scale_mm: float = DEFAULT_EDGE_SCALE_MM
    background_value: Optional[float] = None
    disagreement_threshold: float = 0.75
    exclude_disagreeing: bool = True
    clip_to_input_range: bool = True
    threads: Optional[int] = None
    self_check: bool = True
    probe_block_voxels: int = autotune.DEFAULT_BLOCK_VOXELS
    stack_profiles: Optional[Tuple[SliceProfile, ...]] = None

    @property
    def alpha_is_auto(self):
        return isinstance(self.alpha, str)

    @property
    def effective_alpha(self):
        """``alpha``, or the regularizer's fixed default when it is None or "auto" (the value the
        automatic choice starts from and falls back to)."""
        if self.alpha is None or isinstance(self.alpha, str):
            return DEFAULT_ALPHA[self.regularizer]
        return float(self.alpha)

    @property
    def effective_iterations(self):
        """``max_iterations``, or the regularizer's default when it is None."""
        if self.max_iterations is None:
            return DEFAULT_ITERATIONS[self.regularizer]
        return int(self.max_iterations)

    def validate(self):
        if self.regularizer not in REGULARIZERS:
            raise InputError(f"unknown regularizer '{self.regularizer}' (use {' or '.join(REGULARIZERS)})")
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise InputError(f"alpha must be 'auto' or a non-negative number, got '{self.alpha}'")
        elif self.alpha is not None and not (self.alpha >= 0 and np.isfinite(self.alpha)):
            raise InputError(f"alpha must be 'auto' or a non-negative number, got {self.alpha}")
        validate_psf(self.psf)
        if not (self.solution_tolerance >= 0 and np.isfinite(self.solution_tolerance)):
            raise InputError(f"solution tolerance must be a non-negative number, got {self.solution_tolerance}")
        if int(self.probe_block_voxels) < 16:
            raise InputError(f"probe block must be at least 16 voxels a side, got {self.probe_block_voxels}")
        if self.max_iterations is not None and int(self.max_iterations) < 0:
            raise InputError(f"iterations must be >= 0, got {self.max_iterations}")
        if not self.tolerance > 0:
            raise InputError(f"tolerance must be positive, got {self.tolerance}")
        if not self.huber_delta > 0:
            raise InputError(f"huber delta must be positive, got {self.huber_delta}")
        if int(self.outer_iterations) < 1:
            raise InputError(f"outer iterations must be >= 1, got {self.outer_iterations}")
        if self.threads is not None and int(self.threads) < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if not (self.edge_scale_mm >= 0 and np.isfinite(self.edge_scale_mm)):
            raise InputError(f"edge scale must be a non-negative length in mm, got {self.edge_scale_mm}")


@dataclass
class SrrResult:
    """``volume``: float32 [k, j, i] on the grid in input units (background where no stack covers);
    ``coverage``: uint8 count of the stacks used that cover each voxel; ``info``: a JSON-able summary."""

    volume: np.ndarray
    coverage: np.ndarray
    info: dict
    profiles: tuple = ()


def _default_background(stacks):
    from .average import default_background

    return default_background(stacks)


def _robust_range(stacks, offset, max_samples=500_000):
    """Robust intensity span of the inputs above ``offset`` (99.5th percentile), for normalisation."""
    rng = np.random.default_rng(0)
    parts = []
    total = sum(s.pixels.size for s in stacks)
    for s in stacks:
        flat = s.pixels.reshape(-1)
        take = max(1, int(max_samples * flat.size / max(total, 1)))
        parts.append(flat[rng.integers(0, flat.size, take)] if flat.size > take else flat)
    v = np.concatenate(parts).astype(np.float64)
    hi = float(np.percentile(v, 99.5))
    lo = float(np.percentile(v, 0.5))
    span = max(hi - offset, hi - lo)
    return span if span > 0 else 1.0


def _sample_volume_mm3(stack):
    di, dj = stack.pixel_spacing_mm
    step = stack.slice_step_mm if stack.shape[0] > 1 else stack.thickness_mm
    return di * dj * step


def _normalised_rows(b, row_sums, out, k0, k1):
    """Rows k0:k1 of ``b / row_sums`` (the PSF-weighted average) into ``out``."""
    np.divide(b[k0:k1], np.maximum(row_sums[k0:k1], np.float32(1e-6)), out=out[k0:k1])


def reconstruct_srr(stacks, grid, options=None, initial=None, coverage=None, monitor=None):
    """Super-resolution reconstruction of ``stacks`` on ``grid``.

    Parameters
    ----------
    stacks : list of Stack
        Any number (>= 1) in any orientation, with their registration ``transform``.
    grid : Grid
    options : SrrOptions, optional
    initial : ndarray, float32, shape grid.shape, optional
        Start of the iterations in input units (e.g. a previous result, or the average fusion). When not
        given (what the pipeline does), the PSF-weighted average of the stacks is used (free: it falls out
        of the right-hand side).
    coverage : ndarray, uint8, shape grid.shape, optional
        Stacks covering each voxel (comes with ``initial`` from the average fusion); computed from the
        stacks' geometry when not given or when a stack was left out, and then a stack that covers no
        voxel is an InputError.
    monitor : progress.Monitor, optional
        ``report("reconstruct", fraction)`` every iteration; raises CancelledError when cancelled.

    Returns
    -------
    SrrResult
    """
    options = options or SrrOptions()
    options.validate()
    with Workers(options.threads) as workers:
        return _reconstruct(stacks, grid, options, initial, coverage, monitor, workers)


def _reconstruct(stacks, grid, options, initial, coverage, monitor, workers):
    monitor = Monitor.wrap(monitor)
    stacks = list(stacks)
    if not stacks:
        raise InputError("no stacks to reconstruct")
    timings = {}
    t_all = time.perf_counter()
    background = options.background_value
    if background is None:
        background = _default_background(stacks)
    all_ct = all(s.modality == "CT" for s in stacks)
    match = (not all_ct) if options.intensity_matching is None else bool(options.intensity_matching)
    monitor.report("reconstruct", 0.0)

    # 1. Agreement between stacks, intensity matching.
    t0 = time.perf_counter()
    # the coarse comparison does not depend on the profile (smoothed beyond any slice profile)
    psf0 = "gaussian" if options.psf == "auto" else options.psf
    rep = compare_stacks(stacks, grid, match, options.disagreement_threshold, psf0, 0, monitor, workers)
    timings["intensity_s"] = time.perf_counter() - t0
    used = list(range(len(stacks)))
    if rep.disagreeing:
        names = ", ".join(f"{k} ('{stacks[k].description}', r={rep.correlation[k]:.2f})" for k in rep.disagreeing)
        action = "left out" if options.exclude_disagreeing else "used anyway"
        LOGGER.warning("stacks disagreeing with the others after intensity matching: %s; %s", names, action)
        if options.exclude_disagreeing:
            used = [k for k in used if k == 0 or k not in rep.disagreeing]
    work = []
    for k in used:
        s = stacks[k]
        if match and (rep.scale[k] != 1.0 or rep.offset[k] != 0.0):
            px = s.pixels * np.float32(rep.scale[k]) + np.float32(rep.offset[k])
            s = replace(s, pixels=px)
        work.append(s)
    monitor.report("reconstruct", 0.02)
    offset = float(background)
    scale = _robust_range(work, offset)

    # 1b. Settings from the data (slice profiles, weight) on a probe block; see autotune.py.
    alpha = options.effective_alpha
    if options.stack_profiles is not None:
        if len(options.stack_profiles) != len(stacks):
            raise InputError(f"stack profiles: {len(options.stack_profiles)} given for {len(stacks)} stacks")
        profiles = [options.stack_profiles[k] for k in used]
    elif options.psf == "auto":
        profiles = [SliceProfile("gaussian")] * len(work)
    else:
        profiles = [SliceProfile(options.psf)] * len(work)
    auto = {"profile_choice": None, "alpha_choice": None}
    probe = None
    want_profiles = options.psf == "auto" and options.stack_profiles is None and len(work) > 1
    if want_profiles or options.alpha_is_auto or (options.self_check and len(work) > 1):
        t0 = time.perf_counter()
        probe = _probe(work, grid, offset, scale, options, workers)
        timings["probe_setup_s"] = time.perf_counter() - t0
    if probe is not None and want_profiles:
        t0 = time.perf_counter()
        found, report = autotune.estimate_profiles(probe.problem, [profiles[k] for k in probe.index], PSF_KINDS)
        for n, k in enumerate(probe.index):
            profiles[k] = found[n]
        dt = time.perf_counter() - t0
        timings["profile_choice_s"] = dt
        auto["profile_choice"] = {"method": "leave-one-stack-out prediction on the probe block",
                                  "rms_by_candidate": [None] * len(stacks), "seconds": round(dt, 3)}
        for n, k in enumerate(probe.index):
            auto["profile_choice"]["rms_by_candidate"][used[k]] = report[n]
        monitor.check()
    for s, p in zip(work, profiles):
        LOGGER.info("SRR slice profile of '%s': %s, width %.2f mm (nominal thickness %.2f mm)%s", s.description,
                    p.kind, p.width_mm(s), s.thickness_mm, " (chosen from the data)" if want_profiles else "")
    if probe is not None and options.alpha_is_auto:
        t0 = time.perf_counter()
        alpha, cv, cv_se = autotune.choose_alpha(probe.problem, [profiles[k] for k in probe.index], options.regularizer,
                                          _huber_args(options))
        dt = time.perf_counter() - t0
        timings["alpha_choice_s"] = dt
        auto["alpha_choice"] = {"method": f"{autotune.CV_FOLDS}-fold cross-validation over held-out slices on the "
                                          "probe block, one-standard-error rule", "cv_rms_by_alpha": cv,
                                "cv_mse_standard_error_by_alpha": cv_se, "seconds": round(dt, 3)}
        LOGGER.info("SRR weight alpha %.4g chosen by cross-validation over held-out slices (%.1f s; CV error by "
                    "alpha: %s)", alpha, dt, ", ".join(f"{a:g}: {v:.2f}" for a, v in cv.items()))
        monitor.check()
    monitor.report("reconstruct", 0.04)

    # 2. Operators.
    t0 = time.perf_counter()
    ops = []
    for s, p in zip(work, profiles):
        ops.append(make_operator(p.apply(s), grid, p.kind))
        monitor.check()
    timings["operators_s"] = time.perf_counter() - t0
    for s, op in zip(work, ops):
        LOGGER.info("SRR operator for '%s': %s path", s.description, op.path)
    monitor.report("reconstruct", 0.05)

    # Coverage (and the check that every stack reaches the grid) before any grid-sized work.
    t0 = time.perf_counter()
    if coverage is None or len(used) != len(stacks):
        coverage = np.zeros(grid.shape, dtype=np.uint8)
        for k, op in zip(used, ops):
            covered = op.coverage()
            if not covered.any():
                s = stacks[k]
                raise InputError(f"stack '{s.description}' ({s.source}) does not overlap the reconstruction grid")
            coverage += covered
            del covered
    coverage = np.asarray(coverage, dtype=np.uint8)
    if coverage.shape != tuple(grid.shape):
        raise InputError(f"coverage has shape {coverage.shape}, the grid {tuple(grid.shape)}")
    if not coverage.any():
        raise InputError("no stack covers the reconstruction grid")
    timings["coverage_s"] = time.perf_counter() - t0

    # 3. Normalised data, right-hand side b = sum c_k A_k^T y_k and row sums sum c_k A_k^T 1.
    t0 = time.perf_counter()
    inv = np.float32(1.0 / scale)
    grid_voxel = float(np.prod(grid.spacing_mm))
    c = [_sample_volume_mm3(s) / grid_voxel for s in work]
    b = np.zeros(grid.shape, dtype=np.float32)
    row_sums = np.zeros(grid.shape, dtype=np.float32)
    scratch = Scratch()  # reusable work memory for the operators and the solver
    for s, op, ck in zip(work, ops, c):
        y = np.subtract(s.pixels, np.float32(offset))
        y *= np.float32(inv * ck)
        y[~op.valid] = 0.0
        op.adjoint_add(y, b, workers, scratch)
        del y
        op.adjoint_ones(out=row_sums, scale=ck, workers=workers)
        monitor.check()
    timings["setup_s"] = time.perf_counter() - t0
    monitor.report("reconstruct", 0.08)

    # 4. Start.
    t0 = time.perf_counter()
    if initial is not None:
        x = np.array(initial, dtype=np.float32, copy=True)
        if x.shape != tuple(grid.shape):
            raise InputError(f"initial volume has shape {x.shape}, the grid {tuple(grid.shape)}")
        x -= np.float32(offset)
        x *= inv
        start = "given"
    else:
        # The PSF-weighted average of the stacks (normalised back-projection, the "Gaussian
        # reconstruction" of SVRTK): an average fusion at no extra cost; CG converges from it as fast
        # as from the linear-interpolation average (measured by benchmarks/bench_srr.py).
        x = np.empty(grid.shape, dtype=np.float32)
        row_slabs(workers, grid.shape, partial(_normalised_rows, b, row_sums, x))
        start = "psf-weighted average"

    def outside_slab(k0, k1):  # slab by slab: no grid-sized mask
        x[k0:k1][coverage[k0:k1] == 0] = 0.0

    row_slabs(workers, grid.shape, outside_slab)
    timings["initial_s"] = time.perf_counter() - t0
    monitor.report("reconstruct", 0.1)

    # 5. Solve.
    t0 = time.perf_counter()
    spacing_kji = tuple(float(v) for v in grid.spacing_mm[::-1])
    system = NormalEquations(ops, c, alpha, spacing_kji, row_sums, workers, scratch)
    n_iter = max(1, options.effective_iterations)

    def report(it, rel):
        monitor.report("reconstruct", 0.1 + 0.85 * min(1.0, it / n_iter))

    if options.regularizer == "huber":
        solve_info = solve_huber(
            system, b, x, options.huber_delta, options.outer_iterations, options.effective_iterations,
            options.tolerance, report, options.edge_scale_mm, solution_tolerance=options.solution_tolerance,
        )
    else:
        solve_info = solve_tikhonov(system, b, x, options.effective_iterations, options.tolerance, report,
                                    overwrite=True, solution_tolerance=options.solution_tolerance)
    del system, b, row_sums
    timings["solve_s"] = time.perf_counter() - t0

    # 6. Back to input units, in one slab pass.
    lo = min(float(s.pixels.min()) for s in work) if options.clip_to_input_range else None
    hi = max(float(s.pixels.max()) for s in work) if options.clip_to_input_range else None

    def finish_slab(k0, k1):
        xs = x[k0:k1]
        xs *= np.float32(scale)
        xs += np.float32(offset)
        if lo is not None:
            np.clip(xs, lo, hi, out=xs)
        xs[coverage[k0:k1] == 0] = np.float32(background)

    row_slabs(workers, grid.shape, finish_slab)

    # 7. Self-check: does the fusion predict each stack better than the best single other series?
    check = None
    if probe is not None and options.self_check and len(probe.index) > 1:
        t0 = time.perf_counter()
        # with profiles chosen from the data, the leave-one-out fusions made for that choice are reused
        per = autotune.self_check(probe.problem, [profiles[k] for k in probe.index], alpha, options.regularizer,
                                  _huber_args(options), reuse=want_profiles)
        check = _self_check_summary(per, probe, used, stacks, time.perf_counter() - t0)
        timings["self_check_s"] = time.perf_counter() - t0
    monitor.report("reconstruct", 1.0)
    timings["total_s"] = time.perf_counter() - t_all
    info = {
        "method": "srr",
        "iterations": int(solve_info["iterations"]),
        "relative_residual": float(solve_info["relative_residual"]),
        "initial_relative_residual": float(solve_info["initial_relative_residual"]),
        "residual_history": [float(v) for v in solve_info["history"]],
        "alpha": float(alpha),
        "alpha_setting": options.alpha if options.alpha_is_auto else "fixed",
        "regularizer": options.regularizer,
        "psf": options.psf,
        "slice_profiles": [None] * len(stacks),
        "stopped_by": solve_info.get("stopped"),
        "relative_change": solve_info.get("relative_change"),
        "solution_tolerance": float(options.solution_tolerance),
        "profile_choice": auto["profile_choice"],
        "alpha_choice": auto["alpha_choice"],
        "probe_block": None if probe is None else probe.summary(),
        "self_check": check,
        "fusion_beats_single_series": None if check is None else check["fusion_beats_single_series"],
        "huber_delta": float(options.huber_delta) if options.regularizer == "huber" else None,
        "edge_scale_mm": float(options.edge_scale_mm) if options.regularizer == "huber" else None,
        "max_iterations": options.effective_iterations,
        "background_value": float(background),
        "initial": start,
        "normalisation": {"offset": offset, "scale": float(scale)},
        "operator_paths": [None] * len(stacks),
        "data_weights": [None] * len(stacks),
        "intensity_matching": bool(match),
        "intensity_scale": [float(v) for v in rep.scale],
        "intensity_offset": [float(v) for v in rep.offset],
        "stack_correlation": [None if v is None else round(float(v), 4) for v in rep.correlation],
        "disagreeing_stacks": [int(k) for k in rep.disagreeing],
        "stacks_used": [int(k) for k in used],
        "options": asdict(options),
        "threads": workers.n_threads,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    for k, op, ck, s, p in zip(used, ops, c, work, profiles):
        info["operator_paths"][k] = op.path
        info["data_weights"][k] = round(float(ck), 6)
        info["slice_profiles"][k] = p.as_dict(s)
    info["options"]["stack_profiles"] = None if options.stack_profiles is None else [
        p.as_dict() for p in options.stack_profiles]
    LOGGER.info(
        "SRR done: %d iterations, relative residual %.3g, %.1f s", info["iterations"], info["relative_residual"],
        timings["total_s"],
    )
    return SrrResult(volume=x, coverage=coverage, info=info, profiles=tuple(_all_profiles(profiles, used, stacks)))


def _all_profiles(profiles, used, stacks):
    out = [SliceProfile("gaussian")] * len(stacks)
    for k, p in zip(used, profiles):
        out[k] = p
    return out


def _huber_args(options):
    return (options.huber_delta, options.edge_scale_mm, options.outer_iterations)


class _Probe:
    def __init__(self, problem, index, offset):
        self.problem = problem
        self.index = index  # positions in the work list of the stacks that reach the block
        self.offset = offset

    def summary(self):
        g = self.problem.grid
        return {"shape": list(g.shape), "origin_index_kji": list(self.offset),
                "origin_mm": [round(float(v), 3) for v in g.origin_mm], "stacks": len(self.index),
                "solves": self.problem.n_solves, "cg_iterations": self.problem.n_iterations}


def _probe(work, grid, offset, scale, options, workers):
    """The probe block and the stacks cropped to it (None when fewer than one stack reaches it)."""
    block, lo = autotune.choose_block(work, grid, options.probe_block_voxels)
    t_max = max(s.thickness_mm for s in work) * max(WIDTH_FACTORS)
    # scored samples stay a profile's reach (3 sigma of the widest Gaussian) inside the block's faces
    margin = 3.0 * t_max / 2.3548 * 0.5 + float(max(grid.spacing_mm))
    cropped, index = [], []
    for n, s in enumerate(work):
        c = autotune.crop_stack(s, block, 1.5 * t_max)
        if c is not None:
            cropped.append(c)
            index.append(n)
    if not cropped:
        return None
    problem = autotune.BlockProblem(cropped, block, autotune.Normalisation(offset, scale), margin, workers)
    return _Probe(problem, index, lo)


def _self_check_summary(per, probe, used, stacks, seconds):
    rows = [None] * len(stacks)
    failing = []
    for n, r in zip(probe.index, per):
        k = used[n]
        if r is None:
            continue
        if r.get("best_single") is not None:
            r["best_single"] = int(used[probe.index[r["best_single"]]])
            r["single_series_rms"] = {int(used[probe.index[i]]): v for i, v in r["single_series_rms"].items()}
        rows[k] = r
        name = stacks[k].description or f"stack {k}"
        if r["fusion_beats_best_single"] is False:
            failing.append(k)
            LOGGER.warning("SRR self-check: the fusion of the other stacks predicts '%s' WORSE than the single series "
                           "'%s' alone (RMS %.1f against %.1f): check the registration and the inputs; the result may "
                           "be worse than one series", name, stacks[r["best_single"]].description,
                           r["fusion_rms_where_best_single_covers"], r["best_single_rms"])
        elif r["fusion_beats_best_single"]:
            LOGGER.info("SRR self-check '%s': predicted from the others with RMS %.1f, best single other series %.1f",
                        name, r["fusion_rms_where_best_single_covers"], r["best_single_rms"])
    judged = [r for r in rows if r is not None and r["fusion_beats_best_single"] is not None]
    return {
        "method": "leave-one-stack-out prediction on the probe block, against each other series alone (B-spline)",
        "per_stack": rows,
        "stacks_not_beating_single_series": failing,
        "fusion_beats_single_series": (not failing) if judged else None,
        "seconds": round(seconds, 3),
    }


# ------------------------------------------------------------------------------------------ command line
def add_srr_arguments(parser):
    """Add the SRR options to an argparse parser (``fuse``/``run``); see :func:`srr_options_from_args`."""
    g = parser.add_argument_group("super-resolution (--method srr)")
    g.add_argument("--alpha", default=None,
                   help="regularisation weight in mm^2 on normalised intensities, larger is smoother (default 0.1 "
                        "for tikhonov, 0.5 for huber); auto: chosen by cross-validation over held-out slices on a "
                        "probe block (experimental: it can under-regularise overlapping slices)")
    g.add_argument("--regularizer", choices=("huber", "tikhonov"), default=DEFAULT_REGULARIZER,
                   help=f"tikhonov (smooth gradient) or huber (edge-preserving); default {DEFAULT_REGULARIZER}")
    g.add_argument("--psf", default="auto",
                   help="through-plane slice profile: auto (default: box or gaussian and its width per stack, from the "
                        "consistency between the stacks), gaussian (FWHM = thickness) or box (slab MPR)")
    g.add_argument("--iterations", type=int, default=None,
                   help=f"cap on conjugate-gradient iterations in total (default {DEFAULT_ITERATIONS['tikhonov']}; the "
                        "solver stops earlier when converged, see --solution-tolerance)")
    g.add_argument("--tolerance", type=float, default=SrrOptions.tolerance,
                   help=f"stop at this relative residual of the normal equations (default {SrrOptions.tolerance:g})")
    g.add_argument("--solution-tolerance", type=float, default=DEFAULT_SOLUTION_TOLERANCE,
                   help="converged when an iteration changes the volume by less than this fraction "
                        f"(default {DEFAULT_SOLUTION_TOLERANCE:g})")
    g.add_argument("--no-self-check", action="store_true",
                   help="skip the check that the fusion predicts every stack better than any single other series")
    g.add_argument("--intensity-matching", choices=("auto", "on", "off"), default="auto",
                   help="per-stack linear intensity matching to the first stack: auto = off for CT, on otherwise")
    g.add_argument("--huber-delta", type=float, default=DEFAULT_HUBER_DELTA,
                   help=f"huber threshold on the gradient, normalised intensity per mm (default {DEFAULT_HUBER_DELTA})")
    g.add_argument("--edge-scale", type=float, default=DEFAULT_EDGE_SCALE_MM,
                   help="huber: sigma in mm of the Gaussian the edge test looks through, so noise on fine grids "
                        f"is not taken for edges (default {DEFAULT_EDGE_SCALE_MM:g}; 0 = plain Huber)")
    g.add_argument("--threads", type=int, default=None,
                   help="threads for the reconstruction (default: the CPUs available, at most 8)")
    g.add_argument("--keep-disagreeing", action="store_true",
                   help="use stacks that disagree with the others (they are left out by default)")
    return parser


def srr_options_from_args(args):
    """SrrOptions from parsed arguments (missing attributes keep their defaults)."""
    d = SrrOptions()
    matching = {"auto": None, "on": True, "off": False}[getattr(args, "intensity_matching", "auto") or "auto"]
    opts = SrrOptions(
        alpha=parse_alpha(getattr(args, "alpha", d.alpha)),
        regularizer=getattr(args, "regularizer", d.regularizer),
        psf=getattr(args, "psf", d.psf),
        max_iterations=getattr(args, "iterations", d.max_iterations),
        tolerance=getattr(args, "tolerance", d.tolerance),
        intensity_matching=matching,
        huber_delta=getattr(args, "huber_delta", d.huber_delta),
        edge_scale_mm=getattr(args, "edge_scale", d.edge_scale_mm),
        exclude_disagreeing=not getattr(args, "keep_disagreeing", False),
        threads=getattr(args, "threads", d.threads),
        solution_tolerance=getattr(args, "solution_tolerance", d.solution_tolerance),
        self_check=not getattr(args, "no_self_check", False),
    )
    opts.validate()
    return opts


def parse_alpha(value):
    """``--alpha``: "auto", a number, or None; an InputError naming the setting otherwise."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--alpha must be 'auto' or a non-negative number, got '{value}'") from None


__all__ = ["SrrOptions", "SrrResult", "add_srr_arguments", "reconstruct_srr", "srr_options_from_args"]
