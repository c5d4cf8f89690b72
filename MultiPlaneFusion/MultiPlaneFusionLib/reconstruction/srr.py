"""Super-resolution reconstruction (SRR): one sharp volume from thick-slice stacks in several planes.

Every stack k is modelled as ``y_k = A_k x`` (:mod:`.operators`: registration, slice-profile PSF,
sampling at the pixel centres) and the volume is

    x = argmin  sum_k c_k ||A_k x - y_k||^2 + alpha R(x)

with c_k = (stack voxel volume) / (grid voxel volume), so that every stack weighs the same per unit of
volume whatever its resolution and both terms approximate integrals over the volume: alpha is then a squared
length (mm^2) and does not change with the grid spacing. Intensities are normalised internally ((value -
background) / robust range), which makes alpha and the Huber delta scale-invariant. R is the hybrid (the
default: first-order Tikhonov at alpha plus Huber at ``huber_alpha`` with its own lower threshold, one
reweighted penalty, see :func:`.penalty.hybrid_split`), first-order Tikhonov (conjugate gradients on the
normal equations, started from the PSF-weighted average of the stacks) or Huber on the gradient magnitude
(edge-preserving); the two reweighted ones by iteratively reweighted least squares, each step warm-started
conjugate-gradient iterations; see :mod:`.solvers`. The hybrid beat Tikhonov on the realistic panel and on
the real series on the full grid; Huber alone keeps hard edges sharper on piecewise-constant objects such as
the analytic phantom, and the thick slices' steps with them (figures in the README).

Use :func:`reconstruct_srr`; :class:`.options.SrrOptions` holds the settings (and
:func:`.options.add_srr_arguments` their command-line flags). The steps: agreement between the stacks and
intensity matching (:mod:`.intensity`), settings from the data on a probe block (:mod:`.autotune`), the
stacks' operators (:mod:`.operators`), the normal equations and their solution (:mod:`.solvers`), and the
self-check.
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np

from ..errors import InputError
from ..progress import Monitor
from ..sampling.psf import PSF_KINDS, WIDTH_FACTORS, SliceProfile, nominal_profile
from . import autotune
from .average import default_background
from .intensity import compare_stacks
from .operators import make_operator
from .options import SrrOptions
from .parallel import Workers, row_slabs
from .solvers import NormalEquations, data_weights, penalty_weight, solve_huber, solve_tikhonov
from .workspace import Scratch

LOGGER = logging.getLogger("MultiPlaneFusionLib")


@dataclass
class SrrResult:
    """``volume``: float32 [k, j, i] on the grid in input units (background where no stack covers);
    ``coverage``: uint8 count of the stacks used that cover each voxel; ``info``: a JSON-able summary."""

    volume: np.ndarray
    coverage: np.ndarray
    info: dict
    profiles: tuple = ()


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
    options.validate()  # again: the settings may have been changed since the options were made
    with Workers(options.threads) as workers:
        return _reconstruct(stacks, grid, options, initial=initial, coverage=coverage, monitor=monitor,
                            workers=workers)


def _reconstruct(stacks, grid, options, *, initial, coverage, monitor, workers):
    monitor = Monitor.wrap(monitor)
    stacks = list(stacks)
    if not stacks:
        raise InputError("no stacks to reconstruct")
    run = _Run(stacks=stacks, grid=grid, options=options, monitor=monitor, workers=workers)
    run.background = default_background(stacks) if options.background_value is None else options.background_value
    monitor.report("reconstruct", 0.0)
    _agree_and_match(run)
    monitor.report("reconstruct", 0.02)
    run.offset = float(run.background)
    run.scale = _robust_range(run.work, run.offset)
    _settings_from_data(run)
    monitor.report("reconstruct", 0.04)
    _make_operators(run)
    monitor.report("reconstruct", 0.05)
    run.coverage = _coverage(run, coverage)
    b, row_sums = _right_hand_side(run)
    monitor.report("reconstruct", 0.08)
    x = _start(run, b, row_sums, initial)
    monitor.report("reconstruct", 0.1)
    run.solve_info = _solve(run, b, row_sums, x)
    del b, row_sums
    _to_input_units(run, x)
    run.check = _run_self_check(run)
    monitor.report("reconstruct", 1.0)
    run.timings["total_s"] = time.perf_counter() - run.t_start
    info = _summary(run)
    LOGGER.info("SRR done: %s alpha %.4g%s, %d iterations, relative residual %.3g, %.1f s", info["regularizer"],
                info["alpha"], " (chosen from the data)" if info["prior_choice"] else "", info["iterations"],
                info["relative_residual"], run.timings["total_s"])
    return SrrResult(volume=x, coverage=run.coverage, info=info,
                     profiles=tuple(_all_profiles(run.profiles, run.used, stacks)))


class _Run:
    """What the steps of one reconstruction hand on to each other (stacks ``used``: indices into ``stacks``;
    ``work``, ``profiles``, ``ops``, ``weights``: one per used stack)."""

    def __init__(self, *, stacks, grid, options, monitor, workers):
        self.stacks, self.grid, self.options, self.monitor, self.workers = stacks, grid, options, monitor, workers
        self.timings = {}
        self.t_start = time.perf_counter()
        self.background = None
        self.agreement = None  # intensity.IntensityReport
        self.match = False
        self.used, self.work = [], []
        self.offset, self.scale = 0.0, 1.0  # normalisation: (value - offset) / scale
        self.profiles, self.alpha, self.probe = [], None, None
        self.profiles_from_data = False
        self.auto = {"profile_choice": None, "in_plane_choice": None, "alpha_choice": None, "prior_choice": None}
        self.regularizer_setting = options.regularizer  # "auto" until the prior is chosen
        self.ops, self.weights = [], []
        self.coverage = None
        self.scratch = Scratch()  # reusable work memory for the operators and the solver
        self.start = None
        self.solve_info = None
        self.check = None

    def timed(self, key, t0):
        self.timings[key] = time.perf_counter() - t0


def _agree_and_match(run):
    """Agreement between the stacks (disagreeing ones left out) and per-stack intensity matching."""
    stacks, options = run.stacks, run.options
    all_ct = all(s.modality == "CT" for s in stacks)
    run.match = (not all_ct) if options.intensity_matching is None else bool(options.intensity_matching)
    t0 = time.perf_counter()
    # the coarse comparison does not depend on the profile (smoothed beyond any slice profile)
    psf0 = "gaussian" if options.psf == "auto" else options.psf
    rep = compare_stacks(stacks, run.grid, match=run.match, threshold=options.disagreement_threshold, psf=psf0,
                         reference=0, monitor=run.monitor, workers=run.workers)
    run.timed("intensity_s", t0)
    run.agreement = rep
    used = list(range(len(stacks)))
    if rep.disagreeing:
        names = ", ".join(f"{k} ('{stacks[k].description}', r={rep.correlation[k]:.2f})" for k in rep.disagreeing)
        action = "left out" if options.exclude_disagreeing else "used anyway"
        LOGGER.warning("stacks disagreeing with the others after intensity matching: %s; %s", names, action)
        if options.exclude_disagreeing:
            used = [k for k in used if k == 0 or k not in rep.disagreeing]
    run.used = used
    for k in used:
        s = stacks[k]
        if run.match and (rep.scale[k] != 1.0 or rep.offset[k] != 0.0):
            px = s.pixels * np.float32(rep.scale[k]) + np.float32(rep.offset[k])
            s = replace(s, pixels=px)
        run.work.append(s)


def _settings_from_data(run):
    """Slice profiles and weight: given, or measured on a probe block (see autotune.py)."""
    options, work = run.options, run.work
    run.alpha = options.effective_alpha
    if options.stack_profiles is not None:
        if len(options.stack_profiles) != len(run.stacks):
            raise InputError(f"stack profiles: {len(options.stack_profiles)} given for {len(run.stacks)} stacks")
        run.profiles = [options.stack_profiles[k] for k in run.used]
    elif options.psf == "auto":
        # the start of the estimate, and what stays where the data cannot measure the profile
        run.profiles = [nominal_profile(s) for s in work]
    else:
        run.profiles = [SliceProfile(options.psf)] * len(work)
    if options.stack_profiles is None and options.in_plane_psf is not None and not options.in_plane_is_auto:
        run.profiles = [p.with_in_plane(options.in_plane_psf) for p in run.profiles]
    run.profiles_from_data = options.psf == "auto" and options.stack_profiles is None and len(work) > 1
    in_plane_from_data = options.in_plane_is_auto and options.stack_profiles is None and len(work) > 1
    prior_auto = options.regularizer == "auto"
    if (run.profiles_from_data or in_plane_from_data or options.alpha_is_auto or prior_auto
            or (options.self_check and len(work) > 1)):
        t0 = time.perf_counter()
        run.probe = _probe(work, run.grid, offset=run.offset, scale=run.scale, options=options, workers=run.workers,
                           check=run.monitor.check)
        run.timed("probe_setup_s", t0)
    if run.probe is not None and run.profiles_from_data:
        _choose_profiles(run)
    if run.probe is not None and in_plane_from_data and len(run.probe.index) > 1:
        _choose_in_plane(run)
    measured = (run.auto["profile_choice"] or {}).get("measured", [])
    for k, (s, p) in enumerate(zip(work, run.profiles)):
        how = ""
        if run.profiles_from_data:
            how = " (chosen from the data)" if run.used[k] < len(measured) and measured[run.used[k]] else \
                " (nominal: not measured)"
        LOGGER.info("SRR slice profile of '%s': %s, width %.2f mm (nominal thickness %.2f mm)%s; in-plane FWHM "
                    "%.2f x pixel%s", s.description, p.kind, p.width_mm(s), s.thickness_mm, how,
                    p.effective_in_plane_factor, " (chosen from the data)" if run.auto["in_plane_choice"] else "")
    if prior_auto:
        _choose_prior(run)
    elif run.probe is not None and options.alpha_is_auto:
        _choose_alpha(run)


def _choose_prior(run):
    """``regularizer="auto"``: regularizer and weight by held-out-slice CV on the probe block; ``run.options``
    then carries the chosen pair (what the solver, the self-check and the summary read). Tikhonov at its
    default weight when there is no probe block."""
    probe, options = run.probe, run.options
    if probe is None:
        run.options = replace(options, regularizer="tikhonov", alpha=None)
        run.alpha = run.options.effective_alpha
        return
    t0 = time.perf_counter()
    reg, alpha, rows = autotune.choose_prior(probe.problem, [run.profiles[k] for k in probe.index],
                                             huber=_huber_args(options))
    dt = time.perf_counter() - t0
    run.timings["prior_choice_s"] = dt
    run.options = replace(options, regularizer=reg, alpha=float(alpha))
    run.alpha = float(alpha)
    warning = None
    if reg == "huber" and alpha >= max(a for r, a in autotune.PRIOR_LADDER if r == "huber"):
        # measured on the real Philips series: Huber 1.5 flattened bone plates under 2 mm thick
        warning = (f"the prior chosen from the data is Huber at the largest weight tried ({alpha:g}): thin "
                   "structures (bone plates under ~2 mm) may be lost; compare with the default (--regularizer "
                   "tikhonov)")
        LOGGER.warning("SRR %s", warning)
    run.auto["prior_choice"] = {
        "method": f"{autotune.CV_FOLDS}-fold cross-validation over held-out slices on the probe block over "
                  "(regularizer, alpha) pairs; lowest held-out error, then the one-standard-error rule (standard "
                  "error of the paired differences over the same fold x stack units) along its regularizer's "
                  "weights",
        "regularizer": reg, "alpha": float(alpha), "cv_by_candidate": rows, "warning": warning,
        "seconds": round(dt, 3)}
    LOGGER.info("SRR prior %s, alpha %.4g chosen by cross-validation over held-out slices (%.1f s; CV error by "
                "candidate, excess over the best / its paired standard error: %s)", reg, alpha, dt,
                ", ".join(f"{r['regularizer']} {r['alpha']:g}: {r['cv_rms']:.2f} "
                          f"({r['cv_mse_excess']:.3g} / {r['cv_mse_standard_error']:.3g})" for r in rows))
    run.monitor.check()


def _choose_profiles(run):
    probe, profiles = run.probe, run.profiles
    t0 = time.perf_counter()
    found, report, ratios = autotune.estimate_profiles(probe.problem, [profiles[k] for k in probe.index],
                                                       PSF_KINDS)
    for n, k in enumerate(probe.index):
        profiles[k] = found[n]
    dt = time.perf_counter() - t0
    run.timings["profile_choice_s"] = dt
    choice = {"method": "leave-one-stack-out prediction on the probe block (fusion of the others at alpha "
                        f"{autotune.PROFILE_ALPHA:g}, re-blurred by their in-plane PSF; residual smoothed in-plane, "
                        f"sigma {autotune.PROFILE_SMOOTH_MM:g} mm), for stacks whose normal the others resolve "
                        f"(through-plane blur ratio <= {autotune.PROFILE_MAX_BLUR_RATIO:g}); the others keep the "
                        "nominal profile (box for sequenced CT, else Gaussian)",
              "rms_by_candidate": [None] * len(run.stacks), "through_plane_blur_ratio": [None] * len(run.stacks),
              "measured": [False] * len(run.stacks), "seconds": round(dt, 3)}
    for n, k in enumerate(probe.index):
        u = run.used[k]
        choice["rms_by_candidate"][u] = report[n]
        choice["through_plane_blur_ratio"][u] = round(ratios[n], 3) if math.isfinite(ratios[n]) else None
        choice["measured"][u] = report[n] is not None
        if ratios[n] > autotune.PROFILE_MAX_BLUR_RATIO:
            LOGGER.info("SRR slice profile of '%s' not measurable: no other stack resolves its slice normal (their "
                        "profiles blur it by %.2f of its own variance, limit %g); nominal %s kept (%s)",
                        run.work[k].description, ratios[n], autotune.PROFILE_MAX_BLUR_RATIO, found[n].kind,
                        f"{run.work[k].acquisition} CT" if run.work[k].acquisition else "acquisition unknown")
    run.auto["profile_choice"] = choice
    run.monitor.check()


def _choose_in_plane(run):
    """``in_plane_psf="auto"``: every used stack's in-plane width from the data (autotune.estimate_in_plane)."""
    probe, profiles = run.probe, run.profiles
    t0 = time.perf_counter()
    solves0 = probe.problem.n_solves
    found, report = autotune.estimate_in_plane(probe.problem, [profiles[k] for k in probe.index],
                                               score=autotune.IN_PLANE_SCORE)
    dt = time.perf_counter() - t0
    run.timings["in_plane_choice_s"] = dt
    if report is None:
        return
    for n, k in enumerate(probe.index):
        profiles[k] = found[n]
    # stacks that miss the probe block take the common width
    for k in range(len(profiles)):
        if k not in probe.index:
            profiles[k] = profiles[k].with_in_plane(report["common_factor"])
    per = [None] * len(run.stacks)
    for n, k in enumerate(probe.index):
        per[run.used[k]] = report["rms_by_own_factor"][n]
    run.auto["in_plane_choice"] = {
        "method": "leave-one-stack-out prediction on the probe block: common width under which the stacks predict "
                  "each other best, then per stack the width of its own that predicts it best from the others "
                  f"(fusion at alpha {autotune.PROFILE_ALPHA:g}; residual scored {autotune.IN_PLANE_SCORE})",
        "candidates": [float(f) for f in autotune.IN_PLANE_FACTORS],
        "own_candidates": [float(f) for f in autotune.IN_PLANE_OWN_FACTORS],
        "common_factor": report["common_factor"], "common_rms_by_factor": report["common_rms_by_factor"],
        "rms_by_own_factor": per, "solves": probe.problem.n_solves - solves0, "seconds": round(dt, 3)}
    LOGGER.info("SRR in-plane PSF from the data (%.1f s, %d block solves): common FWHM %.2f x pixel (RMS by "
                "candidate: %s)", dt, probe.problem.n_solves - solves0, report["common_factor"],
                ", ".join(f"{f}: {v:.2f}" for f, v in report["common_rms_by_factor"].items()))
    run.monitor.check()


