"""Memory estimates made before allocating, and the peak-memory reading for summaries."""

import sys

from .errors import MemoryLimitError

DEFAULT_MEMORY_LIMIT_GB = 16.0

# float32 volumes on the reconstruction grid each method holds at its peak (measured by the
# benchmarks; keep in step with the implementations).
GRID_COPIES = {"average": 4, "srr": 12, "model": 6}


def estimate_bytes(n_grid_voxels, n_input_voxels=0, method="average"):
    """Estimated peak bytes of fusing onto a grid: float32 grid copies plus the inputs (float32)."""
    copies = GRID_COPIES.get(method, 12)
    return int(4 * (copies * int(n_grid_voxels) + 2 * int(n_input_voxels)))


def check_limit(n_bytes, limit_gb, what="this reconstruction"):
    """Raise MemoryLimitError when ``n_bytes`` exceeds ``limit_gb`` gibibytes."""
    if limit_gb is None:
        limit_gb = DEFAULT_MEMORY_LIMIT_GB
    if n_bytes > limit_gb * 1024**3:
        raise MemoryLimitError(
            f"{what} needs about {n_bytes / 1024**3:.1f} GB, above the {limit_gb:g} GB limit: "
            "use a coarser --spacing, a smaller region, or raise --memory-limit-gb"
        )


def peak_rss_mb():
    """Peak resident memory of this process so far, in MB (None where the platform cannot tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kB, macOS bytes.
    return peak / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)
