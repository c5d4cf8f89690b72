"""The realistic benchmark panel: one table with every case, baselines and option sets.

See ``panel.py`` for the cases, the simulation, the position check and the scores.

Usage::

    python benchmarks/bench_panel.py                      # default srr, Tikhonov, average on every case
    python benchmarks/bench_panel.py --cases "P 4mm" "R 5mm" --options '{"mine": {"psf": "auto"}}'
    python benchmarks/bench_panel.py --sweep              # best fixed setting per case, and the panel's
                                                          # best single one, next to the default
    python benchmarks/bench_panel.py --no-baselines --huber-alphas 0.15 0.5 --huber-deltas 0.05 0.2
    python benchmarks/bench_panel.py --skip-panel --model # ridge measure + vault rendering, real series

``--options`` takes a JSON object {name: flat option dict} replacing the default option sets
(``{"default": {}, "tikhonov": {"regularizer": "tikhonov"}}``). Results go to benchmarks/results/.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import panel  # noqa: E402
from common import RESULTS, machine, print_table, write_json  # noqa: E402

DEFAULT_OPTION_SETS = {"default": {}, "tikhonov": {"regularizer": "tikhonov"}}


def sweep_settings(alpha_factors=(0.3, 1.0, 3.0)):
    """Fixed settings: profile x prior x alpha (factors of each prior's fixed default alpha; for the hybrid
    both of its shares scaled together)."""
    from MultiPlaneFusionLib.reconstruction.options import DEFAULT_ALPHA

    out = {}
    for psf in ("box", "gaussian"):
        for reg in ("tikhonov", "huber", "hybrid"):
            for f in alpha_factors:
                a = round(DEFAULT_ALPHA[reg] * f, 6)
                if reg == "hybrid":
                    h = panel.hybrid_scaled(f)
                    out[f"{psf} hybrid a={h['alpha']:g}+{h['huber_alpha']:g}"] = {"psf": psf, **h}
                else:
                    out[f"{psf} {reg} a={a:g}"] = {"psf": psf, "regularizer": reg, "alpha": a}
    return out


def huber_grid(alphas, deltas):
    """Option sets Huber alpha x huber_delta (the threshold, normalised intensity per mm), named
    "huber a=.. d=..": the threshold was fixed at 0.05 and never tuned on the panel."""
    return {f"huber a={a:g} d={d:g}": {"regularizer": "huber", "alpha": float(a), "huber_delta": float(d)}
            for d in deltas for a in alphas}


def print_matrix(rows, reference="default"):
    """A markdown table setting x case of "PSNR / surface mean" for the option sets, with each case's
    best PSNR in bold, and per setting the worst PSNR shortfall against the case's best and the cases on
    which it beats ``reference`` on both PSNR and surface, as printed (when ``reference`` is among the sets)."""
    opts = [r for r in rows if r["kind"] == "option"]
    cases = list(dict.fromkeys(r["case"] for r in opts))
    names = list(dict.fromkeys(r["method"] for r in opts))
    cell = {(r["case"], r["method"]): r for r in opts}
    best = {c: max(r["psnr_db"] for r in opts if r["case"] == c) for c in cases}
    lines = ["| setting | " + " | ".join(cases) + " | worst vs best dB | beats " + reference + " (both) |",
             "|---" * (len(cases) + 3) + "|"]
    for n in names:
        texts, short, wins = [], [], 0
        for c in cases:
            r = cell.get((c, n))
            if r is None:
                texts.append("")
                continue
            t = f"{r['psnr_db']:.2f} / {r['surface_mean_mm']:.3f}"
            texts.append(f"**{t}**" if r["psnr_db"] >= best[c] else t)
            short.append(r["psnr_db"] - best[c])
            ref = cell.get((c, reference))
            # compared as printed: a setting equal to the reference up to float noise does not count as a win
            wins += bool(ref and round(r["psnr_db"], 2) > round(ref["psnr_db"], 2)
                         and round(r["surface_mean_mm"], 3) < round(ref["surface_mean_mm"], 3))
        lines.append(f"| {n} | " + " | ".join(texts) + f" | {min(short):+.2f} | {wins}/{len(short)} |")
    print("\n".join(lines))


def run_sweep(cases, option_sets, alpha_factors, log=print):
    """Every fixed setting on every case; per case the best fixed setting next to each option set."""
    settings = sweep_settings(alpha_factors)
    rows = panel.run_panel({**option_sets, **settings}, cases, baselines=True, check_positions=False, log=log)
    panel.summarise(rows)
    best_rows = []
    for case in dict.fromkeys(r["case"] for r in rows):
        fixed = [r for r in rows if r["case"] == case and r["method"] in settings]
        best = max(fixed, key=lambda r: r["psnr_db"])
        best_surf = min(fixed, key=lambda r: r["surface_mean_mm"])
        for name in option_sets:
            (mine,) = [r for r in rows if r["case"] == case and r["method"] == name]
            best_rows.append({"case": case, "option set": name, "psnr_db": mine["psnr_db"],
                              "surface_mean_mm": mine["surface_mean_mm"], "best_fixed": best["method"],
                              "best_fixed_db": best["psnr_db"], "best_fixed_mm": best["surface_mean_mm"],
                              "minus_best_db": mine["psnr_db"] - best["psnr_db"],
                              "best_surface_setting": best_surf["method"],
                              "best_surface_mm": best_surf["surface_mean_mm"]})
    panel.print_panel(rows, title="sweep: every fixed setting")
    wide = panel_wide_best(rows, settings, option_sets)
    print_table("best fixed setting (by PSNR) per case next to each option set", best_rows,
                [("case", "case", ""), ("option set", "option set", ""), ("psnr_db", "PSNR dB", ".2f"),
                 ("surface_mean_mm", "surf mm", ".3f"), ("best_fixed", "best fixed (PSNR)", ""),
                 ("best_fixed_db", "its dB", ".2f"), ("best_fixed_mm", "its mm", ".3f"),
                 ("minus_best_db", "set - best dB", "+.2f"), ("best_surface_setting", "best fixed (surface)", ""),
                 ("best_surface_mm", "its mm", ".3f")])
    print()
    print_table(f"the panel's best fixed setting (highest mean PSNR over the {len(wide['cases'])} cases: "
                f"{wide['setting']}, mean {wide['mean_db']:.2f} dB) next to each option set", wide["rows"],
                [("case", "case", ""), ("option set", "option set", ""), ("psnr_db", "PSNR dB", ".2f"),
                 ("surface_mean_mm", "surf mm", ".3f"), ("fixed_db", "fixed dB", ".2f"),
                 ("fixed_mm", "fixed mm", ".3f"), ("minus_fixed_db", "set - fixed dB", "+.2f")])
    return {"rows": rows, "best": best_rows, "panel_wide": wide}


def panel_wide_best(rows, settings, option_sets):
    """The fixed setting with the highest mean PSNR over the cases (one setting for the whole panel, as a
    default is chosen), and each option set against it per case."""
    cases = list(dict.fromkeys(r["case"] for r in rows if r["kind"] == "option"))
    psnr = {(r["case"], r["method"]): r for r in rows if r["kind"] == "option"}
    means = {m: sum(psnr[c, m]["psnr_db"] for c in cases) / len(cases) for m in settings}
    setting = max(means, key=means.get)
    out = []
    for c in cases:
        fixed = psnr[c, setting]
        for name in option_sets:
            mine = psnr[c, name]
            out.append({"case": c, "option set": name, "psnr_db": mine["psnr_db"],
                        "surface_mean_mm": mine["surface_mean_mm"], "fixed_db": fixed["psnr_db"],
                        "fixed_mm": fixed["surface_mean_mm"], "minus_fixed_db": mine["psnr_db"] - fixed["psnr_db"]})
    return {"setting": setting, "mean_db": means[setting], "cases": cases,
            "means_db": dict(sorted(means.items(), key=lambda kv: -kv[1])), "rows": out}


# ------------------------------------------------------------------------------------------ bone model
def _normal_fractions(poly, axes, tolerance_deg=5.0, z_min=None):
    """(fraction of area with normal within ``tolerance_deg`` of any axis, fraction per axis, area mm^2),
    over the triangles whose centroid lies above ``z_min`` (LPS z, mm) when given. The formula of
    ``model.staircase_fraction``, here also per axis and on the vault."""
    import numpy as np

    from MultiPlaneFusionLib.model.mesh import points, triangles

    pts, tris = points(poly), triangles(poly)
    a = pts[tris[:, 0]]
    cross = np.cross(pts[tris[:, 1]] - a, pts[tris[:, 2]] - a)
    area2 = np.linalg.norm(cross, axis=1)
    keep = area2 > 0
    if z_min is not None:
        keep &= (a[:, 2] + pts[tris[:, 1], 2] + pts[tris[:, 2], 2]) / 3.0 > z_min
    n = cross[keep] / area2[keep, None]
    w = area2[keep]
    ax = np.asarray(axes, dtype=float)
    ax = ax / np.linalg.norm(ax, axis=1, keepdims=True)
    c = np.abs(n @ ax.T) >= np.cos(np.radians(tolerance_deg))
    return float(w[c.any(axis=1)].sum() / w.sum()), [float(w[c[:, m]].sum() / w.sum()) for m in range(len(ax))], \
        float(w.sum() / 2.0)


def render_vault(models, path, z_min, size=(700, 560)):
    """Offscreen VTK rendering of the skull vault (the part above ``z_min``) of each model side by side,
    lit from a grazing angle so that terraces show; ``models``: list of (title, polydata). Returns the path,
    or None when VTK cannot render here."""
    import vtk

    win = vtk.vtkRenderWindow()
    win.SetOffScreenRendering(1)
    win.SetSize(size[0] * len(models), size[1])
    bounds = None
    for n, (title, poly) in enumerate(models):
        plane = vtk.vtkPlane()
        plane.SetOrigin(0.0, 0.0, z_min)
        plane.SetNormal(0.0, 0.0, 1.0)
        clip = vtk.vtkClipPolyData()
        clip.SetInputData(poly)
        clip.SetClipFunction(plane)
        clip.Update()
        vault = clip.GetOutput()
        bounds = bounds or vault.GetBounds()
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(vault)
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(0.93, 0.89, 0.80)
        prop.SetDiffuse(0.9)
        prop.SetSpecular(0.25)
        prop.SetSpecularPower(30)
        ren = vtk.vtkRenderer()
        ren.SetViewport(n / len(models), 0.0, (n + 1) / len(models), 1.0)
        ren.SetBackground(0.12, 0.12, 0.14)
        ren.AddActor(actor)
        text = vtk.vtkTextActor()
        text.SetInput(title)
        text.GetTextProperty().SetFontSize(18)
        text.SetPosition(10, 10)
        ren.AddViewProp(text)
        # LPS: the head's top is +z, its front -y. View from above, front and left, light grazing from the side.
        cx, cy, cz = ((bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2)
        cam = ren.GetActiveCamera()
        cam.SetFocalPoint(cx, cy, cz)
        cam.SetPosition(cx + 180.0, cy - 260.0, cz + 260.0)
        cam.SetViewUp(0.0, 0.0, 1.0)
        ren.ResetCamera()
        cam.Zoom(1.35)
        ren.LightFollowCameraOff()
        ren.RemoveAllLights()
        light = vtk.vtkLight()
        light.SetPosition(cx + 400.0, cy + 100.0, cz + 60.0)
        light.SetFocalPoint(cx, cy, cz)
        ren.AddLight(light)
        fill = vtk.vtkLight()
        fill.SetPosition(cx - 200.0, cy - 300.0, cz + 300.0)
        fill.SetFocalPoint(cx, cy, cz)
        fill.SetIntensity(0.35)
        ren.AddLight(fill)
        win.AddRenderer(ren)
    win.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(win)
    grab.Update()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return str(path)


def run_model(option_sets, grid_choice="1mm", png=None, log=print):
    """The real-data acceptance: fuse the 5 mm + both tilted series (registered, the 1 mm
    series' grid) with each option set, build the default bone model, and compare with the default model
    of the real 1 mm series: the fraction of area whose normal lies within 5 degrees of any stack's slice
    normal (whole model and vault), plus the acceptance-2 scores of the fusion (bench_srr's evaluator),
    and a rendering of the vaults (PNG)."""

    from bench_srr import RealEvaluator, eval_grid
    from common import extract_series

    from MultiPlaneFusionLib.model import build_model
    from MultiPlaneFusionLib.reading import read_grid_source, read_stacks, stack_to_image

    folders = [extract_series(n) for n in ("philips_axial_5mm", "philips_tilt_minus18", "philips_tilt_plus16")]
    ref_folder = extract_series("philips_axial_1mm")
    (ref_stack,) = read_stacks([ref_folder])
    g1 = read_grid_source(ref_folder)
    evaluator = RealEvaluator(ref_stack, eval_grid(g1))
    t = time.perf_counter()
    if grid_choice == "1mm":
        grid = g1
        ref_model = build_model(stack_to_image(ref_stack))
    else:  # the panel's grid: the reference is the 1 mm series on that same grid (the panel's truth)
        truth, grid = panel.philips_truth()
        ref_model = build_model(grid.image(truth))
    log(f"1 mm series model: {ref_model.report['triangles']} triangles, {time.perf_counter() - t:.1f} s")
    results, renders = [], [("real 1 mm series (reference)", ref_model.polydata)]
    z_top = None
    for name, overrides in option_sets.items():
        vol, seconds, res = panel.run_fusion(folders, grid, overrides, register=True)
        # bench_srr's evaluator needs the whole 1 mm field of view (the panel grid is cropped)
        scores = evaluator(vol, grid) if grid_choice == "1mm" else {}
        t = time.perf_counter()
        model = build_model(res.image)
        model_s = time.perf_counter() - t
        normals = [s.world_normal for s in res.stacks]
        b = model.polydata.GetBounds()
        z_top = b[5] if z_top is None else z_top
        z_vault = z_top - 45.0
        whole, per_axis, area = _normal_fractions(model.polydata, normals)
        whole_ref, per_axis_ref, area_ref = _normal_fractions(ref_model.polydata, normals)
        vault, _, _ = _normal_fractions(model.polydata, normals, z_min=z_vault)
        vault_ref, _, _ = _normal_fractions(ref_model.polydata, normals, z_min=z_vault)
        row = {"option set": name, "fusion_s": seconds, "model_s": model_s, **scores,
               "triangles": model.report["triangles"], "closed": model.report["closed"],
               "fraction": whole, "fraction_ref": whole_ref, "ratio": whole / whole_ref if whole_ref else None,
               "vault_fraction": vault, "vault_fraction_ref": vault_ref,
               "vault_ratio": vault / vault_ref if vault_ref else None, "per_stack": per_axis,
               "per_stack_ref": per_axis_ref, "area_mm2": area, "area_ref_mm2": area_ref,
               "normals": [list(map(float, v)) for v in normals], "vault_above_z_mm": z_vault,
               "info": panel._small_info(res.summary.get("reconstruction"))}
        log({k: v for k, v in row.items() if k != "info"})
        results.append(row)
        renders.append((f"fusion: {name}", model.polydata))
    png = png or str(RESULTS / "panel_vault.png")
    try:
        out_png = render_vault(renders, png, z_min=z_top - 45.0)
    except Exception as e:  # noqa: BLE001 - a headless machine without EGL/OSMesa: the numbers still stand
        log(f"rendering failed ({e}); no PNG")
        out_png = None
    cols = [("option set", "option set", ""), ("correlation", "corr (eval grid)", ".4f"),
            ("surface_mean_mm", "surf mean mm", ".3f"), ("surface_p95_mm", "surf p95 mm", ".3f"),
            ("surface_skull_mean_mm", "skull mm", ".3f"), ("surface_rest_mean_mm", "rest mm", ".3f"),
            ("rest_bone_fraction", "rest >300 HU", ".2f"), ("fraction", "area within 5 deg", ".4f"),
            ("fraction_ref", "1 mm series", ".4f"),
            ("ratio", "ratio", ".3f"), ("vault_fraction", "vault", ".4f"), ("vault_fraction_ref", "vault 1 mm", ".4f"),
            ("vault_ratio", "vault ratio", ".3f"), ("fusion_s", "fusion s", ".1f"), ("triangles", "triangles", "")]
    print_table(f"bone model of the real 5 mm + tilted fusion against the 1 mm series' model (grid {grid.shape}; "
                f"area fraction whose normal is within 5 deg of a stack's slice normal; vault = top 45 mm); "
                f"rendering: {out_png}", results, cols)
    return {"rows": results, "png": out_png, "grid_shape": grid.shape}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", help="case names or substrings (default: all)")
    p.add_argument("--options", help="JSON {name: {option: value}} replacing the default option sets")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-position-check", action="store_true")
    p.add_argument("--sweep", action="store_true", help="fixed settings profile x prior x alpha")
    p.add_argument("--alpha-factors", type=float, nargs="+", default=[0.3, 1.0, 3.0],
                   help="sweep: alphas as factors of each prior's fixed default")
    p.add_argument("--huber-alphas", type=float, nargs="+",
                   help="with --huber-deltas: add the option sets Huber alpha x delta to the others")
    p.add_argument("--huber-deltas", type=float, nargs="+", help="Huber thresholds for --huber-alphas")
    p.add_argument("--model", action="store_true",
                   help="bone-model ridge measure and vault rendering on the real 5 mm + tilted series")
    p.add_argument("--model-options", help="JSON {name: {option: value}} for --model (default: the option sets)")
    p.add_argument("--model-grid", choices=("1mm", "panel"), default="1mm",
                   help="--model: fuse on the 1 mm series' full grid (default) or the panel's cropped grid")
    p.add_argument("--skip-panel", action="store_true", help="only --sweep / --model")
    p.add_argument("--in-plane-factor", type=float, default=None,
                   help="experiment: the model's in-plane PSF FWHM / pixel spacing (default: the library's "
                        "sampling.psf.IN_PLANE_FWHM_FACTOR); the simulated series have no in-plane blur")
    p.add_argument("--json", default=str(RESULTS / "bench_panel.json"))
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    option_sets = json.loads(args.options) if args.options else dict(DEFAULT_OPTION_SETS)
    if bool(args.huber_alphas) != bool(args.huber_deltas):
        p.error("--huber-alphas and --huber-deltas go together")
    if args.huber_alphas:
        option_sets.update(huber_grid(args.huber_alphas, args.huber_deltas))
    if args.in_plane_factor is not None:
        from MultiPlaneFusionLib.reconstruction import autotune
        from MultiPlaneFusionLib.sampling import psf

        psf.IN_PLANE_FWHM_FACTOR = autotune.IN_PLANE_FWHM_FACTOR = float(args.in_plane_factor)
        print(f"experiment: in-plane PSF FWHM factor {args.in_plane_factor:g} (library default "
              f"{1.2:g})")
    out = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)}
    t0 = time.perf_counter()
    if not args.skip_panel:
        rows = panel.run_panel(option_sets, args.cases, baselines=not args.no_baselines,
                               check_positions=not args.no_position_check)
        panel.print_panel(rows)
        if len(option_sets) > 2:
            print()
            print_matrix(rows)
        out["panel"] = {"rows": rows, "summary": panel.summarise(rows)}
        out["panel_seconds"] = time.perf_counter() - t0
        print(f"\npanel wall time {out['panel_seconds']:.0f} s; load {machine()['load_average']}")
    if args.sweep:
        out["sweep"] = run_sweep(args.cases, option_sets, args.alpha_factors)
    if args.model:
        sets = json.loads(args.model_options) if args.model_options else option_sets
        out["model"] = run_model(sets, args.model_grid)
    out["machine_after"] = machine()
    write_json(args.json, out)


if __name__ == "__main__":
    main()