def _choose_alpha(run):
    probe, options = run.probe, run.options
    t0 = time.perf_counter()
    run.alpha, cv, cv_se = autotune.choose_alpha(probe.problem, [run.profiles[k] for k in probe.index],
                                                 regularizer=options.regularizer, huber=_huber_args(options))
    dt = time.perf_counter() - t0
    run.timings["alpha_choice_s"] = dt
    run.auto["alpha_choice"] = {"method": f"{autotune.CV_FOLDS}-fold cross-validation over held-out slices on the "
                                          "probe block, one-standard-error rule", "cv_rms_by_alpha": cv,
                                "cv_mse_standard_error_by_alpha": cv_se, "seconds": round(dt, 3)}
    LOGGER.info("SRR weight alpha %.4g chosen by cross-validation over held-out slices (%.1f s; CV error by "
                "alpha: %s)", run.alpha, dt, ", ".join(f"{a:g}: {v:.2f}" for a, v in cv.items()))
    run.monitor.check()


def _make_operators(run):
    t0 = time.perf_counter()
    for s, p in zip(run.work, run.profiles):
        run.ops.append(make_operator(p.apply(s), run.grid, p.kind, workers=run.workers))
        run.monitor.check()
    run.timed("operators_s", t0)
    for s, op in zip(run.work, run.ops):
        axes = getattr(op, "pre_shear_axis_names", None)
        LOGGER.info("SRR operator for '%s': %s path%s", s.description, op.path,
                    f" (grid pre-sheared along {axes})" if axes else "")


