"""Options of the bone-model step, and their command-line form (shared by ``model`` and ``run``)."""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ..errors import InputError
from .thresholds import PRESETS, canonical_preset

SURFACE_METHODS = ("iso", "labelmap")
ISLAND_MODES = ("region", "largest", "all")


@dataclass
class ModelOptions:
    """Settings of :func:`~MultiPlaneFusionLib.model.build_model`.

    Attributes
    ----------
    preset : str or None
        Threshold preset in HU (see ``PRESETS``); used when ``threshold`` is None and
        ``auto_threshold`` is off. None means ``DEFAULT_CT_PRESET`` ('bone') for CT and is an error
        for other modalities; a preset named explicitly is honoured for any modality but MR (a volume file of
        unknown modality may well be CT).
    threshold : (lo, hi) or None
        Custom inclusive intensity range; overrides the preset.
    auto_threshold : bool
        Otsu on the foreground (for MR, where there are no HU); reported as automatic.
    islands : 'region', 'largest' or 'all'
        'region' (default): the largest connected piece plus, transitively, every piece of at least
        ``fragment_min_mm3`` within ``island_gap_mm`` of a kept piece (bones the resolution
        disconnected: mandible, vertebrae, fragments), without large objects farther away (head
        holder, table) or noise specks. 'largest': the largest piece only. 'all': every piece of at
        least ``min_island_mm3``.
    min_island_mm3 : float
        With ``islands='all'``: drop pieces smaller than this volume (mm^3); 0 keeps everything.
    island_gap_mm : float
        With ``islands='region'``: largest gap (mm) between a kept piece and another piece that is kept.
    fragment_min_mm3 : float
        With ``islands='region'``: smallest piece (mm^3) kept besides the largest.
    fill_cavities : bool
        Fill background regions enclosed by the mask (not connected to the volume's border).
    remove_thin_mm : float
        Radius (mm) of the opening that detaches thin structures (scanner table, head holder) from the
        main body; 0 = off. See :func:`~MultiPlaneFusionLib.model.segmentation.remove_thin`.
    surface_method : 'iso' or 'labelmap'
        'iso': sub-voxel isosurface of the grey levels restricted to the cleaned mask (default);
        'labelmap': Slicer's closed-surface recipe on the binary mask (parity with the Segment Editor).
    smoothing : float in [0, 1]
        Factor s; 0 = no smoothing. 'labelmap': exactly Slicer's windowed sinc (pass band 10^(-4 s),
        20 + 40 s iterations). 'iso' (constrained): a windowed sinc of pass band 10^(-2 s) and 20 + 40 s
        iterations, then each vertex kept within s/2 of the finest voxel spacing of where flying edges
        put it and within s/5 of it from the volume's trilinear isosurface: the smoothing evens out the
        facets and the isosurface's grid-scale noise and moves the surface by at most a fifth of a voxel
        (at s = 1). The default s = 0.5 was chosen on the whole realistic panel (bench_model.py --panel):
        pass band 0.1, not Slicer's 0.01: a sub-voxel isosurface has no stairs, the stronger low-pass
        took real relief off the Philips skull;
        band 0.1 voxel, not 0: projecting exactly onto the isosurface puts the volume's noise back into
        the facets, and wider bands moved the Philips surfaces;
        shift limit 0.25 voxel: with 0.5 voxel the Philips surfaces moved more and their facets were
        no better.
    decimate : None, float in (0, 1) or int >= 1
        None: keep every triangle; a float: fraction of triangles to remove; an int: target count.
    ras : bool
        Coordinate system of EXPORTED files (RAS flips x and y); meshes in memory are always LPS.
    """

    preset: Optional[str] = None
    threshold: Optional[Tuple[float, float]] = None
    auto_threshold: bool = False
    islands: str = "region"
    min_island_mm3: float = 0.0
    island_gap_mm: float = 10.0
    fragment_min_mm3: float = 20.0
    fill_cavities: bool = False
    remove_thin_mm: float = 0.0
    surface_method: str = "iso"
    smoothing: float = 0.5
    decimate: Optional[Union[float, int]] = None
    ras: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise InputError (one line) for any setting out of range; normalise spellings."""
        if self.preset is not None:
            self.preset = canonical_preset(self.preset)
        if self.threshold is not None:
            if len(self.threshold) != 2:
                raise InputError(f"threshold needs two values LO HI, got {self.threshold}")
            lo, hi = (float(v) for v in self.threshold)
            if math.isnan(lo) or math.isnan(hi):
                raise InputError("threshold values must be numbers")
            if hi < lo:
                raise InputError(f"threshold range is empty: upper {hi:g} is below lower {lo:g}")
            self.threshold = (lo, hi)
        if self.islands not in ISLAND_MODES:
            raise InputError(f"islands must be one of {', '.join(ISLAND_MODES)}, not '{self.islands}'")
        self.min_island_mm3 = float(self.min_island_mm3)
        if not self.min_island_mm3 >= 0:
            raise InputError(f"minimum island volume must be >= 0 mm^3, got {self.min_island_mm3:g}")
        self.island_gap_mm = float(self.island_gap_mm)
        if not self.island_gap_mm >= 0:
            raise InputError(f"--island-gap-mm must be >= 0, got {self.island_gap_mm:g}")
        self.fragment_min_mm3 = float(self.fragment_min_mm3)
        if not self.fragment_min_mm3 >= 0:
            raise InputError(f"--fragment-min-mm3 must be >= 0, got {self.fragment_min_mm3:g}")
        self.remove_thin_mm = float(self.remove_thin_mm)
        if not self.remove_thin_mm >= 0:
            raise InputError(f"remove_thin_mm must be >= 0, got {self.remove_thin_mm:g}")
        if self.surface_method not in SURFACE_METHODS:
            raise InputError(
                f"surface method must be one of {', '.join(SURFACE_METHODS)}, not '{self.surface_method}'"
            )
        self.smoothing = float(self.smoothing)
        if not 0.0 <= self.smoothing <= 1.0:
            raise InputError(f"smoothing must be between 0 and 1, got {self.smoothing:g}")
        self.decimate = parse_decimate(self.decimate)
        if self.threshold is not None and self.auto_threshold:
            raise InputError("give either a threshold range or the automatic threshold, not both")
        return self


def parse_decimate(value):
    """None, a fraction to remove in (0, 1), or an int target triangle count (>= 1).

    Strings are accepted ('0.5', '200000'); a whole number >= 1 means a count.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, bool):
        raise InputError("decimate must be a fraction in (0, 1) or a triangle count")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"decimate must be a fraction in (0, 1) or a triangle count, got '{value}'") from None
    if x == 0:
        return None
    if 0 < x < 1:
        return x
    if x >= 1 and float(x).is_integer():
        return int(x)
    raise InputError(f"decimate must be a fraction in (0, 1) or a whole triangle count, got '{value}'")


