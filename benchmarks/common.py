"""Helpers shared by the benchmarks: real-data extraction cache, timing with peak memory, tables, JSON.

Benchmarks run on demand (not in the test suite); import this module from a script in ``benchmarks/``::

    from common import extract_series, measure, print_table, write_json
"""

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------- real data
sys.path.insert(0, str(REPO / "Testing"))  # the tests' support package: one place that finds the shared data
from support.shared_data import extract_archive, shared_data_dir  # noqa: E402

from MultiPlaneFusionLib.memory import reset_peak_rss  # noqa: E402


def cache_dir():
    """Where archives are extracted: ``$MPF_BENCH_CACHE`` or a folder in the system temp dir."""
    import tempfile

    d = Path(os.environ.get("MPF_BENCH_CACHE") or Path(tempfile.gettempdir()) / "mpf-bench-cache")
    d.mkdir(parents=True, exist_ok=True)
    return d


def extract_series(name):
    """Folder of the DICOM series of archive ``name`` (e.g. "philips_axial_1mm"), extracted once.

    Every archive goes into its own folder (two archives hold a folder of the same name). Raises
    FileNotFoundError when the shared data is absent.
    """
    root = shared_data_dir()
    if root is None:
        raise FileNotFoundError("real data absent: ../shared/data/dcm_qa_ct (set MPF_SHARED_DATA)")
    dest = cache_dir() / name
    done = dest / ".complete"
    if done.exists():
        (series,) = [p for p in dest.iterdir() if p.is_dir()]
        return series
    series = extract_archive(root / f"{name}.tar.gz", dest)
    done.write_text("ok")
    return series


# -------------------------------------------------------------------------------------- time, memory
def _status_mb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb():
    """Current resident memory of this process, MB (None where unknown)."""
    return _status_mb("VmRSS")


def peak_mb():
    """Peak resident memory since the last reset (or process start), MB."""
    v = _status_mb("VmHWM")
    if v is None:
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return v


def measure(fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)``; return (result, seconds, memory dict).

    ``memory``: ``rss_before_mb``, ``peak_mb`` and ``peak_above_before_mb`` (the extra resident memory the
    call needed at its peak; None where the peak counter cannot be reset, i.e. outside Linux).
    """
    before = rss_mb()
    exact = reset_peak_rss()
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - t
    peak = peak_mb()
    above = (peak - before) if (exact and before is not None and peak is not None) else None
    return result, seconds, {"rss_before_mb": before, "peak_mb": peak, "peak_above_before_mb": above}


def grid_copies(mb, n_voxels):
    """A memory figure in float32 copies of a grid of ``n_voxels``."""
    if mb is None:
        return None
    return mb * 1024.0 * 1024.0 / (4.0 * n_voxels)


# ------------------------------------------------------------------------------------- table and JSON
def _cell(v, spec):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def print_table(title, rows, columns):
    """Print ``rows`` (dicts) as a fixed-width table; ``columns``: list of (key, header, format spec)."""
    cells = [[_cell(r.get(k), spec) for k, _, spec in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    sys.stdout.flush()


def markdown_table(rows, columns):
    """The same table as GitHub markdown (for the README)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(k), spec) for k, _, spec in columns) + " |")
    return "\n".join(out)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def machine():
    """A short description of where the numbers were measured."""
    load = None
    if hasattr(os, "getloadavg"):
        load = [round(v, 2) for v in os.getloadavg()]
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "load_average": load}


def write_json(path, data):
    """Write ``data`` (numpy values allowed) as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2))
    print(f"\nwrote {path}")