def _coverage(run, coverage):
    """Stacks covering each voxel (and the check that every stack reaches the grid), before any grid-sized work."""
    t0 = time.perf_counter()
    grid = run.grid
    if coverage is None or len(run.used) != len(run.stacks):
        coverage = np.zeros(grid.shape, dtype=np.uint8)
        for k, op in zip(run.used, run.ops):
            covered = op.coverage()
            if not covered.any():
                s = run.stacks[k]
                raise InputError(f"stack '{s.description}' ({s.source}) does not overlap the reconstruction grid")
            coverage += covered
            del covered
    coverage = np.asarray(coverage, dtype=np.uint8)
    if coverage.shape != tuple(grid.shape):
        raise InputError(f"coverage has shape {coverage.shape}, the grid {tuple(grid.shape)}")
    if not coverage.any():
        raise InputError("no stack covers the reconstruction grid")
    run.timed("coverage_s", t0)
    return coverage


def _right_hand_side(run):
    """Normalised data: ``b = sum c_k A_k^T y_k`` and the row sums ``sum c_k A_k^T 1``."""
    t0 = time.perf_counter()
    grid, workers = run.grid, run.workers
    inv = np.float32(1.0 / run.scale)
    run.weights = data_weights(run.work, grid)
    b = np.zeros(grid.shape, dtype=np.float32)
    row_sums = np.zeros(grid.shape, dtype=np.float32)
    for s, op, ck in zip(run.work, run.ops, run.weights):
        y = np.subtract(s.pixels, np.float32(run.offset))
        y *= np.float32(inv * ck)
        y[~op.valid] = 0.0
        op.adjoint_add(y, b, workers=workers, scratch=run.scratch)
        del y
        op.adjoint_ones(out=row_sums, scale=ck, workers=workers)
        run.monitor.check()
    run.timed("setup_s", t0)
    return b, row_sums