# The defaults, written once: argparse and options_from_args read them from here.
DEFAULTS = ModelOptions()


def add_model_arguments(parser):
    """Add the model options to an argparse (sub)parser or argument group.

    The CLI owns -o, --json and --quiet. Given a parser, the options go into a new "bone model" group;
    given a group, into that group. Returns ``parser``.
    """
    g = parser.add_argument_group("bone model") if hasattr(parser, "parse_args") else parser
    g.add_argument(
        "--threshold",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        help="intensity range of the bone (inclusive; HU for CT); overrides --preset",
    )
    g.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="CT threshold preset: " + ", ".join(f"'{k}' {lo:g}..{hi:g}" for k, (lo, hi) in PRESETS.items())
        + " HU (default: bone, for CT)",
    )
    g.add_argument(
        "--auto-threshold",
        action="store_true",
        help="automatic threshold (Otsu on the foreground), for MR where HU presets do not apply",
    )
    g.add_argument(
        "--smoothing",
        type=float,
        default=DEFAULTS.smoothing,
        metavar="S",
        help="surface smoothing 0..1; labelmap: Slicer's windowed sinc (pass band 10^(-4 S), 20+40 S "
        "iterations); iso (constrained): pass band 10^(-2 S), vertices move at most S/2 voxel and stay "
        f"within S/5 voxel of the volume's isosurface (default {DEFAULTS.smoothing:g}; 0 = off)",
    )
    g.add_argument("--ras", action="store_true", help="write the model in RAS (Slicer's view) instead of LPS")
    g.add_argument(
        "--surface-method",
        choices=SURFACE_METHODS,
        default=DEFAULTS.surface_method,
        help="iso: sub-voxel grey-level isosurface inside the cleaned mask (default); "
        "labelmap: Slicer's binary-labelmap surface",
    )
    g.add_argument(
        "--decimate",
        default=None,
        metavar="X",
        help="reduce triangles: a fraction to remove (0..1) or a target triangle count (default: off)",
    )
    g.add_argument(
        "--keep",
        choices=ISLAND_MODES,
        default=None,
        help="region (default): the largest connected piece and the pieces near it (see --island-gap-mm); "
        "largest: that piece only; all: every piece",
    )
    g.add_argument(
        "--island-gap-mm",
        type=float,
        default=DEFAULTS.island_gap_mm,
        metavar="D",
        help="with --keep region: keep pieces of at least --fragment-min-mm3 within D mm of a kept piece "
        f"(default {DEFAULTS.island_gap_mm:g}; farther pieces such as a head holder or the table are dropped)",
    )
    g.add_argument(
        "--fragment-min-mm3",
        type=float,
        default=DEFAULTS.fragment_min_mm3,
        metavar="V",
        help="with --keep region: smallest piece kept besides the largest, mm^3 "
        f"(default {DEFAULTS.fragment_min_mm3:g})",
    )
    g.add_argument(
        "--min-island-mm3",
        type=float,
        default=None,
        metavar="V",
        help="keep every piece of at least V mm^3 (implies --keep all)",
    )
    g.add_argument(
        "--fill-cavities",
        action="store_true",
        help="fill cavities enclosed by the bone (background not connected to the volume border)",
    )
    g.add_argument(
        "--remove-thin-mm",
        type=float,
        default=DEFAULTS.remove_thin_mm,
        metavar="D",
        help="detach and drop thin structures far from the main body (scanner table, head holder): "
        "opening radius in mm (default 0 = off)",
    )
    return parser


