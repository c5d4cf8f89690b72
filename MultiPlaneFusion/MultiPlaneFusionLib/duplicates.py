"""The same series given twice (two paths to one folder, a folder and its copy) is used once.

Registering a series to itself and counting it twice in the reconstruction would weight it double;
a duplicate is reported (a warning naming both) and dropped.
"""

import logging

import numpy as np

log = logging.getLogger("MultiPlaneFusionLib")


def same_series(a, b):
    """True when stacks ``a`` and ``b`` hold the same acquisition: identical geometry, and the same
    SeriesInstanceUID or identical pixels."""
    if a.pixels.shape != b.pixels.shape or a.pixel_spacing_mm != b.pixel_spacing_mm:
        return False
    if not (np.allclose(a.slice_origins_mm, b.slice_origins_mm, atol=1e-4)
            and np.allclose(a.row_direction, b.row_direction, atol=1e-6)
            and np.allclose(a.column_direction, b.column_direction, atol=1e-6)):
        return False
    if a.series_uid and a.series_uid == b.series_uid:
        return True
    return bool(np.array_equal(a.pixels, b.pixels))


def drop_duplicates(stacks, reference=0):
    """``(stacks without repeats, index of the reference among them, [(dropped, kept) index pairs])``.

    The first occurrence is kept; a dropped reference is replaced by the occurrence kept."""
    kept, first_of, dropped = [], {}, []
    for n, s in enumerate(stacks):
        match = next((m for m in kept if same_series(stacks[m], s)), None)
        if match is None:
            first_of[n] = len(kept)
            kept.append(n)
            continue
        first_of[n] = first_of[match]
        dropped.append((n, match))
        log.warning("stack %d '%s' (%s) is the same series as stack %d (%s): used once", n, s.description,
                    s.source, match, stacks[match].source)
    return [stacks[n] for n in kept], first_of.get(reference, reference), dropped
