"""Settings of the super-resolution reconstruction and their command-line flags.

The defaults are written once, in :class:`SrrOptions` (and, for the settings whose default depends on the
regularizer, in ``DEFAULT_ALPHA`` and ``DEFAULT_ITERATIONS``); :func:`add_srr_arguments` reads them from there.
They were chosen on the realistic panel and the phantom benchmarks (``benchmarks/bench_panel.py``,
``benchmarks/bench_srr.py``); the figures are in the README.
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import InputError
from ..sampling.psf import IN_PLANE_FWHM_FACTOR, SliceProfile, check_in_plane_factor, validate_psf

# The choices of SrrOptions.regularizer (the default first), for front ends that list them. "hybrid":
# first-order Tikhonov plus Huber (penalty.hybrid_split).
REGULARIZERS = ("hybrid", "tikhonov", "huber")
# The regularizers the solver reweights (IRLS, ``solvers.solve_huber``).
EDGE_PRESERVING = ("huber", "hybrid")
# SrrOptions.regularizer may also be "auto": regularizer and weight chosen together from the data
# (autotune.choose_prior); the solvers only ever see one of REGULARIZERS.
REGULARIZER_CHOICES = REGULARIZERS + ("auto",)
# Fixed weights (mm^2), not "auto": on the realistic panel the cross-validated weight under-regularised
# overlapping slices. Tikhonov's 0.07 was chosen with the linear image basis and the in-plane model width 0.9
# on the whole realistic panel and the real series (README); not re-tuned for the cubic basis and width 1.2
# (sampling.psf), with which the hybrid default was measured. Huber's penalty is weaker at edges, so
# it takes a larger one.
# The hybrid's alpha is its Tikhonov share, what edges keep; its Huber share (DEFAULT_HUBER_ALPHA) is what
# flat regions get on top. Chosen with its threshold (DEFAULT_HUBER_DELTA) on the realistic panel and the
# real series on the full 1 mm grid (README): 0.05 + 0.2 at 0.025 ties 0.05 + 0.1 at 0.05 there and gains
# ~0.3 dB on the panel's Philips cases; larger shares, or 0.2 at the higher threshold, flatten thin bone.
# Rechecked under the cubic basis (README, 2026-12-07): the panel's Philips cases then gain up to 1.4 dB from
# a larger share at a higher threshold, but the real series' thin head holder is smoothed below 300 HU
# (surface 0.117 -> 0.230 mm), which the panel does not score; so these stay.
DEFAULT_ALPHA = {"tikhonov": 0.07, "huber": 0.5, "hybrid": 0.05}
DEFAULT_HUBER_ALPHA = 0.2
# Huber threshold (normalised intensity per mm) per prior. The hybrid's is lower: thin bone's weak edges
# in the thick series stay above it, so its larger Huber share does not smooth them at the sum (README).
DEFAULT_HUBER_DELTA = {"huber": 0.05, "hybrid": 0.025}
# A cap on CG iterations: the solvers stop on the tolerances long before.
DEFAULT_ITERATIONS = {"tikhonov": 100, "huber": 100, "hybrid": 100}
_MATCHING_FLAGS = {"auto": None, "on": True, "off": False}


@dataclass
class SrrOptions:
    """Settings of :func:`.srr.reconstruct_srr`; checked when made (an InputError naming the setting).

    Attributes
    ----------
    alpha : float, "auto" or None
        Regularisation weight, mm^2 (squared smoothing length per unit data weight). Scale-invariant:
        intensities are normalised internally. Larger is smoother. None (default): the default of the
        regularizer (``DEFAULT_ALPHA``: 0.05 for the hybrid's Tikhonov share, 0.07 for tikhonov, 0.5 for
        huber, whose penalty is weaker at edges). "auto": chosen by cross-validation over held-out
        slices on a probe block (``autotune.choose_alpha``; opt-in, see the README for where it under-regularises).
    regularizer : {"tikhonov", "huber", "hybrid", "auto"}
        "hybrid" (the default): first-order Tikhonov at ``alpha`` plus Huber at ``huber_alpha``
        (``penalty.hybrid_split``): flat regions are smoothed at the sum, edges at about ``alpha`` alone.
        On the realistic panel it beat Tikhonov on both scores on six of seven cases and on the real
        series on the full grid; larger shares flatten thin bone there (README).
        "tikhonov": first-order Tikhonov (smooth gradient). "huber": Huber on the gradient magnitude
        (edge-preserving: better on piecewise-constant, hard-edged objects). "auto":
        regularizer and weight chosen together by held-out-slice cross-validation on the probe block
        (``autotune.choose_prior``; ``alpha`` is then ignored; opt-in: on the panel's real-anatomy cases
        the score prefers under-regularised settings, see the README).
    psf : {"auto", "gaussian", "box"}
        Through-plane slice profile. "auto" (default): per stack, box or Gaussian and a width factor
        around the nominal thickness, whichever predicts that stack best from a reconstruction of the
        others on a probe block (``autotune.estimate_profiles``); a stack whose normal no other stack
        resolves (all share nearly one normal, e.g. an axial series with gantry-tilted ones) keeps its
        nominal profile (``sampling.psf.nominal_profile``: box for sequenced CT, else Gaussian).
        "gaussian": FWHM = slice thickness;
        "box": the slice thickness (slab-averaged MPR reformats). In-plane: see ``in_plane_psf``.
    in_plane_psf : float, "auto" or None
        In-plane PSF of the model: Gaussian of FWHM = this factor x pixel spacing for every stack. None
        (default): ``sampling.psf.IN_PLANE_FWHM_FACTOR`` (1.2). "auto": per stack, from the data on the
        probe block (``autotune.estimate_in_plane``: the width under which the stacks predict each other
        best, candidates ``sampling.psf.IN_PLANE_FACTORS``).
    max_iterations : int or None
        Cap on conjugate-gradient iterations (Huber: in total over the outer iterations). None: the
        regularizer's default (``DEFAULT_ITERATIONS``: 100, a cap; the solvers stop on ``tolerance`` and
        ``solution_tolerance`` long before).
    tolerance : float
        Stop when the relative residual ``||b - H x|| / ||b||`` of the normal equations falls below it.
    solution_tolerance : float
        Converged when an iteration changes the (normalised) volume by less than this fraction of its norm.
    intensity_matching : bool or None
        Per-stack linear intensity matching against stack 0. None (auto): off when every stack is CT
        (Hounsfield units are calibrated, a fit between differently blurred series would only add
        bias), on otherwise (MR intensities are arbitrary per series).
    huber_delta : float or None
        Huber threshold on the gradient magnitude, normalised intensity per mm: gradients above it
        (edges) are penalised linearly instead of quadratically. None: the prior's default
        (``DEFAULT_HUBER_DELTA``: 0.025 for the hybrid, 0.05 for huber).
    huber_alpha : float or None
        Hybrid prior: the weight of its Huber share, mm^2 (``alpha`` is the Tikhonov share). None:
        ``DEFAULT_HUBER_ALPHA``.
    outer_iterations : int
        Huber: the most reweightings; with ``solution_tolerance`` they stop at the fixed point earlier.
    edge_scale_mm : float
        Huber: sigma (mm) of the Gaussian through which the gradient is measured for the weights, so
        that pixel noise on a fine grid does not count as an edge; 0 gives plain Huber IRLS.
    background_value : float or None
        Value of voxels no stack covers; None: -1024 for CT, else 0.
    disagreement_threshold : float
        Stacks whose best low-resolution correlation with any other stack is below this are reported
        as disagreeing (info["disagreeing_stacks"]) with a warning: series of one head correlate far
        above it, a misplacement that registration has not fixed falls below it (README).
    exclude_disagreeing : bool
        Leave disagreeing stacks out of the reconstruction (default). Stack 0, the reference, is never
        left out. False: use them anyway (still reported).
    clip_to_input_range : bool
        Clip the result to the range of the input intensities (removes faint overshoot at edges).
    threads : int or None
        Threads the operators and the solver split their work between; None: the CPUs available (at
        most 8). The result does not depend on it beyond float32 round-off (sums run in another order).
    self_check : bool
        Check on the probe block that the fusion predicts every stack better than any single other series.
    probe_block_voxels : int
        Side of the probe block the settings from the data are measured on (``autotune``), voxels.
    stack_profiles : tuple of SliceProfile or None
        One profile per stack, used as given (no choice from the data); the pipeline passes the first
        refinement cycle's choices to the later ones.
    """

    alpha: Union[float, str, None] = None
    regularizer: str = "hybrid"
    psf: str = "auto"
    in_plane_psf: Union[float, str, None] = None
    max_iterations: Optional[int] = None
    tolerance: float = 3e-4
    # Converged: an iteration changes the (normalised) volume by less than this fraction of its norm.
    solution_tolerance: float = 1e-3
    intensity_matching: Optional[bool] = None
    # Normalised intensity per mm; steeper gradients count as edges (penalised linearly).
    huber_delta: Optional[float] = None
    huber_alpha: Optional[float] = None
    outer_iterations: int = 10
    # Sigma of the Gaussian the Huber edge test looks through, mm (see penalty.huber_weights).
    edge_scale_mm: float = 0.35
    background_value: Optional[float] = None
    disagreement_threshold: float = 0.75
    exclude_disagreeing: bool = True
    clip_to_input_range: bool = True
    threads: Optional[int] = None
    self_check: bool = True
    # Full resolution: the choices see the details they decide about, at a fraction of the grid's cost.
    probe_block_voxels: int = 48
    stack_profiles: Optional[Tuple[SliceProfile, ...]] = None

    def __post_init__(self):
        self.validate()

    @property
    def in_plane_is_auto(self):
        return isinstance(self.in_plane_psf, str)

    @property
    def alpha_is_auto(self):
        return isinstance(self.alpha, str)

    @property
    def effective_alpha(self):
        """``alpha``, or the regularizer's fixed default when it is None or "auto" (the value the
        automatic choice starts from and falls back to)."""
        if self.alpha is None or isinstance(self.alpha, str) or self.regularizer == "auto":
            return DEFAULT_ALPHA.get(self.regularizer, DEFAULT_ALPHA["tikhonov"])
        return float(self.alpha)

    @property
    def effective_huber_delta(self):
        """``huber_delta``, or the prior's default (``DEFAULT_HUBER_DELTA``; Huber's for "auto", whose
        candidates are Tikhonov and Huber) when it is None."""
        if self.huber_delta is None:
            return DEFAULT_HUBER_DELTA.get(self.regularizer, DEFAULT_HUBER_DELTA["huber"])
        return float(self.huber_delta)

    @property
    def effective_huber_alpha(self):
        """The hybrid prior's Huber share: ``huber_alpha``, or ``DEFAULT_HUBER_ALPHA`` when None."""
        return DEFAULT_HUBER_ALPHA if self.huber_alpha is None else float(self.huber_alpha)

    @property
    def edge_preserving(self):
        """Whether the solver reweights (Huber or hybrid)."""
        return self.regularizer in EDGE_PRESERVING

    @property
    def effective_iterations(self):
        """``max_iterations``, or the regularizer's default when it is None."""
        if self.max_iterations is None:
            return DEFAULT_ITERATIONS.get(self.regularizer, DEFAULT_ITERATIONS["tikhonov"])
        return int(self.max_iterations)

    def validate(self):
        """Raise InputError (one line, naming the setting) for a setting out of range; returns self."""
        if self.regularizer not in REGULARIZER_CHOICES:
            raise InputError(f"unknown regularizer '{self.regularizer}' (use {', '.join(REGULARIZER_CHOICES)})")
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise InputError(f"alpha must be 'auto' or a non-negative number, got '{self.alpha}'")
        elif self.alpha is not None and not (self.alpha >= 0 and np.isfinite(self.alpha)):
            raise InputError(f"alpha must be 'auto' or a non-negative number, got {self.alpha}")
        validate_psf(self.psf)
        if isinstance(self.in_plane_psf, str):
            if self.in_plane_psf != "auto":
                raise InputError(f"in-plane PSF must be 'auto' or a positive FWHM / pixel spacing, got "
                                 f"'{self.in_plane_psf}'")
        else:
            check_in_plane_factor(self.in_plane_psf)
        if not (self.solution_tolerance >= 0 and np.isfinite(self.solution_tolerance)):
            raise InputError(f"solution tolerance must be a non-negative number, got {self.solution_tolerance}")
        if int(self.probe_block_voxels) < 16:
            raise InputError(f"probe block must be at least 16 voxels a side, got {self.probe_block_voxels}")
        if self.max_iterations is not None and int(self.max_iterations) < 0:
            raise InputError(f"iterations must be >= 0, got {self.max_iterations}")
        if not self.tolerance > 0:
            raise InputError(f"tolerance must be positive, got {self.tolerance}")
        if self.huber_delta is not None and not (self.huber_delta > 0 and np.isfinite(self.huber_delta)):
            raise InputError(f"huber delta must be positive, got {self.huber_delta}")
        if self.huber_alpha is not None and not (self.huber_alpha >= 0 and np.isfinite(self.huber_alpha)):
            raise InputError(f"huber alpha must be a non-negative number, got {self.huber_alpha}")
        if int(self.outer_iterations) < 1:
            raise InputError(f"outer iterations must be >= 1, got {self.outer_iterations}")
        if self.threads is not None and int(self.threads) < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if not (self.edge_scale_mm >= 0 and np.isfinite(self.edge_scale_mm)):
            raise InputError(f"edge scale must be a non-negative length in mm, got {self.edge_scale_mm}")
        if not -1.0 <= self.disagreement_threshold <= 1.0:
            raise InputError(f"disagreement_threshold is a correlation, between -1 and 1, got "
                             f"{self.disagreement_threshold}")
        if self.background_value is not None and not np.isfinite(self.background_value):
            raise InputError(f"background_value must be a number (or None), got {self.background_value}")
        return self