def options_from_args(args):
    """ModelOptions from parsed arguments (attributes missing from ``args`` take their defaults)."""
    keep = getattr(args, "keep", None)
    min_island = getattr(args, "min_island_mm3", None)
    if min_island is not None and keep == "largest":
        raise InputError("--min-island-mm3 keeps several pieces: it cannot be combined with --keep largest")
    if keep is None:
        keep = "all" if min_island is not None else DEFAULTS.islands
    threshold = getattr(args, "threshold", None)
    return ModelOptions(
        preset=getattr(args, "preset", None),
        threshold=tuple(threshold) if threshold is not None else None,
        auto_threshold=bool(getattr(args, "auto_threshold", False)),
        islands=keep,
        min_island_mm3=min_island or 0.0,
        island_gap_mm=_given(args, "island_gap_mm"),
        fragment_min_mm3=_given(args, "fragment_min_mm3"),
        fill_cavities=bool(getattr(args, "fill_cavities", False)),
        remove_thin_mm=_given(args, "remove_thin_mm"),
        surface_method=_given(args, "surface_method"),
        smoothing=_given(args, "smoothing"),
        decimate=getattr(args, "decimate", None),
        ras=bool(getattr(args, "ras", False)),
    )


def _given(args, name):
    """``args.name``, or the ModelOptions default when the parser did not define it or left it None."""
    value = getattr(args, name, None)
    return getattr(DEFAULTS, name) if value is None else value
