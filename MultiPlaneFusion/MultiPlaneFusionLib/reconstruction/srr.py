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
from typing import Optional

import numpy as np

from ..errors import InputError
from ..progress import Monitor
from .intensity import compare_stacks
from .operators import Scratch, make_operator
from .parallel import Workers, row_slabs
from .solvers import NormalEquations, solve_huber, solve_tikhonov

LOGGER = logging.getLogger("MultiPlaneFusionLib")

# Defaults chosen with benchmarks/bench_srr.py (--sweep): alpha in mm^2 on normalised intensities.
# Tikhonov: PSNR peaks at 0.03 but thin bone then rings (spurious 300 HU surfaces in the 400 HU diploe
# next to 1500 HU cortex); 0.1 gives nearly its best bone surface for 2.5-5 mm slices and 5-30 HU noise
# at 0.4-1.4 dB below the PSNR peak. Huber (the default): alpha 0.5 with delta 0.05 gives the lowest
# surface error of every setting in every case of the sweep (0.19-0.25 mm, 0.40-0.58 x the best of the
# axial series and the average; Tikhonov 0.1: 0.35-0.41 mm) at PSNR 0.1-1.4 dB below Tikhonov's best
# (alpha 0.03, whose surface error is twice as large).
DEFAULT_ALPHA = {"tikhonov": 0.1, "huber": 0.5}
DEFAULT_HUBER_DELTA = 0.05
DEFAULT_REGULARIZER = "huber"
# The choices of SrrOptions.regularizer (the default first), for front ends that list them.
REGULARIZERS = ("huber", "tikhonov")
# Cap on CG iterations: Tikhonov stops on the tolerance long before. Huber spends its budget over 4
# reweightings (2 + 2 + 2 + 1 CG iterations): on the phantom the number of reweightings matters more than
# CG iterations per reweighting (bench_srr.py: 4 x 2 beat 3 x 3 in every sweep case at the same cost;
# 7 iterations over 4 reweightings is better than 9 over 3 and 20 % cheaper).
DEFAULT_ITERATIONS = {"tikhonov": 30, "huber": 7}
DEFAULT_OUTER_ITERATIONS = 4
# Sigma of the Gaussian the Huber edge test looks through, mm (see solvers.huber_weights).
DEFAULT_EDGE_SCALE_MM = 0.35