def add_srr_arguments(parser):
    """Add the SRR options to an argparse parser (``fuse``/``run``); see :func:`srr_options_from_args`."""
    d = SrrOptions()
    g = parser.add_argument_group("super-resolution (--method srr)")
    g.add_argument("--alpha", default=d.alpha,
                   help="regularisation weight in mm^2 on normalised intensities, larger is smoother (default "
                        f"{DEFAULT_ALPHA['tikhonov']:g} for tikhonov, {DEFAULT_ALPHA['huber']:g} for huber, "
                        f"{DEFAULT_ALPHA['hybrid']:g} for the hybrid's tikhonov share); auto: "
                        "chosen by cross-validation over held-out slices on a probe block (experimental: it can "
                        "under-regularise overlapping slices)")
    g.add_argument("--regularizer", choices=REGULARIZER_CHOICES, default=d.regularizer,
                   help=f"tikhonov (smooth gradient), huber (edge-preserving), hybrid (tikhonov at --alpha plus huber "
                        f"at --huber-alpha: flat regions smoothed harder than edges) or auto (prior and weight "
                        f"together by cross-validation over held-out slices on a probe block; experimental); "
                        f"default {d.regularizer}")
    g.add_argument("--psf", default=d.psf,
                   help="through-plane slice profile: auto (default: box or gaussian and its width per stack, from the "
                        "consistency between the stacks), gaussian (FWHM = thickness) or box (slab MPR)")
    g.add_argument("--in-plane-psf", default=d.in_plane_psf, metavar="FACTOR|auto",
                   help=f"in-plane PSF of the model: Gaussian FWHM as a multiple of the pixel spacing (default "
                        f"{IN_PLANE_FWHM_FACTOR:g}) or auto (per stack, from the consistency between the stacks on a "
                        "probe block)")
    g.add_argument("--iterations", type=int, default=d.max_iterations,
                   help=f"cap on conjugate-gradient iterations in total (default {DEFAULT_ITERATIONS['tikhonov']}; the "
                        "solver stops earlier when converged, see --solution-tolerance)")
    g.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"stop at this relative residual of the normal equations (default {d.tolerance:g})")
    g.add_argument("--solution-tolerance", type=float, default=d.solution_tolerance,
                   help="converged when an iteration changes the volume by less than this fraction "
                        f"(default {d.solution_tolerance:g})")
    g.add_argument("--no-self-check", action="store_true",
                   help="skip the check that the fusion predicts every stack better than any single other series")
    g.add_argument("--intensity-matching", choices=tuple(_MATCHING_FLAGS), default="auto",
                   help="per-stack linear intensity matching to the first stack: auto = off for CT, on otherwise")
    g.add_argument("--huber-delta", type=float, default=d.huber_delta,
                   help="huber threshold on the gradient, normalised intensity per mm (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_HUBER_DELTA.items()) + ")")
    g.add_argument("--huber-alpha", type=float, default=d.huber_alpha,
                   help=f"hybrid: the weight of the huber share in mm^2 (default {DEFAULT_HUBER_ALPHA:g})")
    g.add_argument("--edge-scale", type=float, default=d.edge_scale_mm,
                   help="huber: sigma in mm of the Gaussian the edge test looks through, so noise on fine grids "
                        f"is not taken for edges (default {d.edge_scale_mm:g}; 0 = plain Huber)")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="threads for the reconstruction (default: the CPUs available, at most 8)")
    g.add_argument("--keep-disagreeing", action="store_true",
                   help="use stacks that disagree with the others (they are left out by default)")
    return parser


