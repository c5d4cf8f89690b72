"""Benchmark of ``multiplanefusion batch``: N small phantom cases with 1 and with 2 local Dask workers.

Each case is the head phantom's axial, coronal and sagittal thick-slice DICOM series (its own noise seed);
the batch runs as users run it (the CLI in a subprocess, its own LocalCluster) with ``--workers W`` and
``--memory-limit-gb L`` (the whole batch's memory, so each worker is given L / W).

Measured per worker count: wall time of the command (cluster start included), the span from the first
case's start to the last one's end, throughput (cases per minute of wall time) and its ratio to one
worker, the cases' peak memory (each worker's peak resident memory during a case, read by the worker)
against the limit each worker was given, and the machine load (``uptime``) before and after.

Usage::

    python benchmarks/bench_batch.py [--cases 6] [--limit-gb 4] [--scale 0.3] [--pixel 2] [--spacing 2.5]
                                     [--method srr] [--json PATH]

Prints a table and writes the JSON (default benchmarks/results/bench_batch.json).
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, markdown_table, print_table, write_json  # noqa: E402

from MultiPlaneFusionLib.simulation import simulate_orthogonal_stacks, write_dicom_series  # noqa: E402


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def make_cohort(root, n, scale, pixel_mm, thickness_mm):
    cases = []
    for c in range(n):
        stacks = simulate_orthogonal_stacks(thickness_mm=thickness_mm, pixel_spacing_mm=pixel_mm, scale=scale,
                                            noise_hu=15.0, seed=100 + c)
        folders = []
        for k, s in enumerate(stacks):
            folder = os.path.join(root, f"case{c:02d}", s.orientation)
            write_dicom_series(s, folder, series_number=k + 1, patient_id=f"BENCH{c:02d}")
            folders.append(folder)
        cases.append({"case": f"case{c:02d}", "stacks": folders})
    manifest = os.path.join(root, "cohort.json")
    with open(manifest, "w") as f:
        json.dump(cases, f)
    return manifest


def _seconds(a, b):
    return (datetime.datetime.fromisoformat(b) - datetime.datetime.fromisoformat(a)).total_seconds()


def run(manifest, outdir, workers, limit_gb, options):
    shutil.rmtree(outdir, ignore_errors=True)
    load_before = uptime()
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "MultiPlaneFusionLib.cli", "batch", manifest, "-o", outdir,
                        "--workers", str(workers), "--memory-limit-gb", str(limit_gb), "--quiet", *options],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"batch with {workers} workers failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    with open(os.path.join(outdir, "batch.json")) as f:
        table = json.load(f)
    rows = table["cases"]
    assert all(row["status"] == "done" for row in rows), [row["status"] for row in rows]
    span = _seconds(min(row["started_utc"] for row in rows), max(row["finished_utc"] for row in rows))
    peaks = [row["peak_memory_mb"] for row in rows]
    return {
        "workers": workers, "cases": len(rows), "wall_s": wall, "span_s": span,
        "cases_per_min": 60.0 * len(rows) / wall, "case_s_mean": sum(row["wall_s"] for row in rows) / len(rows),
        "peak_mb_max": max(peaks), "peak_mb_mean": sum(peaks) / len(peaks), "peaks_mb": [round(p) for p in peaks],
        "limit_mb": rows[0]["memory_limit_mb"], "estimate_mb": rows[0]["estimated_memory_mb"],
        "peak_below_limit": all(p < row["memory_limit_mb"] for p, row in zip(peaks, rows)),
        "load_before": load_before.split("load average:")[-1].strip(),
        "load_after": uptime().split("load average:")[-1].strip(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--limit-gb", type=float, default=4.0, help="--memory-limit-gb of the batch (shared by workers)")
    ap.add_argument("--scale", type=float, default=0.3)
    ap.add_argument("--pixel", type=float, default=2.0)
    ap.add_argument("--thickness", type=float, default=4.0)
    ap.add_argument("--spacing", type=float, default=2.5)
    ap.add_argument("--method", default="srr")
    ap.add_argument("--json", default=str(RESULTS / "bench_batch.json"))
    args = ap.parse_args()
    options = ["--method", args.method, "--spacing", str(args.spacing)]
    work = tempfile.mkdtemp(prefix="mpf-bench-batch-")
    try:
        manifest = make_cohort(work, args.cases, args.scale, args.pixel, args.thickness)
        rows = [run(manifest, os.path.join(work, f"out{w}"), w, args.limit_gb, options) for w in (1, 2)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["throughput_ratio"] = row["cases_per_min"] / rows[0]["cases_per_min"]
    columns = [("workers", "workers", "d"), ("cases", "cases", "d"), ("wall_s", "wall s", ".1f"),
               ("span_s", "cases span s", ".1f"), ("case_s_mean", "s/case", ".1f"),
               ("cases_per_min", "cases/min", ".2f"), ("throughput_ratio", "ratio", ".2f"),
               ("peak_mb_max", "peak MB (max)", ".0f"), ("estimate_mb", "estimate MB", ".0f"),
               ("limit_mb", "limit MB/worker", ".0f"), ("peak_below_limit", "under limit", ""),
               ("load_before", "load before", ""), ("load_after", "load after", "")]
    print_table(f"batch: {args.cases} phantom cases (scale {args.scale}, {args.thickness:g} mm slices, "
                f"{args.pixel:g} mm pixels), --method {args.method} --spacing {args.spacing:g}, "
                f"--memory-limit-gb {args.limit_gb:g}", rows, columns)
    print("\n" + markdown_table(rows, columns))
    write_json(args.json, {"machine": machine(), "settings": vars(args), "runs": rows})


if __name__ == "__main__":
    main()
