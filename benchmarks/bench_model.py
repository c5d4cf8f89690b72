"""Benchmark of the bone-model step: speed, memory, closedness, fidelity and staircase.

Cases
-----
- ``phantom``: the analytic head phantom's ideal image on an isotropic grid (about 20 M voxels at the
  default 0.75 mm), CT bone preset.
- ``philips_1mm``: the real 1 mm axial Philips series of ../shared/data (0.45 x 0.45 x 1 mm, 37 M
  voxels), 300 HU (the plastic skull).
- ``staircase``: models of the phantom from thick-slice stacks (axial 4 mm: native grid, resampled to
  the truth grid; the average of axial, coronal and sagittal 4 mm stacks) against the ground-truth model.

Measured per case: time of one flying-edges pass over the whole volume (``metrics.iso_surface``, which
is also the exact isosurface the model is compared with) and of the whole model path, their ratio,
the peak memory of the model path, triangles, closedness, the symmetric vertex-to-surface distance
to the exact isosurface (mean / p95, on up to ``--max-points`` vertices per side), the volume change
caused by smoothing, and the staircase fraction (area whose normal is within 5 degrees of an axis).

Usage::

    python benchmarks/bench_model.py [--json PATH] [--spacing 0.75] [--skip-real] [--smp STDThread]

Prints a table and writes the JSON (default benchmarks/results/bench_model.json). Uses the shared
helpers of ``benchmarks/common.py`` (real-data cache, peak memory, table, JSON).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, extract_series, machine, measure, print_table, write_json  # noqa: E402

from MultiPlaneFusionLib.grid import grid_from_image  # noqa: E402
from MultiPlaneFusionLib.metrics import iso_surface  # noqa: E402
from MultiPlaneFusionLib.model import ModelOptions, build_model, staircase_fraction  # noqa: E402
from MultiPlaneFusionLib.model.meshio import points, triangles  # noqa: E402


# --------------------------------------------------------------------------------------- helpers
def timed_model(image, options, modality="CT", repeat=1):
    """build_model with the best wall time of ``repeat`` runs and the memory of the first run
    (:func:`common.measure`: peak RSS, and the peak above the RSS before the call)."""
    res, seconds, mem = measure(build_model, image, options, modality=modality)
    for _ in range(max(1, repeat) - 1):
        t = time.perf_counter()
        res = build_model(image, options, modality=modality)
        seconds = min(seconds, time.perf_counter() - t)
    return res, seconds, mem


def timed_flying_edges(image, level, repeat=1):
    """The exact isosurface and the best time of ``repeat`` flying-edges passes over the whole volume."""
    values = sitk.GetArrayViewFromImage(image)
    best = None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        poly = iso_surface(values, level, grid_from_image(image))
        best = min(best or np.inf, time.perf_counter() - t)
    return poly, best


def one_way_distances(src, target, max_points, seed=0):
    """|distance| from (a random subset of) the vertices of ``src`` to the surface ``target`` (mm)."""
    p = points(src)
    if len(p) > max_points:
        p = p[np.random.default_rng(seed).choice(len(p), max_points, replace=False)]
    f = vtk.vtkImplicitPolyDataDistance()
    f.SetInput(target)
    out = vtk.vtkDoubleArray()
    f.FunctionValue(numpy_support.numpy_to_vtk(np.ascontiguousarray(p), deep=True), out)
    return np.abs(numpy_support.vtk_to_numpy(out))


def symmetric_distance(a, b, max_points):
    d = np.concatenate([one_way_distances(a, b, max_points), one_way_distances(b, a, max_points)])
    return {"mean_mm": float(d.mean()), "p95_mm": float(np.percentile(d, 95)), "max_mm": float(d.max()),
            "n": int(d.size)}


def normal_angle_deg(test, reference, n=20000, seed=0):
    """Mean angle (degrees) between the test's point normals and the reference's face normal at the
    closest point, on ``n`` random test vertices: the staircase shows up as tilted normals."""
    p = points(test)
    normals = test.GetPointData().GetNormals()
    if normals is None or len(p) == 0:
        return None
    nv = numpy_support.vtk_to_numpy(normals).astype(float)
    idx = np.random.default_rng(seed).choice(len(p), min(n, len(p)), replace=False)
    rp, rt = points(reference), triangles(reference)
    face = np.cross(rp[rt[:, 1]] - rp[rt[:, 0]], rp[rt[:, 2]] - rp[rt[:, 0]])
    face /= np.maximum(np.linalg.norm(face, axis=1, keepdims=True), 1e-30)
    loc = vtk.vtkStaticCellLocator()
    loc.SetDataSet(reference)
    loc.BuildLocator()
    closest = [0.0, 0.0, 0.0]
    cell, sub, d2 = vtk.reference(0), vtk.reference(0), vtk.reference(0.0)
    cos = np.empty(len(idx))
    for m, i in enumerate(idx):
        loc.FindClosestPoint(p[i].tolist(), closest, cell, sub, d2)
        cos[m] = float(nv[i] @ face[int(cell)])
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).mean())


def model_row(name, image, options, level, max_points, modality="CT", exact=None, fe_s=None, compare=True,
              repeat=1):
    """Time and measure one model; ``exact`` (and its time) may be shared between rows."""
    if exact is None:
        exact, fe_s = timed_flying_edges(image, level, repeat)
    res, seconds, mem = timed_model(image, options, modality, repeat)
    rep = res.report
    row = {
        "case": name,
        "voxels": int(np.prod(image.GetSize())),
        "spacing_mm": [round(v, 4) for v in image.GetSpacing()],
        "method": rep["method"],
        "smoothing": rep["smoothing"],
        "islands": options.islands,
        "flying_edges_s": fe_s,
        "model_s": seconds,
        "ratio": seconds / fe_s if fe_s else None,
        "timings": rep["timings"],
        "memory": mem,
        "triangles": rep["triangles"],
        "closed": rep["closed"],
        "outward": rep["outward"],
        "components": rep["components"],
        "volume_mm3": rep["volume_mm3"],
        "smoothing_volume_change_percent": rep["smoothing_volume_change_percent"],
        "staircase_fraction_xyz": staircase_fraction(res.polydata),
        "decimation": rep["decimation"],
    }
    if compare:
        row["distance_to_exact"] = symmetric_distance(res.polydata, exact, max_points)
    return row, res, exact, fe_s


# ------------------------------------------------------------------------------------------ cases
def phantom_cases(spacing_mm, scale, max_points, repeat):
    from MultiPlaneFusionLib.simulation import phantom_grid, phantom_truth

    grid = phantom_grid(spacing_mm, scale=scale)
    t = time.perf_counter()
    image = grid.image(phantom_truth(grid, scale=scale))
    print(f"phantom: {grid.shape} voxels at {spacing_mm} mm, built in {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    row, _, exact, fe_s = model_row("phantom", image, ModelOptions(islands="all"), 226.0, max_points,
                                    repeat=repeat)
    rows.append(row)
    default, _, _, _ = model_row("phantom (largest island)", image, ModelOptions(), 226.0, max_points,
                                 exact=exact, fe_s=fe_s, compare=False, repeat=repeat)
    rows.append(default)
    for s in (0.0, 0.25, 1.0):
        r, _, _, _ = model_row(f"phantom s={s:g}", image, ModelOptions(islands="all", smoothing=s), 226.0,
                               max_points, exact=exact, fe_s=fe_s)
        rows.append(r)
    r, _, _, _ = model_row("phantom labelmap", image, ModelOptions(islands="all", surface_method="labelmap"),
                           226.0, max_points, exact=exact, fe_s=fe_s)
    rows.append(r)
    return rows, grid, image


def staircase_cases(grid, truth_image, scale, thickness_mm, max_points):
    """Models from thick-slice stacks against the ground-truth model (all on the truth grid)."""
    from MultiPlaneFusionLib.reading import stack_to_image
    from MultiPlaneFusionLib.reconstruction.resample import resample_stack
    from MultiPlaneFusionLib.simulation import simulate_orthogonal_stacks

    pixel = float(grid.spacing_mm[0])
    stacks = simulate_orthogonal_stacks(thickness_mm=thickness_mm, pixel_spacing_mm=pixel, scale=scale,
                                        noise_hu=0.0)
    axial = stacks[0]
    truth = build_model(truth_image, ModelOptions())
    axes = np.stack([axial.row_direction, axial.column_direction, axial.normal])
    ref_fraction = staircase_fraction(truth.polydata, axial.normal)
    rows = [{
        "case": "staircase: ground truth", "method": "iso", "triangles": truth.report["triangles"],
        "closed": truth.report["closed"], "staircase_fraction_normal": ref_fraction,
        "staircase_fraction_axes": staircase_fraction(truth.polydata, axes),
    }]

    def add(name, image, options):
        res = build_model(image, options)
        d = symmetric_distance(res.polydata, truth.polydata, max_points)
        rows.append({
            "case": f"staircase: {name}", "method": options.surface_method, "triangles": res.report["triangles"],
            "closed": res.report["closed"], "distance_to_truth_model": d,
            "staircase_fraction_normal": staircase_fraction(res.polydata, axial.normal),
            "staircase_fraction_axes": staircase_fraction(res.polydata, axes),
            "excess_over_truth": staircase_fraction(res.polydata, axial.normal) - ref_fraction,
            "normal_angle_to_truth_deg": normal_angle_deg(res.polydata, truth.polydata),
        })

    add(f"axial {thickness_mm:g} mm native, labelmap s=0", stack_to_image(axial),
        ModelOptions(surface_method="labelmap", smoothing=0))
    add(f"axial {thickness_mm:g} mm native, labelmap", stack_to_image(axial), ModelOptions(surface_method="labelmap"))
    add(f"axial {thickness_mm:g} mm native, iso", stack_to_image(axial), ModelOptions())
    values, covered = resample_stack(axial, grid)
    values[~covered] = -1000.0
    add(f"axial {thickness_mm:g} mm linear to truth grid, iso", grid.image(values), ModelOptions())
    try:
        from MultiPlaneFusionLib.reconstruction.average import fuse_average

        fused = fuse_average(stacks, grid).volume
        add("average of ax+cor+sag, iso", grid.image(np.asarray(fused, dtype=np.float32)), ModelOptions())
    except Exception as e:  # the fusion API belongs to another module; report rather than fail
        rows.append({"case": "staircase: average of ax+cor+sag", "error": str(e).splitlines()[0]})
    add("ground truth itself, labelmap", truth_image, ModelOptions(surface_method="labelmap"))
    return rows


def philips_cases(max_points, repeat):
    from MultiPlaneFusionLib.reading import read_volume

    try:
        series = extract_series("philips_axial_1mm")
    except FileNotFoundError as e:
        print(f"{e}: skipping the Philips 1 mm case", flush=True)
        return []
    image = sitk.Cast(read_volume(series), sitk.sitkFloat32)
    level = 300.0
    rows = []
    row, _, exact, fe_s = model_row("philips 1 mm", image, ModelOptions(threshold=(level, 3071), islands="all"),
                                    level, max_points, repeat=repeat)
    rows.append(row)
    r, _, _, _ = model_row("philips 1 mm (largest island)", image, ModelOptions(threshold=(level, 3071)), level,
                           max_points, exact=exact, fe_s=fe_s, compare=False, repeat=repeat)
    rows.append(r)
    for s in (0.0, 0.25, 0.75, 1.0):
        r, _, _, _ = model_row(f"philips 1 mm s={s:g}", image,
                               ModelOptions(threshold=(level, 3071), islands="all", smoothing=s), level, max_points,
                               exact=exact, fe_s=fe_s)
        rows.append(r)
    r, _, _, _ = model_row("philips 1 mm labelmap", image,
                           ModelOptions(threshold=(level, 3071), islands="all", surface_method="labelmap"), level,
                           max_points, exact=exact, fe_s=fe_s)
    rows.append(r)
    r, _, _, _ = model_row("philips 1 mm decimate 0.8", image,
                           ModelOptions(threshold=(level, 3071), islands="all", decimate=0.8), level, max_points,
                           exact=exact, fe_s=fe_s)
    rows.append(r)
    return rows


# ------------------------------------------------------------------------------------------ output
COLUMNS = [
    ("case", "case", "s"),
    ("mvox", "Mvox", ".1f"),
    ("flying_edges_s", "FE s", ".2f"),
    ("model_s", "model s", ".2f"),
    ("ratio", "ratio", ".1f"),
    ("peak_mb", "peak MB", ".0f"),
    ("triangles", "triangles", "d"),
    ("closed", "closed", ""),
    ("mean_mm", "mean mm", ".3f"),
    ("p95_mm", "p95 mm", ".3f"),
    ("dv", "dV %", ".2f"),
    ("stair", "stair", ".3f"),
    ("angle", "angle deg", ".1f"),
]


def table_rows(rows):
    """Flat rows for the table (the JSON keeps the nested ones)."""
    out = []
    for r in rows:
        d = r.get("distance_to_exact") or r.get("distance_to_truth_model") or {}
        mem = r.get("memory") or {}
        out.append({
            "case": r["case"] + (f" (error: {r['error']})" if "error" in r else ""),
            "mvox": r["voxels"] / 1e6 if r.get("voxels") else None,
            "flying_edges_s": r.get("flying_edges_s"),
            "model_s": r.get("model_s"),
            "ratio": r.get("ratio"),
            "peak_mb": mem.get("peak_above_before_mb"),
            "triangles": r.get("triangles"),
            "closed": str(r["closed"]) if "closed" in r else None,
            "mean_mm": d.get("mean_mm"),
            "p95_mm": d.get("p95_mm"),
            "dv": r.get("smoothing_volume_change_percent"),
            "stair": r.get("staircase_fraction_normal", r.get("staircase_fraction_xyz")),
            "angle": r.get("normal_angle_to_truth_deg"),
        })
    return out


def show(rows):
    print_table("bone model", table_rows(rows), COLUMNS)
    print("FE s: one flying-edges pass over the whole volume; ratio = model s / FE s; peak MB: peak RSS of the "
          "model path above the RSS before it; mean/p95: symmetric vertex-to-surface distance to the exact "
          "isosurface (staircase rows: to the ground-truth model); stair: area fraction with normals within "
          "5 deg of the slice normal (staircase rows) or of x/y/z; angle: mean angle between the model's normals "
          "and the ground truth's at the closest point.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=str(RESULTS / "bench_model.json"))
    ap.add_argument("--spacing", type=float, default=0.75, help="phantom grid spacing, mm (0.75: about 20 M voxels)")
    ap.add_argument("--scale", type=float, default=1.0, help="phantom size factor")
    ap.add_argument("--thickness", type=float, default=4.0, help="slice thickness of the staircase stacks, mm")
    ap.add_argument("--max-points", type=int, default=200_000, help="vertices per side for surface distances")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of the main rows (the best is kept)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument("--smp", default=None, help="VTK SMP backend (Sequential, STDThread, TBB, OpenMP)")
    args = ap.parse_args(argv)
    if args.smp:
        vtk.vtkSMPTools.SetBackend(args.smp)
    env = dict(machine(), vtk=vtk.vtkVersion.GetVTKVersion(), simpleitk=sitk.Version_VersionString(),
               vtk_smp_backend=vtk.vtkSMPTools.GetBackend(),
               vtk_smp_threads=vtk.vtkSMPTools.GetEstimatedNumberOfThreads())
    rows = []
    if not args.skip_phantom:
        prow, grid, image = phantom_cases(args.spacing, args.scale, args.max_points, args.repeat)
        rows += prow
        show(rows)
        rows += staircase_cases(grid, image, args.scale, args.thickness, args.max_points)
        del image
    if not args.skip_real:
        rows += philips_cases(args.max_points, args.repeat)
    show(rows)
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