def srr_options_from_args(args):
    """SrrOptions from parsed arguments (missing attributes keep their defaults); InputError when out of range."""
    d = SrrOptions()
    return SrrOptions(
        alpha=parse_alpha(getattr(args, "alpha", d.alpha)),
        regularizer=getattr(args, "regularizer", d.regularizer),
        psf=getattr(args, "psf", d.psf),
        in_plane_psf=parse_in_plane(getattr(args, "in_plane_psf", d.in_plane_psf)),
        max_iterations=getattr(args, "iterations", d.max_iterations),
        tolerance=getattr(args, "tolerance", d.tolerance),
        intensity_matching=_MATCHING_FLAGS[getattr(args, "intensity_matching", "auto") or "auto"],
        huber_delta=getattr(args, "huber_delta", d.huber_delta),
        huber_alpha=getattr(args, "huber_alpha", d.huber_alpha),
        edge_scale_mm=getattr(args, "edge_scale", d.edge_scale_mm),
        exclude_disagreeing=not getattr(args, "keep_disagreeing", False),
        threads=getattr(args, "threads", d.threads),
        solution_tolerance=getattr(args, "solution_tolerance", d.solution_tolerance),
        self_check=not getattr(args, "no_self_check", False),
    )


def _auto_or_number(value, flag, kind):
    """"auto", a number or None from a setting; an InputError naming ``flag`` otherwise."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{flag} must be 'auto' or a {kind} number, got '{value}'") from None


def parse_alpha(value):
    """``--alpha``: "auto", a number, or None; an InputError naming the setting otherwise."""
    return _auto_or_number(value, "--alpha", "non-negative")


def parse_in_plane(value):
    """``--in-plane-psf``: "auto", a positive number, or None; an InputError naming the setting otherwise."""
    return _auto_or_number(value, "--in-plane-psf", "positive")


__all__ = ["DEFAULT_ALPHA", "DEFAULT_HUBER_ALPHA", "DEFAULT_HUBER_DELTA", "DEFAULT_ITERATIONS", "EDGE_PRESERVING",
           "REGULARIZERS", "REGULARIZER_CHOICES", "SrrOptions", "add_srr_arguments", "parse_alpha", "parse_in_plane",
           "srr_options_from_args"]
