"""Memory estimates made before allocating, and the peak-memory reading for summaries."""

import os
import sys

from .errors import MemoryLimitError

# None: the memory available on this machine when the run starts, less a margin (see default_limit_gb).
DEFAULT_MEMORY_LIMIT_GB = None

# Share of the available memory a run may plan to use: the rest is for the other programs' growth
# and for the estimate's own error.
AVAILABLE_MARGIN = 0.9

# The 16 GB limit used where the available memory cannot be read (the CLI, the library and the Slicer
# module all come here for it).
FALLBACK_LIMIT_GB = 16.0

_MIB = 1024**2

# Peak memory of a fusion above what the process holds when the estimate is made (the libraries and the
# inputs already read), in float32 copies of the grid and of the inputs, plus bytes per input sample by
# the srr operator path each stack takes. Fitted to the peaks measured by benchmarks/bench_memory.py (demo,
# simulated and real Philips series, 3-44 M grid voxels) as their upper envelope; keep in step with the
# implementations.
GRID_COPIES = {"average": 3.9, "srr": 7.0}
INPUT_COPIES = {"average": 1.2, "srr": 0.45}
FIXED_BYTES = {"average": 8 * _MIB, "srr": 24 * _MIB}  # code loaded later, srr: the probe block, threads
# An edge-preserving srr prior (Huber, hybrid) holds the IRLS weights and, while they are replaced, the
# previous ones (measured: +1.4 grid copies over Tikhonov on the real series on the full 1 mm grid).
EDGE_PRESERVING_GRID_COPIES = 1.5
# Registration keeps about this much (SimpleITK images and metric buffers of the stacks).
REGISTRATION_BYTES = 32 * _MIB
# Shear path (stacks slightly rotated from the grid axes, e.g. after registration): its line shears need
# grid-sized intermediate boxes at the peak (once), and lattices the size of each such stack.
SHEAR_GRID_COPIES = 4.4
SHEAR_BYTES_PER_SAMPLE = 17.0
SHEAR_FIXED_BYTES = 24 * _MIB
# Skew path (stacks tilted very slightly, e.g. after registration): each operator keeps its line-group
# matrices (at most skew_operator's cache bound) and per sample its normalisation and mask; applying the
# largest one needs its in-plane intermediates.
SKEW_FIXED_BYTES_PER_STACK = 16 * _MIB
# With its pre-shear (gantry tilts, oblique planes) one application also holds the sheared arrays (one per
# sheared axis, each box grown along its shear), about this many copies of their voxels; the transpose adds into
# the result in place. Fitted with bench_memory.py (README). Without the boxes' size, a one-axis pre-shear's
# typical growth over the grid is assumed.
SKEW_PRE_BOX_COPIES = 1.07
SKEW_PRE_DEFAULT_GROWTH = 1.22
SKEW_KEPT_BYTES_PER_SAMPLE = 5.0
SKEW_WORK_BYTES_PER_SAMPLE = 8.0
# General path (gantry tilts, oblique planes): each operator keeps per-slice in-plane matrices and
# normalisation arrays (bytes per sample of its stack), and applying the largest one needs its lattice.
GENERAL_KEPT_BYTES_PER_SAMPLE = 13.2
GENERAL_WORK_BYTES_PER_SAMPLE = 14.5
# A general-path stack with no axis along a grid axis interpolates trilinearly, chunk by chunk of lattice
# nodes (the operators' chunk size), with about this many bytes of stencil arrays per node.
TRILINEAR_CHUNK_NODES = 1 << 21
TRILINEAR_BYTES_PER_NODE = 64
# When srr refines the registration and solves again, the previous volume and coverage stay held.
RESOLVE_GRID_COPIES = 1.25
# After the fusion: the bone model (values, mask, distance field, VTK image and mesh), float32 grid copies
# above what the process holds once the fusion is done; then, in `run`, the report picture (VTK's offscreen
# rendering and matplotlib: a fixed part, plus slices), drawn while the mesh is still held.
MODEL_GRID_COPIES = 4.0
MODEL_KEPT_GRID_COPIES = 1.7
REPORT_FIXED_BYTES = 176 * _MIB
REPORT_GRID_COPIES = 1.1

# trilinear: the general path without a shared axis; skew_pre: the skew path with its pre-shear
PATHS = ("separable", "skew", "shear", "skew_pre", "general", "trilinear")


