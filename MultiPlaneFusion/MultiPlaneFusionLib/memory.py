"""Memory estimates made before allocating, and the peak-memory reading for summaries."""

import os
import sys

from .errors import MemoryLimitError

# None: the memory available on this machine when the run starts, less a margin (see default_limit_gb).
DEFAULT_MEMORY_LIMIT_GB = None

# Share of the available memory a run may plan to use: the rest is for the other programs' growth
# and for the estimate's own error.
AVAILABLE_MARGIN = 0.9

# float32 volumes on the reconstruction grid each method holds at its peak (measured by the
# benchmarks; keep in step with the implementations).
GRID_COPIES = {"average": 4, "srr": 12, "model": 6}


def estimate_bytes(n_grid_voxels, n_input_voxels=0, method="average", baseline_bytes=0):
    """Estimated peak bytes of fusing onto a grid: float32 grid copies plus the inputs (float32), on top of
    ``baseline_bytes`` (what the process holds already: see :func:`current_rss_bytes`)."""
    copies = GRID_COPIES.get(method, 12)
    return int(baseline_bytes) + int(4 * (copies * int(n_grid_voxels) + 2 * int(n_input_voxels)))


def current_rss_bytes():
    """Resident memory of this process now (libraries, the inputs read so far), in bytes; 0 if unknown.

    The estimate of a run's peak adds to it: the ~0.3 GB of numpy, SimpleITK and VTK alone made the
    estimate of a small run fall short of the measured peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    peak = peak_rss_mb()  # elsewhere the peak so far: an upper bound of the current value
    return int(peak * 1024**2) if peak else 0


def check_limit(n_bytes, limit_gb, what="this reconstruction"):
    """Raise MemoryLimitError when ``n_bytes`` exceeds ``limit_gb`` gibibytes."""
    source = ""
    if limit_gb is None:
        limit_gb = default_limit_gb()
        source = " (the memory available now)"
    if n_bytes > limit_gb * 1024**3:
        raise MemoryLimitError(
            f"{what} needs about {n_bytes / 1024**3:.1f} GB, above the {limit_gb:.3g} GB limit{source}: "
            "use a coarser --spacing, a smaller region, or set --memory-limit-gb"
        )


def available_bytes():
    """Memory available to a new allocation on this machine now, in bytes (None when unknown).

    Linux: MemAvailable of /proc/meminfo (free memory plus reclaimable caches); other POSIX systems:
    free physical pages; Windows: GlobalMemoryStatusEx's available physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform == "win32":
        return _windows_available()
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    try:  # macOS has no SC_AVPHYS_PAGES: half the physical memory, a cautious guess
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")) // 2
    except (AttributeError, ValueError, OSError):
        return None


def _windows_available():
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.ullAvailPhys)
    except (AttributeError, OSError):
        pass
    return None


def default_limit_gb():
    """The default memory limit: ``AVAILABLE_MARGIN`` of the available memory (16 GB when unknown)."""
    n = available_bytes()
    if n is None:
        return 16.0
    return AVAILABLE_MARGIN * n / 1024**3


def peak_rss_mb():
    """Peak resident memory of this process so far, in MB (None where the platform cannot tell)."""
    # Linux: this process image's own high-water mark. getrusage's ru_maxrss carries over exec the peak
    # of the parent that forked it (a run started from a large process seemed to peak at the parent's size).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kB, macOS bytes.
    return peak / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)