def _start(run, b, row_sums, initial):
    """The normalised start of the iterations, 0 where no stack covers."""
    t0 = time.perf_counter()
    grid, coverage = run.grid, run.coverage
    if initial is not None:
        x = np.array(initial, dtype=np.float32, copy=True)
        if x.shape != tuple(grid.shape):
            raise InputError(f"initial volume has shape {x.shape}, the grid {tuple(grid.shape)}")
        x -= np.float32(run.offset)
        x *= np.float32(1.0 / run.scale)
        run.start = "given"
    else:
        # The PSF-weighted average of the stacks (normalised back-projection, the "Gaussian
        # reconstruction" of SVRTK): an average fusion at no extra cost; CG converges from it as fast
        # as from the linear-interpolation average (measured by benchmarks/bench_srr.py).
        x = np.empty(grid.shape, dtype=np.float32)
        # Clipped to the inputs' range: near the grid's faces a voxel can be reached only by the negative lobes
        # of a pre-sheared stack's interpolation (row sums near zero or below), and the quotient there is noise.
        lo = min(float(np.min(s.pixels)) for s in run.work)
        hi = max(float(np.max(s.pixels)) for s in run.work)
        span = ((lo - run.offset) / run.scale, (hi - run.offset) / run.scale)
        row_slabs(run.workers, grid.shape, partial(_normalised_rows, b, row_sums, x, span))
        run.start = "psf-weighted average"

    def outside_slab(k0, k1):  # slab by slab: no grid-sized mask
        x[k0:k1][coverage[k0:k1] == 0] = 0.0

    row_slabs(run.workers, grid.shape, outside_slab)
    run.timed("initial_s", t0)
    return x


