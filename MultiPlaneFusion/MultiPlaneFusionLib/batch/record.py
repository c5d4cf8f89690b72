"""What makes a case done, and the batch's tables. Pure Python (no Dask).

A case is done when ``OUTDIR/<case>/summary.json`` exists, every output it lists exists, and the input
and options fingerprints it records are those of the present inputs and settings. The summary is
written last (atomically) and removed first when a case is run again, so an interrupted or failed case
never counts as done, whatever files it left.
"""

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import shutil

from ..errors import InputError
from ..writing import atomic_path

SUMMARY_NAME = "summary.json"
# Written by run_to_folder into each case folder (the model's extension is the batch's model format).
OUTPUT_NAMES = ("fused.nrrd", "report.png")
# Settings that change neither the volume nor the model: a case done under other values is still done.
_NOT_IN_FINGERPRINT = {"memory_limit_gb", "threads"}

COLUMNS = ("case", "status", "message", "attempts", "started_utc", "finished_utc", "wall_s", "estimated_memory_mb",
           "memory_limit_mb", "peak_memory_mb", "triangles", "closed", "fusion_beats_single_series",
           "fusion_rms", "best_single_rms", "stacks_not_beating_single_series", "n_stacks", "patient_id",
           "study_uid", "worker", "outdir", "stacks")


def case_dir(outdir, case):
    return os.path.join(os.path.abspath(outdir), case)


def summary_path(outdir, case):
    return os.path.join(case_dir(outdir, case), SUMMARY_NAME)


# ------------------------------------------------------------------------------------------ fingerprints
def _files_of(path):
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path, followlinks=True):
            dirs.sort()
            for name in sorted(files):
                yield os.path.join(root, name)
    else:
        yield path


def input_fingerprint(stacks):
    """sha256 of the stack paths and of every file under them (relative path, size, mtime in ns).

    Raises InputError for a path that does not exist (the case then fails without running)."""
    h = hashlib.sha256()
    for p in stacks:
        if not os.path.exists(p):
            raise InputError(f"'{p}' does not exist")
        h.update(f"stack {p}\n".encode())
        for f in _files_of(p):
            try:
                st = os.stat(f)
            except OSError:
                continue  # vanished between listing and stat: not part of the input
            h.update(f"{os.path.relpath(f, p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _canonical(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in _NOT_IN_FINGERPRINT}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _canonical(value.tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def options_fingerprint(fuse_options, model_options, model_format):
    """sha256 of every setting that shapes a case's outputs (not the memory limit or thread counts)."""
    text = json.dumps({"fuse": _canonical(fuse_options), "model": _canonical(model_options),
                       "model_format": model_format}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ done or not
def read_summary(outdir, case):
    """The case's summary dict, or None when it is missing or unreadable."""
    try:
        with open(summary_path(outdir, case), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _output_files(outputs):
    for value in (outputs or {}).values():
        for p in value if isinstance(value, list) else [value]:
            if isinstance(p, str):
                yield p


def completed_summary(outdir, case, input_fp, options_fp):
    """The summary of a case done earlier with these inputs and options, else None."""
    summary = read_summary(outdir, case)
    if summary is None:
        return None
    batch = summary.get("batch") or {}
    if batch.get("input_fingerprint") != input_fp or batch.get("options_fingerprint") != options_fp:
        return None
    files = list(_output_files(summary.get("outputs")))
    if not files or not all(os.path.isfile(p) and os.path.getsize(p) > 0 for p in files):
        return None
    return summary


def write_summary(outdir, case, summary):
    """Write the case's summary atomically: the last file of a case, the mark that it is done."""
    with atomic_path(summary_path(outdir, case)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=_json_default)


def forget(outdir, case):
    """Remove the case's summary before it is run again (a stale one must not vouch for new files)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(summary_path(outdir, case))


def remove_partial(outdir, case, model_format, transforms_name=None):
    """Remove what an unfinished case may have left in its folder (the files run_to_folder writes and
    their temporary names); the folder goes too when nothing else is in it. Other files are kept."""
    folder = case_dir(outdir, case)
    if not os.path.isdir(folder):
        return
    forget(outdir, case)
    names = set(OUTPUT_NAMES) | {f"bone.{model_format}"}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name in names or (name.startswith(".") and ".partial" in name):
            with contextlib.suppress(OSError):
                os.remove(path)
    if transforms_name:
        shutil.rmtree(os.path.join(folder, transforms_name), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # only when empty


# ---------------------------------------------------------------------------------------- table rows
def figures_from_summary(summary):
    """The row fields read from a case's summary: triangles, closed, self-check figures, peak memory."""
    mesh = summary.get("mesh") or {}
    check = (summary.get("reconstruction") or {}).get("self_check") or {}
    per_stack = check.get("per_stack") or []

    def mean(key):
        values = [float(s[key]) for s in per_stack if isinstance(s.get(key), (int, float))]
        return round(sum(values) / len(values), 3) if values else None

    batch = summary.get("batch") or {}
    return {
        "triangles": mesh.get("triangles"),
        "closed": mesh.get("closed"),
        "fusion_beats_single_series": summary.get("fusion_beats_single_series"),
        "fusion_rms": mean("fusion_of_others_rms"),
        "best_single_rms": mean("best_single_rms"),
        "stacks_not_beating_single_series": (len(check["stacks_not_beating_single_series"])
                                             if isinstance(check.get("stacks_not_beating_single_series"), list)
                                             else None),
        "n_stacks": len(summary.get("stacks") or []) or None,
        **{k: batch.get(k) for k in ("started_utc", "finished_utc", "wall_s", "peak_memory_mb", "attempts",
                                     "estimated_memory_mb", "memory_limit_mb", "worker")},
    }


def write_tables(outdir, rows, totals):
    """``OUTDIR/batch.csv`` (one row per case, COLUMNS) and ``OUTDIR/batch.json`` (the totals and the
    rows), both atomically."""
    with atomic_path(os.path.join(outdir, "batch.csv")) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})
    with atomic_path(os.path.join(outdir, "batch.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({**totals, "cases": rows}, f, indent=2, default=_json_default)


def mb(n_bytes):
    """Bytes as MB (one decimal) for the tables; None for an unknown amount."""
    return None if not n_bytes else round(n_bytes / 1024**2, 1)


def _json_default(o):
    if hasattr(o, "tolist"):  # numpy arrays and scalars
        return o.tolist()
    return str(o)


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
