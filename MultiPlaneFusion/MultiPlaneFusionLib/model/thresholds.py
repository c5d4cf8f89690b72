"""Threshold presets (CT, HU) and the automatic threshold for volumes without HU (MR).

The presets are InVesalius 3's values (``invesalius/presets.py``, adult), so a user comparing the two
tools gets the same mask.
"""

import numpy as np

from ..errors import InputError

# name -> (lower, upper) in HU; inclusive on both ends.
PRESETS = {
    "bone": (226.0, 3071.0),
    "compact bone": (662.0, 1988.0),
    "spongy bone": (148.0, 661.0),
    "teeth": (1553.0, 2850.0),
    "soft tissue": (-700.0, 225.0),
    "skin": (-718.0, -177.0),
}

# The preset used for CT when none is named (ModelOptions.preset None).
DEFAULT_CT_PRESET = "bone"

# Spellings accepted on the command line ("compact-bone", "enamel", ...).
_ALIASES = {
    "compact": "compact bone",
    "cortical bone": "compact bone",
    "spongy": "spongy bone",
    "spongial bone": "spongy bone",
    "cancellous bone": "spongy bone",
    "enamel": "teeth",
    "teeth/enamel": "teeth",
    "soft": "soft tissue",
}

AUTO_LABEL = "automatic (Otsu on the foreground)"


def canonical_preset(name):
    """The PRESETS key for a user's spelling ('Compact-Bone' -> 'compact bone'); InputError if unknown."""
    key = " ".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise InputError(f"unknown threshold preset '{name}': choose one of {', '.join(PRESETS)}")
    return key


def otsu_level(values, bins=256):
    """Otsu's threshold of a 1-D sample: the level maximising the between-class variance.

    Parameters
    ----------
    values : array_like, any shape
        Intensities (flattened; non-finite values ignored).
    bins : int
        Histogram bins over [min, max].

    Returns
    -------
    float
        The threshold, in the units of ``values``: voxels ``>= level`` form the upper class.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InputError("the automatic threshold needs a non-empty volume")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        raise InputError("the automatic threshold needs a volume with more than one intensity")
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    # The split after bin b puts bins 0..b in the lower class; the level is the next bin's lower edge.
    # Between two well-separated classes every split in the gap is optimal (a plateau of empty bins):
    # take the middle of the plateau rather than its first bin, which would hug the lower class.
    between = between[:-1]
    best = np.flatnonzero(between >= between.max() * (1.0 - 1e-9))
    first, last = int(best[0]), int(best[-1])
    if np.all(np.diff(best) == 1):
        return float(0.5 * (edges[first + 1] + edges[last + 1]))
    return float(edges[first + 1])


def automatic_threshold(array, sample=2_000_000, seed=0):
    """(lo, hi) from two Otsu passes: background vs foreground, then the upper class of the foreground.

    The first pass separates air/background from the body; the second, on the foreground only, splits
    it into two classes and returns the brighter one, up to the volume's maximum. It is a labelled
    convenience for MR, where no HU preset applies, not a bone detector: check the result.

    Parameters
    ----------
    array : ndarray
        The volume (any shape); at most ``sample`` voxels (a fixed random subset) are used.
    """
    v = np.asarray(array).ravel()
    if v.size > sample:
        rng = np.random.default_rng(seed)
        v = v[rng.integers(0, v.size, sample)]
    v = v[np.isfinite(v)].astype(np.float64)
    background = otsu_level(v)
    foreground = v[v >= background]
    if foreground.size < 2 or float(foreground.max()) <= float(foreground.min()):
        raise InputError("the automatic threshold found no foreground to split: give --threshold LO HI")
    lo = otsu_level(foreground)
    return lo, float(v.max())


def resolve_threshold(array, *, preset=None, threshold=None, auto=False, modality="CT"):
    """The (lo, hi) range to use and a label saying where it came from.

    Priority: an explicit ``threshold``; then ``auto``; then the preset. ``preset=None`` means
    ``DEFAULT_CT_PRESET`` ('bone') for CT and is refused for any other modality; a named preset is
    refused only for MR, where HU ranges mean nothing (a volume file of unknown modality may well hold HU).

    Returns
    -------
    (lo, hi, label) : (float, float, str)
    """
    if threshold is not None:
        lo, hi = (float(t) for t in threshold)
        if not np.isfinite(lo) or np.isnan(hi):
            raise InputError(f"threshold must be two numbers, got {threshold}")
        if hi < lo:
            raise InputError(f"threshold range is empty: upper {hi:g} is below lower {lo:g}")
        return lo, hi, "custom"
    if auto:
        lo, hi = automatic_threshold(array)
        return lo, hi, AUTO_LABEL
    modality = str(modality or "OT").upper()
    if modality == "MR" or (preset is None and modality != "CT"):
        raise InputError(
            f"HU presets do not apply to this {modality} volume: give --threshold LO HI or use --auto-threshold"
        )
    name = canonical_preset(preset or DEFAULT_CT_PRESET)
    lo, hi = PRESETS[name]
    return lo, hi, f"preset {name}"