def estimate_bytes(n_grid_voxels, n_input_voxels=0, method="average", baseline_bytes=0, *, stack_paths=(),
                   trilinear_nodes=0, register=False, resolve=False, pre_shear_voxels=0, edge_preserving=False):
    """Estimated peak bytes of fusing onto a grid of ``n_grid_voxels``, on top of ``baseline_bytes`` (what
    the process holds already: see :func:`current_rss_bytes`).

    ``n_input_voxels``: samples of all the stacks. ``stack_paths``: for srr, ``(path, n_samples)`` per
    stack, path one of :data:`PATHS` (see :func:`.reconstruction.budget.srr_paths`); stacks not listed count as
    separable. ``trilinear_nodes``: lattice nodes of the largest trilinear stack (see
    :func:`.reconstruction.budget.estimate_fusion_bytes`). ``pre_shear_voxels``: the sheared arrays of the largest
    skew_pre stack (:func:`.reconstruction.skew_operator.pre_shear_voxels`; 0: a typical one-axis growth).
    ``register``: registration runs first. ``resolve``: srr solves again after a refinement (holding the
    first solve's volume). ``edge_preserving``: srr's prior reweights (Huber or hybrid, the default).
    """
    n_grid, n_input = int(n_grid_voxels), int(n_input_voxels)
    copies = GRID_COPIES.get(method, GRID_COPIES["srr"])
    n = float(baseline_bytes) + FIXED_BYTES.get(method, 0) + 4.0 * (copies * n_grid + INPUT_COPIES.get(method, 0.5)
                                                                     * n_input)
    if register:
        n += REGISTRATION_BYTES
    if method == "srr":
        if edge_preserving:
            n += 4.0 * EDGE_PRESERVING_GRID_COPIES * n_grid
        skew = [int(k) for p, k in stack_paths if p in ("skew", "skew_pre")]
        if skew:
            n += (SKEW_FIXED_BYTES_PER_STACK * len(skew) + SKEW_KEPT_BYTES_PER_SAMPLE * sum(skew)
                  + SKEW_WORK_BYTES_PER_SAMPLE * max(skew))
        if any(p == "skew_pre" for p, _ in stack_paths):
            box = int(pre_shear_voxels) or SKEW_PRE_DEFAULT_GROWTH * n_grid
            n += 4.0 * SKEW_PRE_BOX_COPIES * box
        shear = [int(k) for p, k in stack_paths if p == "shear"]
        general = [int(k) for p, k in stack_paths if p in ("general", "trilinear")]
        if shear:
            n += SHEAR_FIXED_BYTES + 4.0 * SHEAR_GRID_COPIES * n_grid + SHEAR_BYTES_PER_SAMPLE * sum(shear)
        if general:
            work = GENERAL_WORK_BYTES_PER_SAMPLE * max(general)
            if any(p == "trilinear" for p, _ in stack_paths):  # its chunks' stencils, in place of that work
                work = max(work, TRILINEAR_BYTES_PER_NODE * min(int(trilinear_nodes), TRILINEAR_CHUNK_NODES))
            n += GENERAL_KEPT_BYTES_PER_SAMPLE * sum(general) + work
        if resolve:
            n += 4.0 * RESOLVE_GRID_COPIES * n_grid
    return int(n)


def estimate_model_bytes(n_voxels, baseline_bytes=0, report=False):
    """Estimated peak bytes of building the bone model of a volume of ``n_voxels`` (and, with ``report``,
    then drawing the report picture), on top of ``baseline_bytes`` (the process with the volume loaded)."""
    n = 4.0 * int(n_voxels)
    need = MODEL_GRID_COPIES * n
    if report:
        need = max(need, REPORT_FIXED_BYTES + (MODEL_KEPT_GRID_COPIES + REPORT_GRID_COPIES) * n)
    return int(float(baseline_bytes) + need)


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
    """The default memory limit: ``AVAILABLE_MARGIN`` of the available memory (``FALLBACK_LIMIT_GB`` when
    unknown)."""
    n = available_bytes()
    if n is None:
        return FALLBACK_LIMIT_GB
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


def reset_peak_rss():
    """Restart this process's peak-RSS counter (Linux >= 4.0: VmHWM), so the next :func:`peak_rss_mb` is
    the peak since now; False where the platform cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
