"""Benchmark of the memory estimate: the estimate a run prints before it allocates against its measured peak.

Every case runs ``multiplanefusion`` in a fresh process with ``--json`` and compares the summary's
``estimated_peak_memory_mb`` (printed before the reconstruction, or before the model for ``model``) with its
``peak_memory_mb`` (the process's VmHWM) and, where GNU time is installed, ``/usr/bin/time -v``'s maximum
resident set size. The goal: estimate / peak between 1.00 and 1.10.

Cases
-----
- ``demo``: ``multiplanefusion demo`` (simulates the full-size head's three 4 mm series, fuses with srr and
  registration, builds the bone model).
- ``fuse average`` / ``fuse srr``, with and without registration: the demo's three DICOM series.
- ``fuse srr rotated``: the demo's coronal and sagittal series turned by 3 degrees (shear path), no
  registration.
- ``model``: ``multiplanefusion model`` of the demo's fused volume; ``run average``: fuse then model.
- ``real aligned``: the real Philips 1 mm and 5 mm axial series (separable path) at ``--spacing``;
  ``real 5 mm + tilted``: the 5 mm and both gantry-tilted series (general path), registered, at ``--spacing``;
  with ``--full`` also that case on the 1 mm series' grid (``--grid-like``, 36.7 M voxels; several minutes).

Usage::

    python benchmarks/bench_memory.py [--spacing 0.8] [--full] [--skip-real] [--only NAME] [--json PATH]

Runs the cases one after the other (``nice`` them on a shared machine); peak memory does not depend on the
load, the times printed do.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, extract_series, machine, print_table, write_json  # noqa: E402

GNU_TIME = "/usr/bin/time"


def load_average():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_case(name, args, work):
    """Run ``multiplanefusion ARGS --json`` in a fresh process; the row of the table."""
    js = work / f"{name.replace(' ', '_')}.json"
    cmd = [sys.executable, "-m", "MultiPlaneFusionLib.cli", *args, "--quiet", "--json", str(js)]
    timed = os.path.exists(GNU_TIME)
    tv = work / "time-v.txt"
    if timed:
        cmd = [GNU_TIME, "-v", "-o", str(tv), *cmd]
    load0 = load_average()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{name}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    s = json.loads(js.read_text())
    max_rss = None
    if timed:
        for line in tv.read_text().splitlines():
            if "Maximum resident set size" in line:
                max_rss = int(line.split()[-1]) / 1024.0
    estimate, peak = s.get("estimated_peak_memory_mb"), s.get("peak_memory_mb")
    grid = (s.get("grid") or {}).get("n_voxels")
    paths = (s.get("reconstruction") or {}).get("operator_paths")
    return {"case": name, "grid_voxels": grid, "paths": ",".join(paths) if paths else "-",
            "estimate_mb": estimate, "peak_mb": peak, "time_max_rss_mb": max_rss,
            "ratio": estimate / peak if estimate and peak else None, "wall_s": wall,
            "load": f"{load0}-{load_average()}", "timings_s": s.get("timings_s"),
            "wall_time_s": s.get("wall_time_s")}


def rotate_to_nrrd(src, dst, degrees):
    """Write ``src`` (a DICOM series) as a NRRD turned by ``degrees`` about an oblique axis through its centre."""
    import numpy as np
    import SimpleITK as sitk

    from MultiPlaneFusionLib.reading import read_volume

    img = read_volume(str(src))
    axis = np.array([1.0, 0.6, 0.3]) / np.linalg.norm([1.0, 0.6, 0.3])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    r = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    size = np.array(img.GetSize())
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    origin = np.array(img.GetOrigin())
    img.SetDirection((r @ np.array(img.GetDirection()).reshape(3, 3)).ravel().tolist())
    img.SetOrigin((centre + r @ (origin - centre)).tolist())
    sitk.WriteImage(img, str(dst))
    return str(dst)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spacing", type=float, default=0.8, help="grid spacing of the real cases (mm)")
    ap.add_argument("--full", action="store_true", help="also the real 5 mm + tilted case on the 1 mm grid")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--only", help="run only the cases whose name contains this")
    ap.add_argument("--json", default=str(RESULTS / "bench_memory.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mpf-bench-memory-"))
    rows = []

    def case(name, cli_args):
        if args.only and args.only not in name:
            return
        row = run_case(name, cli_args, work)
        rows.append(row)
        print(f"{name}: estimate {row['estimate_mb']:.0f} MB, peak {row['peak_mb']:.0f} MB, "
              f"ratio {row['ratio']:.3f}, {row['wall_s']:.1f} s, load {row['load']}", flush=True)

    try:
        demo = work / "demo"
        # the demo case also writes the simulated series the fuse cases read
        row = run_case("demo", ["demo", "-o", str(demo)], work)
        if not args.only or args.only in "demo":
            rows.append(row)
        series = [str(demo / "dicom" / o) for o in ("axial", "coronal", "sagittal")]
        for method in ("average", "srr"):
            case(f"fuse {method}", ["fuse", *series, "-o", str(work / "f.nrrd"), "--method", method])
            case(f"fuse {method} no-register", ["fuse", *series, "-o", str(work / "f.nrrd"), "--method", method,
                                                "--no-register"])
        if not args.only or "rotated" in args.only:
            turned = [rotate_to_nrrd(series[n], work / f"turned{n}.nrrd", 3.0) for n in (1, 2)]
            case("fuse srr rotated 3 deg no-register", ["fuse", series[0], *turned, "-o", str(work / "f.nrrd"),
                                                        "--no-register"])
        case("model", ["model", str(demo / "fused.nrrd"), "-o", str(work / "bone.stl")])
        case("run average", ["run", *series, "-o", str(work / "run"), "--method", "average"])
        if not args.skip_real:
            try:
                real = {n: str(extract_series(n)) for n in ("philips_axial_1mm", "philips_axial_5mm",
                                                            "philips_tilt_minus18", "philips_tilt_plus16")}
            except FileNotFoundError as e:
                print(f"real cases skipped: {e}")
            else:
                sp = ["--spacing", f"{args.spacing:g}"]
                case(f"real aligned 1+5 mm, {args.spacing:g} mm",
                     ["fuse", real["philips_axial_1mm"], real["philips_axial_5mm"], "-o", str(work / "f.nrrd"), *sp])
                tilted = [real["philips_axial_5mm"], real["philips_tilt_minus18"], real["philips_tilt_plus16"]]
                case(f"real 5 mm + tilted, {args.spacing:g} mm", ["fuse", *tilted, "-o", str(work / "f.nrrd"), *sp])
                case(f"real 5 mm + tilted, {args.spacing:g} mm, no-register",
                     ["fuse", *tilted, "-o", str(work / "f.nrrd"), *sp, "--no-register"])
                if args.full:
                    case("real 5 mm + tilted, --grid-like 1 mm",
                         ["fuse", *tilted, "-o", str(work / "f.nrrd"), "--grid-like", real["philips_axial_1mm"]])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    columns = [("case", "case", ""), ("grid_voxels", "grid voxels", ",d"), ("paths", "srr paths", ""),
               ("estimate_mb", "estimate MB", ".0f"), ("peak_mb", "peak MB (VmHWM)", ".0f"),
               ("time_max_rss_mb", "time -v max RSS MB", ".0f"), ("ratio", "estimate / peak", ".3f"),
               ("wall_s", "wall s", ".1f"), ("load", "load (1 min) before-after", "")]
    print_table("Memory estimate against the measured peak", rows, columns)
    write_json(args.json, {"machine": machine(), "rows": rows})
    bad = [r["case"] for r in rows if r["ratio"] is not None and not 1.0 <= r["ratio"] <= 1.10]
    if bad:
        print(f"outside 1.00-1.10: {', '.join(bad)}")


if __name__ == "__main__":
    main()