def _solve(run, b, row_sums, x):
    """The normal equations solved in place in ``x`` (``b`` and ``row_sums`` are used up)."""
    t0 = time.perf_counter()
    options = run.options
    spacing_kji = tuple(float(v) for v in run.grid.spacing_mm[::-1])
    weight, floor = penalty_weight(options.regularizer, run.alpha, options.effective_huber_alpha)
    system = NormalEquations(run.ops, run.weights, weight, spacing_kji, row_sums, workers=run.workers,
                             scratch=run.scratch)
    n_iter = max(1, options.effective_iterations)

    def report(it, rel):
        run.monitor.report("reconstruct", 0.1 + 0.85 * min(1.0, it / n_iter))

    if options.edge_preserving:
        info = solve_huber(system, b, x, options.effective_huber_delta, outer_iterations=options.outer_iterations,
                           max_iterations=options.effective_iterations, tolerance=options.tolerance, report=report,
                           edge_scale_mm=options.edge_scale_mm, solution_tolerance=options.solution_tolerance,
                           floor=floor)
    else:
        info = solve_tikhonov(system, b, x, max_iterations=options.effective_iterations, tolerance=options.tolerance,
                              report=report, overwrite=True, solution_tolerance=options.solution_tolerance)
    run.timed("solve_s", t0)
    return info


