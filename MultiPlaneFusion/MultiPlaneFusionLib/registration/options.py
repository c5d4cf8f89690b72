"""Settings of the rigid registration stage and their command-line flags.

The CLI owns ``--no-register`` and ``--reference``; everything else about registration is added here so the
flags and the dataclass stay in one place.
"""

import math
from dataclasses import dataclass, fields
from typing import Optional, Tuple

from ..errors import InputError

METRICS = ("mattes", "correlation")
SEARCH_MODES = ("auto", "always", "off")


@dataclass
class RegistrationOptions:
    """How stacks are rigidly aligned.

    Attributes
    ----------
    enabled : bool
        False skips registration entirely (the scanner geometry is kept).
    metric : {'mattes', 'correlation'}
        Mattes mutual information (robust across kernels and MR contrasts) or normalised correlation.
    max_translation_mm, max_rotation_deg : float
        Guards, small motion: a result that moves the stack's centre by at most this and rotates it by at
        most this (relative to the optimiser's start) is accepted when the metric is not worse.
    max_large_translation_mm, max_large_rotation_deg : float
        Guards, large motion: a result beyond the small-motion bounds but within these is accepted only when
        it improves the metric by ``large_motion_min_gain`` (relative) or more; beyond these it is
        implausible and rejected. Rejected results keep the start geometry (warning logged and reported).
        A large bound below its small-motion bound counts as equal to it (raising ``max_rotation_deg`` alone
        accepts more rotation on any improvement, as it always did).
        MR stacks of one session (fetal MRI) move 17-22 degrees and 4-8 mm between orientation groups.
    large_motion_min_gain : float
        Relative metric improvement ``(start - result) / |start|`` a large motion needs: 50 times the
        dense metric's noise (1e-3); correct 10-25 degree registrations of the phantom gain 3-16 (300-1600 %).
    motion_search : {'auto', 'always', 'off'}
        Large-motion rotation search after the local registration: 'auto' runs it when the local result
        rotated by more than ``search_trigger_deg`` or was rejected (small motions cost nothing more),
        'always' every time, 'off' never. Refinement cycles never search.
    search_trigger_deg : float
        The rotation of the local result above which 'auto' searches: beyond about 10 degrees the local
        optimiser alone stopped 0.8-16 mm (TRE) short of the truth on the phantom.
    search_steps_deg : tuple of float
        The search turns the start and the local result by +- each of these angles about L, P and S (through
        the fixed mask's centroid), scores every candidate densely at the coarsest pyramid level, ...
    search_keep : int
        ... optimises the best ``search_keep`` at that level for ``search_iterations`` iterations, and the best
        of those through the finer levels; the result replaces the local one when its dense metric is better.
    search_iterations : int
        Optimiser iterations of a search candidate at the coarsest level.
    min_shift_mm : float
        A result that moves no corner of the stack by more than this (mm) counts as no change and the start
        geometry is kept: below the registration's precision (TRE about 0.05-0.1 mm on the phantom), and it
        keeps exactly orthogonal reformats of one acquisition exactly orthogonal.
    unmoved_tolerance_mm : float
        Refinement cycles: a stack whose update moves no corner of the head's bounding box (the covered part
        of the grid) by more than this (mm) counts as unmoved and keeps its transform bit for bit; when no
        stack moved, the reconstruction is not solved again (it would come out the same).
    refine_cycles : int
        Registration cycles against the current super-resolution reconstruction (used only by srr). One by
        default, as a safety net: benchmarks/bench_registration.py found the first registration already
        within 0.12 mm (4 mm slices) and 0.17 mm (7 mm slices) of the truth on the phantom, and within 0.08 mm
        of itself on the real Philips series moved by 3 mm / 2 degrees, so the cycle changed nothing there
        (every change stayed below ``min_shift_mm``). A second cycle never helped.
    shrink_factors : tuple of int
        Multi-resolution pyramid, coarse to fine, relative to the registration grid.
    smoothing_sigmas : tuple of float
        Gaussian smoothing per level, in voxels of the registration grid.
    sampling : float
        Fraction of the masked voxels of the fixed image drawn at random (fixed ``seed``) for the metric, at
        every level of the pyramid ...
    max_samples : int
        ... but never more than this many points per level.
    iterations : int
        Maximum optimiser iterations per level.
    spacing_mm : float or None
        Isotropic spacing of the grids both images are compared on; None picks a quarter of the thinner slice
        thickness (never finer than the finest pixel, never more than ``max_voxels`` voxels).
    max_voxels : int
        Upper bound on the voxels of one registration grid (caps time and memory).
    histogram_bins : int
        Bins of the Mattes joint histogram.
    foreground_hu : float or None
        Foreground threshold for the fixed-image mask; None = -500 HU for CT, Otsu otherwise.
    seed : int
        Seed of the random metric sampling (results are reproducible).
    transforms_out : str or None
        Folder receiving one ITK ``.tfm`` file per stack.
    """

    enabled: bool = True
    metric: str = "mattes"
    max_translation_mm: float = 20.0
    max_rotation_deg: float = 10.0
    max_large_translation_mm: float = 40.0
    max_large_rotation_deg: float = 40.0
    large_motion_min_gain: float = 0.05
    motion_search: str = "auto"
    search_trigger_deg: float = 5.0
    search_steps_deg: Tuple[float, ...] = (15.0, 30.0)
    search_keep: int = 3
    search_iterations: int = 50
    min_shift_mm: float = 0.25
    unmoved_tolerance_mm: float = 0.01
    refine_cycles: int = 1
    shrink_factors: Tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: Tuple[float, ...] = (2.0, 1.0, 0.0)
    sampling: float = 0.1
    max_samples: int = 20_000
    iterations: int = 100
    spacing_mm: Optional[float] = None
    max_voxels: int = 2_000_000
    histogram_bins: int = 32
    foreground_hu: Optional[float] = None
    seed: int = 20240601
    transforms_out: Optional[str] = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise InputError (one line, naming the setting) for a setting out of range; returns self."""
        if self.metric not in METRICS:
            raise InputError(f"unknown registration metric '{self.metric}' (use {' or '.join(METRICS)})")
        if not self.max_translation_mm > 0 or not self.max_rotation_deg > 0:
            raise InputError("registration bounds --max-translation-mm and --max-rotation-deg must be positive")
        if not self.max_large_translation_mm > 0 or not self.max_large_rotation_deg > 0:
            raise InputError("registration bounds --max-large-translation-mm and --max-large-rotation-deg must be "
                             "positive")
        if not self.large_motion_min_gain >= 0:
            raise InputError(f"registration large_motion_min_gain must be 0 or more, got {self.large_motion_min_gain}")
        if self.motion_search not in SEARCH_MODES:
            raise InputError(f"unknown --motion-search '{self.motion_search}' (use {', '.join(SEARCH_MODES)})")
        if not self.search_trigger_deg >= 0:
            raise InputError(f"registration search_trigger_deg must be 0 or more, got {self.search_trigger_deg}")
        self.search_steps_deg = tuple(float(v) for v in self.search_steps_deg)
        if not self.search_steps_deg or min(self.search_steps_deg) <= 0:
            raise InputError("registration search_steps_deg needs at least one positive angle")
        if int(self.search_keep) < 1 or int(self.search_iterations) < 1:
            raise InputError("registration search_keep and search_iterations must be 1 or more")
        self.search_keep, self.search_iterations = int(self.search_keep), int(self.search_iterations)
        if self.min_shift_mm < 0:
            raise InputError(f"registration min_shift_mm must be 0 or more, got {self.min_shift_mm}")
        if not self.unmoved_tolerance_mm >= 0:
            raise InputError(f"registration unmoved_tolerance_mm must be 0 or more, got {self.unmoved_tolerance_mm}")
        if int(self.refine_cycles) < 0:
            raise InputError(f"--refine-cycles must be 0 or more, got {self.refine_cycles}")
        self.refine_cycles = int(self.refine_cycles)
        self.shrink_factors = tuple(int(v) for v in self.shrink_factors)
        self.smoothing_sigmas = tuple(float(v) for v in self.smoothing_sigmas)
        if not self.shrink_factors or len(self.shrink_factors) != len(self.smoothing_sigmas):
            raise InputError("registration needs one smoothing sigma per shrink factor")
        if min(self.shrink_factors) < 1:
            raise InputError("registration shrink factors must be 1 or more")
        if not 0 < self.sampling <= 1:
            raise InputError(f"registration sampling must be in (0, 1], got {self.sampling}")
        if int(self.max_samples) < 100:
            raise InputError(f"registration needs at least 100 samples per level, got {self.max_samples}")
        if int(self.iterations) < 1:
            raise InputError("registration needs at least one iteration per level")
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise InputError(f"registration spacing must be positive, got {self.spacing_mm}")
        if int(self.max_voxels) < 1:
            raise InputError(f"registration max_voxels must be 1 or more, got {self.max_voxels}")
        if int(self.histogram_bins) < 2:
            raise InputError(f"registration histogram_bins must be 2 or more, got {self.histogram_bins}")
        if self.foreground_hu is not None and not math.isfinite(self.foreground_hu):
            raise InputError(f"registration foreground_hu must be a number (or None), got {self.foreground_hu}")
        if int(self.seed) < 0:
            raise InputError(f"registration seed must be 0 or more, got {self.seed}")
        return self

    def summary(self):
        """The settings as a JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def add_registration_arguments(parser):
    """Add the registration flags to an argparse parser or argument group."""
    d = RegistrationOptions()
    parser.add_argument("--metric", choices=METRICS, default=d.metric,
                        help=f"registration metric: Mattes mutual information or correlation ({d.metric})")
    parser.add_argument("--max-translation-mm", type=float, default=d.max_translation_mm, metavar="MM",
                        help="accept a registration moving a stack by up to this if the metric is not worse; beyond, "
                             f"only if it clearly improves (see --max-large-translation-mm) ({d.max_translation_mm:g})")
    parser.add_argument("--max-rotation-deg", type=float, default=d.max_rotation_deg, metavar="DEG",
                        help="accept a registration rotating a stack by up to this if the metric is not worse; "
                             "beyond, only if it clearly improves (see --max-large-rotation-deg) "
                             f"({d.max_rotation_deg:g})")
    parser.add_argument("--max-large-translation-mm", type=float, default=d.max_large_translation_mm, metavar="MM",
                        help="beyond --max-translation-mm, accept a move up to this only when the metric improves "
                             f"by {100 * d.large_motion_min_gain:g} %% or more; reject beyond "
                             f"({d.max_large_translation_mm:g})")
    parser.add_argument("--max-large-rotation-deg", type=float, default=d.max_large_rotation_deg, metavar="DEG",
                        help="beyond --max-rotation-deg, accept a rotation up to this only when the metric improves "
                             f"by {100 * d.large_motion_min_gain:g} %% or more; reject beyond "
                             f"({d.max_large_rotation_deg:g})")
    parser.add_argument("--motion-search", choices=SEARCH_MODES, default=d.motion_search,
                        help="coarse rotation search for large motion: when the local result rotated a lot or was "
                             f"rejected (auto), always, or never ({d.motion_search})")
    parser.add_argument("--refine-cycles", type=int, default=d.refine_cycles, metavar="N",
                        help="re-register every stack against the super-resolution result N times (srr only; "
                             f"{d.refine_cycles})")
    parser.add_argument("--transforms-out", metavar="DIR", default=None,
                        help="write each stack's rigid transform as an ITK .tfm file (LPS) into DIR")
    return parser


def registration_options_from_args(args):
    """RegistrationOptions from parsed arguments (``--no-register`` sets ``enabled=False``)."""
    d = RegistrationOptions()
    return RegistrationOptions(
        enabled=not bool(getattr(args, "no_register", False)),
        metric=getattr(args, "metric", d.metric),
        max_translation_mm=getattr(args, "max_translation_mm", d.max_translation_mm),
        max_rotation_deg=getattr(args, "max_rotation_deg", d.max_rotation_deg),
        max_large_translation_mm=getattr(args, "max_large_translation_mm", d.max_large_translation_mm),
        max_large_rotation_deg=getattr(args, "max_large_rotation_deg", d.max_large_rotation_deg),
        motion_search=getattr(args, "motion_search", d.motion_search),
        refine_cycles=getattr(args, "refine_cycles", d.refine_cycles),
        transforms_out=getattr(args, "transforms_out", None),
    )