@dataclass
class SrrOptions:
    """Settings of :func:`reconstruct_srr`.

    Attributes
    ----------
    alpha : float or None
        Regularisation weight, mm^2 (squared smoothing length per unit data weight). Scale-invariant:
        intensities are normalised internally. Larger is smoother. None: the default of the
        regularizer (``DEFAULT_ALPHA``: 0.1 for tikhonov, 0.5 for huber, whose penalty is weaker at
        edges).
    regularizer : {"huber", "tikhonov"}
        Huber on the gradient magnitude (edge-preserving, default: sharp bone edges are what the
        model needs) or first-order Tikhonov (smooth gradient; about 1.5x faster and more forgiving
        when the stacks are not quite aligned).
    psf : {"gaussian", "box"}
        Through-plane slice profile: Gaussian with FWHM = slice thickness (default), or a box of the
        slice thickness (slab-averaged MPR reformats). In-plane: Gaussian, FWHM 1.2 x pixel spacing.
    max_iterations : int or None
        Cap on conjugate-gradient iterations (Huber: in total over the outer iterations). None: the
        regularizer's default (``DEFAULT_ITERATIONS``: 7 for huber, 30 for tikhonov).
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

    alpha: Optional[float] = None
    regularizer: str = DEFAULT_REGULARIZER
    psf: str = "gaussian"
    max_iterations: Optional[int] = None
    tolerance: float = 3e-4
    intensity_matching: Optional[bool] = None
    huber_delta: float = DEFAULT_HUBER_DELTA
    outer_iterations: int = DEFAULT_OUTER_ITERATIONS
    edge_scale_mm: float = DEFAULT_EDGE_SCALE_MM
    background_value: Optional[float] = None
    disagreement_threshold: float = 0.75
    exclude_disagreeing: bool = True
    clip_to_input_range: bool = True
    threads: Optional[int] = None

    @property
    def effective_alpha(self):
        """``alpha``, or the regularizer's default when it is None."""
        return DEFAULT_ALPHA[self.regularizer] if self.alpha is None else float(self.alpha)

    @property
    def effective_iterations(self):
        """``max_iterations``, or the regularizer's default when it is None."""
        if self.max_iterations is None:
            return DEFAULT_ITERATIONS[self.regularizer]
        return int(self.max_iterations)

    def validate(self):
        if self.regularizer not in REGULARIZERS:
            raise InputError(f"unknown regularizer '{self.regularizer}' (use {' or '.join(REGULARIZERS)})")
        if self.alpha is not None and not (self.alpha >= 0 and np.isfinite(self.alpha)):
            raise InputError(f"alpha must be a non-negative number, got {self.alpha}")
        if self.psf not in ("gaussian", "box"):
            raise InputError(f"unknown PSF '{self.psf}' (use gaussian or box)")
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
    rep = compare_stacks(stacks, grid, match, options.disagreement_threshold, options.psf, 0, monitor, workers)
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

    # 2. Operators.
    t0 = time.perf_counter()
    ops = []
    for s in work:
        ops.append(make_operator(s, grid, options.psf))
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
    offset = float(background)
    scale = _robust_range(work, offset)
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
    system = NormalEquations(ops, c, options.effective_alpha, spacing_kji, row_sums, workers, scratch)
    n_iter = max(1, options.effective_iterations)

    def report(it, rel):
        monitor.report("reconstruct", 0.1 + 0.85 * min(1.0, it / n_iter))

    if options.regularizer == "huber":
        solve_info = solve_huber(
            system, b, x, options.huber_delta, options.outer_iterations, options.effective_iterations,
            options.tolerance, report, options.edge_scale_mm,
        )
    else:
        solve_info = solve_tikhonov(system, b, x, options.effective_iterations, options.tolerance, report,
                                    overwrite=True)
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
    monitor.report("reconstruct", 1.0)
    timings["total_s"] = time.perf_counter() - t_all
    info = {
        "method": "srr",
        "iterations": int(solve_info["iterations"]),
        "relative_residual": float(solve_info["relative_residual"]),
        "initial_relative_residual": float(solve_info["initial_relative_residual"]),
        "residual_history": [float(v) for v in solve_info["history"]],
        "alpha": options.effective_alpha,
        "regularizer": options.regularizer,
        "psf": options.psf,
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
    for k, op, ck in zip(used, ops, c):
        info["operator_paths"][k] = op.path
        info["data_weights"][k] = round(float(ck), 6)
    LOGGER.info(
        "SRR done: %d iterations, relative residual %.3g, %.1f s", info["iterations"], info["relative_residual"],
        timings["total_s"],
    )
    return SrrResult(volume=x, coverage=coverage, info=info)


# ------------------------------------------------------------------------------------------ command line
def add_srr_arguments(parser):
    """Add the SRR options to an argparse parser (``fuse``/``run``); see :func:`srr_options_from_args`."""
    g = parser.add_argument_group("super-resolution (--method srr)")
    g.add_argument("--alpha", type=float, default=None,
                   help="regularisation weight in mm^2 on normalised intensities; larger is smoother "
                        f"(default {DEFAULT_ALPHA['tikhonov']:g} with tikhonov, {DEFAULT_ALPHA['huber']:g} with huber)")
    g.add_argument("--regularizer", choices=("huber", "tikhonov"), default=DEFAULT_REGULARIZER,
                   help="huber (edge-preserving, default: sharper bone edges) or tikhonov (smooth gradient, faster, "
                        "more forgiving of residual misregistration)")
    g.add_argument("--psf", choices=("gaussian", "box"), default="gaussian",
                   help="through-plane slice profile: gaussian FWHM = thickness (default) or box (slab MPR)")
    g.add_argument("--iterations", type=int, default=None,
                   help=f"maximum conjugate-gradient iterations in total (default {DEFAULT_ITERATIONS['huber']} with "
                        f"huber, {DEFAULT_ITERATIONS['tikhonov']} with tikhonov)")
    g.add_argument("--tolerance", type=float, default=SrrOptions.tolerance,
                   help=f"stop at this relative residual of the normal equations (default {SrrOptions.tolerance:g})")
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
        alpha=getattr(args, "alpha", d.alpha),
        regularizer=getattr(args, "regularizer", d.regularizer),
        psf=getattr(args, "psf", d.psf),
        max_iterations=getattr(args, "iterations", d.max_iterations),
        tolerance=getattr(args, "tolerance", d.tolerance),
        intensity_matching=matching,
        huber_delta=getattr(args, "huber_delta", d.huber_delta),
        edge_scale_mm=getattr(args, "edge_scale", d.edge_scale_mm),
        exclude_disagreeing=not getattr(args, "keep_disagreeing", False),
        threads=getattr(args, "threads", d.threads),
    )
    opts.validate()
    return opts


__all__ = ["SrrOptions", "SrrResult", "add_srr_arguments", "reconstruct_srr", "srr_options_from_args"]