def _to_input_units(run, x):
    """Back to input units (clipped to the inputs' range when asked), background outside, in one slab pass."""
    clip = run.options.clip_to_input_range
    lo = min(float(s.pixels.min()) for s in run.work) if clip else None
    hi = max(float(s.pixels.max()) for s in run.work) if clip else None
    scale, offset, background, coverage = np.float32(run.scale), np.float32(run.offset), run.background, run.coverage

    def finish_slab(k0, k1):
        xs = x[k0:k1]
        xs *= scale
        xs += offset
        if lo is not None:
            np.clip(xs, lo, hi, out=xs)
        xs[coverage[k0:k1] == 0] = np.float32(background)

    row_slabs(run.workers, run.grid.shape, finish_slab)


def _run_self_check(run):
    """Does the fusion predict each stack better than the best single other series? None when not checked."""
    probe, options = run.probe, run.options
    if probe is None or not options.self_check or len(probe.index) <= 1:
        return None
    t0 = time.perf_counter()
    per = autotune.self_check(probe.problem, [run.profiles[k] for k in probe.index], run.alpha,
                              regularizer=options.regularizer, huber=_huber_args(options))
    check = _self_check_summary(per, probe, run.used, run.stacks, seconds=time.perf_counter() - t0)
    check["alpha"] = float(run.alpha)
    check["regularizer"] = options.regularizer
    run.timed("self_check_s", t0)
    return check


def _summary(run):
    """The JSON-able ``info`` of the result."""
    options, solve_info, rep, check, n = run.options, run.solve_info, run.agreement, run.check, len(run.stacks)
    huber = options.edge_preserving
    info = {
        "method": "srr",
        "iterations": int(solve_info["iterations"]),
        "relative_residual": float(solve_info["relative_residual"]),
        "initial_relative_residual": float(solve_info["initial_relative_residual"]),
        "residual_history": [float(v) for v in solve_info["history"]],
        "alpha": float(run.alpha),
        "alpha_setting": options.alpha if options.alpha_is_auto else (
            "auto" if run.regularizer_setting == "auto" else "fixed"),
        "regularizer": options.regularizer,
        "psf": options.psf,
        "in_plane_psf": options.in_plane_psf,
        "slice_profiles": [None] * n,
        "stopped_by": solve_info.get("stopped"),
        "relative_change": solve_info.get("relative_change"),
        "solution_tolerance": float(options.solution_tolerance),
        "profile_choice": run.auto["profile_choice"],
        "in_plane_choice": run.auto["in_plane_choice"],
        "alpha_choice": run.auto["alpha_choice"],
        "regularizer_setting": "auto" if run.regularizer_setting == "auto" else "fixed",
        "prior_choice": run.auto["prior_choice"],
        "probe_block": None if run.probe is None else run.probe.summary(),
        "self_check": check,
        "fusion_beats_single_series": None if check is None else check["fusion_beats_single_series"],
        "fusion_worse_than_single_series": None if check is None else check["fusion_worse_than_single_series"],
        "huber_delta": options.effective_huber_delta if huber else None,
        "edge_scale_mm": float(options.edge_scale_mm) if huber else None,
        "huber_alpha": options.effective_huber_alpha if options.regularizer == "hybrid" else None,
        "max_iterations": options.effective_iterations,
        "background_value": float(run.background),
        "initial": run.start,
        "normalisation": {"offset": run.offset, "scale": float(run.scale)},
        "operator_paths": [None] * n,
        "pre_shear_axes": [None] * n,  # the skew path's pre-sheared grid axes ("j", "ji", ...), None without
        "data_weights": [None] * n,
        "intensity_matching": bool(run.match),
        "intensity_scale": [float(v) for v in rep.scale],
        "intensity_offset": [float(v) for v in rep.offset],
        "stack_correlation": [None if v is None else round(float(v), 4) for v in rep.correlation],
        "disagreeing_stacks": [int(k) for k in rep.disagreeing],
        "stacks_used": [int(k) for k in run.used],
        "options": asdict(options),
        "threads": run.workers.n_threads,
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
    }
    for k, op, ck, s, p in zip(run.used, run.ops, run.weights, run.work, run.profiles):
        info["operator_paths"][k] = op.path
        info["pre_shear_axes"][k] = getattr(op, "pre_shear_axis_names", None)
        info["data_weights"][k] = round(float(ck), 6)
        info["slice_profiles"][k] = p.as_dict(s)
    info["options"]["stack_profiles"] = None if options.stack_profiles is None else [
        p.as_dict() for p in options.stack_profiles]
    return info


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


