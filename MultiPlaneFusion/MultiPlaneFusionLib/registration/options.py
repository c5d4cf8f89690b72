"""Settings of the rigid registration stage and their command-line flags.

The CLI owns ``--no-register`` and ``--reference``; everything else about registration is added here so the
flags and the dataclass stay in one place.
"""

from dataclasses import dataclass, fields
from typing import Optional, Tuple

from ..errors import InputError

METRICS = ("mattes", "correlation")


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
        Guards: a result that moves the stack's centre further than this, or rotates it by more, than its
        start geometry is rejected and the start geometry kept.
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
        if self.metric not in METRICS:
            raise InputError(f"unknown registration metric '{self.metric}' (use {' or '.join(METRICS)})")
        if not self.max_translation_mm > 0 or not self.max_rotation_deg > 0:
            raise InputError("registration bounds --max-translation-mm and --max-rotation-deg must be positive")
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

    def summary(self):
        """The settings as a JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def add_registration_arguments(parser):
    """Add the registration flags to an argparse parser or argument group."""
    d = RegistrationOptions()
    parser.add_argument("--metric", choices=METRICS, default=d.metric,
                        help=f"registration metric: Mattes mutual information or correlation ({d.metric})")
    parser.add_argument("--max-translation-mm", type=float, default=d.max_translation_mm, metavar="MM",
                        help="reject a registration moving a stack further than this; keep its scanner geometry "
                             f"({d.max_translation_mm:g})")
    parser.add_argument("--max-rotation-deg", type=float, default=d.max_rotation_deg, metavar="DEG",
                        help=f"reject a registration rotating a stack by more than this ({d.max_rotation_deg:g})")
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
        refine_cycles=getattr(args, "refine_cycles", d.refine_cycles),
        transforms_out=getattr(args, "transforms_out", None),
    )
