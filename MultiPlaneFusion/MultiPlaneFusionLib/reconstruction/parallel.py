"""Threads for the reconstruction's numpy work, and the BLAS thread setting that goes with them.

numpy releases the GIL inside its array loops and matrix products, so plain Python threads run them
on several cores. The operators and solvers split their work into disjoint pieces (row ranges of the
output, slabs of the grid) and hand the pieces to a :class:`Workers` pool; with one worker everything
runs inline in the caller's thread. Results agree between thread counts up to float32 round-off
(inner products are summed piece by piece in another order).

OpenBLAS is limited to one thread meanwhile (:func:`blas_threads`): its own threads synchronise on
every one of the thousands of small matrix products the operators issue, which made them several times
slower than one thread; splitting the products between our workers instead scales (measured by
benchmarks/bench_srr.py).
"""

import contextlib
import ctypes
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

LOGGER = logging.getLogger("MultiPlaneFusionLib")

_THREAD_PREFIX = "MultiPlaneFusionWorker"

# More threads than this gain nothing on the memory-bound passes (and cost memory for per-thread
# temporaries).
MAX_DEFAULT_THREADS = 8

# OpenBLAS thread-count entry points under the names its builds export (plain, 64-bit-integer, and the
# scipy-openblas build numpy wheels ship).
_OPENBLAS_API = [
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
]


def available_cpus():
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads():
    """Threads used when the caller does not say: the available CPUs, at most ``MAX_DEFAULT_THREADS``."""
    return min(available_cpus(), MAX_DEFAULT_THREADS)


def _loaded_openblas():
    """(get, set) function pairs of the OpenBLAS libraries loaded in this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return []
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(" ")[-1]
                if "openblas" in os.path.basename(path).lower():
                    paths.add(path)
    except OSError:
        return []
    found = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _OPENBLAS_API:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                found.append((getattr(lib, get_name), getattr(lib, set_name)))
                break
    return found


@contextlib.contextmanager
def blas_threads(n):
    """Run the block with OpenBLAS limited to ``n`` threads (best effort; a no-op elsewhere)."""
    pairs = []
    try:
        for get, set_ in _loaded_openblas():
            old = int(get())
            set_(int(n))
            pairs.append((set_, old))
    except Exception:  # noqa: BLE001 - never fail a reconstruction over a thread setting
        LOGGER.debug("could not limit BLAS threads", exc_info=True)
    try:
        yield
    finally:
        for set_, old in pairs:
            with contextlib.suppress(Exception):
                set_(old)


def split(n, parts):
    """``parts`` contiguous ranges ``(lo, hi)`` covering ``range(n)`` as evenly as possible (none empty)."""
    parts = max(1, min(int(parts), int(n)))
    bounds = [(n * p) // parts for p in range(parts + 1)]
    return [(bounds[p], bounds[p + 1]) for p in range(parts) if bounds[p + 1] > bounds[p]]


class Workers:
    """A small thread pool for splitting array work; a context manager.

    Parameters
    ----------
    n_threads : int, optional
        Number of threads (default :func:`default_threads`). 1 runs everything inline.

    Use as ``with Workers(2) as workers: ...``; inside, OpenBLAS runs single-threaded.
    """

    def __init__(self, n_threads=None):
        self.n_threads = default_threads() if n_threads is None else max(1, int(n_threads))
        self._pool = None
        self._blas = None

    def __enter__(self):
        if self.n_threads > 1:
            self._pool = ThreadPoolExecutor(self.n_threads, thread_name_prefix=_THREAD_PREFIX)
        self._blas = blas_threads(1)
        self._blas.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        finally:
            self._blas.__exit__(*exc)
        return False

    def map(self, fn, items):
        """``[fn(item) for item in items]``, the items run concurrently; exceptions propagate.

        Called from one of the pool's own threads it runs inline (waiting on the pool from inside it
        could deadlock)."""
        items = list(items)
        if self._pool is None or len(items) < 2 or threading.current_thread().name.startswith(_THREAD_PREFIX):
            return [fn(item) for item in items]
        futures = [self._pool.submit(fn, item) for item in items[1:]]
        # The calling thread takes the first item itself instead of idling.
        first = fn(items[0])
        return [first] + [f.result() for f in futures]

    def ranges(self, fn, n, min_size=1):
        """``fn(lo, hi)`` over contiguous pieces of ``range(n)`` (one per thread, each at least
        ``min_size`` long where possible), concurrently; the list of results in order."""
        parts = min(self.n_threads, max(1, int(n) // max(1, int(min_size))))
        return self.map(lambda r: fn(*r), split(n, parts))


class _Serial(Workers):
    """Inline execution; needs no ``with``."""

    def __init__(self):
        super().__init__(1)


SERIAL = _Serial()

# Elements per piece of the streaming passes (1 MB of float32: stays in cache between fused steps).
PIECE_ELEMENTS = 1 << 18


def flat_pieces(workers, n, fn):
    """``fn(s0, s1)`` over cache-sized pieces of ``range(n)`` (``PIECE_ELEMENTS``), each thread taking a
    contiguous share of the pieces; the list of per-piece results in order."""

    def share(lo, hi):
        return [fn(s, min(hi, s + PIECE_ELEMENTS)) for s in range(lo, hi, PIECE_ELEMENTS)]

    return [r for part in workers_or_serial(workers).ranges(share, n, PIECE_ELEMENTS) for r in part]


def row_slabs(workers, shape, fn, min_rows=1):
    """``fn(k0, k1)`` over slabs of whole planes along axis 0 of an array of ``shape`` (about
    ``PIECE_ELEMENTS`` each, at least ``min_rows`` rows), each thread taking a contiguous share; ``fn``
    must write only rows ``k0:k1`` of its outputs. Returns the list of ``fn``'s results, slab order."""
    nk = int(shape[0])
    plane = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    per = max(1, int(min_rows), PIECE_ELEMENTS // max(plane, 1))

    def share(lo, hi):
        return [fn(k0, min(hi, k0 + per)) for k0 in range(lo, hi, per)]

    return [r for part in workers_or_serial(workers).ranges(share, nk, per) for r in part]


def run_shared(items, fn, workers):
    """``fn(part)`` over ``items`` dealt round-robin to the workers (each part a list); inline with one worker or
    fewer than two items. The items must write disjoint outputs."""
    workers = workers_or_serial(workers)
    n = workers.n_threads
    if n <= 1 or len(items) < 2:
        fn(items)
        return
    workers.map(fn, [items[i::n] for i in range(n)])


def workers_or_serial(workers):
    """``workers``, or the inline executor when None."""
    return SERIAL if workers is None else workers