def _normalised_rows(b, row_sums, out, span, k0, k1):
    """Rows k0:k1 of ``b / row_sums`` (the PSF-weighted average), clipped to ``span``, into ``out``."""
    np.divide(b[k0:k1], np.maximum(row_sums[k0:k1], np.float32(1e-6)), out=out[k0:k1])
    np.clip(out[k0:k1], np.float32(span[0]), np.float32(span[1]), out=out[k0:k1])


def _all_profiles(profiles, used, stacks):
    out = [SliceProfile("gaussian")] * len(stacks)
    for k, p in zip(used, profiles):
        out[k] = p
    return out


def _huber_args(options):
    return (options.effective_huber_delta, options.edge_scale_mm, options.outer_iterations,
            options.effective_huber_alpha)


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


def _probe(work, grid, *, offset, scale, options, workers, check=None):
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
    problem = autotune.BlockProblem(cropped, block, autotune.Normalisation(offset, scale), margin_mm=margin,
                                    workers=workers, check=check)
    return _Probe(problem, index, lo)


def _self_check_summary(per, probe, used, stacks, *, seconds):
    rows = [None] * len(stacks)
    failing, worse = [], []
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
            single = stacks[r["best_single"]].description
            args = (name, single, r["fusion_rms_where_best_single_covers"], r["best_single_rms"],
                    100.0 * r["fusion_excess_over_best_single"])
            if r["verdict"] == "worse":
                worse.append(k)
                LOGGER.warning("SRR self-check: the fusion of the other stacks predicts '%s' WORSE than the single "
                               "series '%s' alone (RMS %.1f against %.1f, +%.1f %%): check the registration and the "
                               "inputs; the result may be worse than one series", *args)
            else:
                LOGGER.warning("SRR self-check: the fusion of the other stacks predicts '%s' no better than the single "
                               "series '%s' alone (RMS %.1f against %.1f, +%.1f %%, within %g %%): the other series "
                               "add nothing measurable there", *args, 100.0 * autotune.SELF_CHECK_TIE_FRACTION)
        elif r["fusion_beats_best_single"]:
            LOGGER.info("SRR self-check '%s': predicted from the others with RMS %.1f, best single other series %.1f",
                        name, r["fusion_rms_where_best_single_covers"], r["best_single_rms"])
    judged = [r for r in rows if r is not None and r["fusion_beats_best_single"] is not None]
    return {
        "method": "leave-one-stack-out prediction on the probe block with the final profiles, weight and "
                  "regularizer, against each other series alone (B-spline)",
        "per_stack": rows,
        "stacks_not_beating_single_series": failing,
        "stacks_worse_than_single_series": worse,
        "tie_fraction": autotune.SELF_CHECK_TIE_FRACTION,
        "fusion_beats_single_series": (not failing) if judged else None,
        "fusion_worse_than_single_series": bool(worse) if judged else None,
        "seconds": round(seconds, 3),
    }


__all__ = ["SrrResult", "reconstruct_srr"]
