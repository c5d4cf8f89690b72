"""Benchmark of the super-resolution reconstruction: quality and speed against the baselines.

Sections
--------
- ``synthetic``: the library's analytic head phantom as ground truth; three orthogonal 4 mm series
  (0.8 mm pixels, 15 HU noise) simulated from the analytic model (not with the reconstruction's
  operators); grid ``phantom_grid(--spacing)`` (0.93 mm: ~11.5 M voxels). Rows: axial only (B-spline
  resampled), average (linear), srr with the library's defaults (as the pipeline runs it), the default of
  the issue date (Huber 0.5, 7 CG over 4 reweightings, Gaussian), Huber converged; then quality against CG
  iterations with the default's prior. Columns: PSNR inside the head
  (truth > -900 HU), Dice of the bone mask (> 300 HU), symmetric vertex-to-surface distance of the
  300 HU iso-surfaces (mean, p95), wall time, peak memory above the inputs (MB and float32 grid copies).
  The speed ratio srr / average, also as the median over alternating runs (``--speed-runs``).
- ``sweep`` (``--sweep``): Tikhonov alphas and the default on other thicknesses and noise levels, to
  check the default holds beyond the case it was chosen on.
- ``cli`` (``--cli``): ``multiplanefusion fuse`` end to end on the three series written as DICOM, srr
  against average, registration off (the same for both): the wall time a user sees.
- ``real``: the Philips series of ../shared/data: the 5 mm axial and both gantry-tilted series fused on
  the grid of the 1 mm series (``--grid-like``). First the baselines of ../shared/data/README.md are
  reproduced with the same metric (correlation with the 1 mm series inside the phantom, 1 mm > -500 HU,
  and the 300 HU surface distance, both on the 1 mm grid at 0.9 mm in-plane); then srr. With
  ``--register``, also after rigid registration of the tilted series to the 5 mm one (they were scanned
  in another study; the phantom sits ~1 mm apart).

Usage::

    python benchmarks/bench_srr.py [--skip-synthetic] [--skip-real] [--sweep] [--cli] [--register]
        [--scale 1.0] [--spacing 0.93] [--real-grid 1mm|eval] [--json PATH]
"""

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, extract_series, grid_copies, machine, markdown_table, measure, print_table, write_json  # noqa: E402

from MultiPlaneFusionLib import metrics  # noqa: E402
from MultiPlaneFusionLib.grid import Grid  # noqa: E402
from MultiPlaneFusionLib.reading import read_grid_source, read_stacks  # noqa: E402
from MultiPlaneFusionLib.reconstruction.average import fuse_average  # noqa: E402
from MultiPlaneFusionLib.reconstruction.options import SrrOptions  # noqa: E402
from MultiPlaneFusionLib.reconstruction.srr import reconstruct_srr  # noqa: E402
from MultiPlaneFusionLib.sampling.resample import resample_stack  # noqa: E402
from MultiPlaneFusionLib.simulation import phantom_grid, phantom_truth, simulate_orthogonal_stacks  # noqa: E402

BONE_HU = 300.0
# The earlier default, chosen on this phantom alone: Huber, alpha 0.5, 7 CG over 4 reweightings, Gaussian.
PREVIOUS_DEFAULT = SrrOptions(regularizer="huber", alpha=0.5, psf="gaussian", max_iterations=7, outer_iterations=4,
                              solution_tolerance=0.0, self_check=False)
README_BASELINES = {"5mm": (0.805, 0.69, 2.48), "mean3": (0.847, 0.53, 1.44)}

COLUMNS = [
    ("method", "method", ""),
    ("psnr_db", "PSNR dB", ".2f"),
    ("dice", "Dice", ".4f"),
    ("surface_mean_mm", "surf mean mm", ".3f"),
    ("surface_p95_mm", "surf p95 mm", ".3f"),
    ("seconds", "time s", ".2f"),
    ("memory_mb", "peak MB", ".0f"),
    ("grid_copies", "grid copies", ".1f"),
    ("iterations", "iters", ""),
]


# ------------------------------------------------------------------------------------------ synthetic
def quality(volume, truth, grid, head, truth_surface):
    d = metrics.surface_distance(metrics.iso_surface(volume, BONE_HU, grid), truth_surface)
    return {
        "psnr_db": metrics.psnr(volume, truth, head),
        "dice": metrics.dice(volume > BONE_HU, truth > BONE_HU),
        "surface_mean_mm": d["mean"],
        "surface_p95_mm": d["p95"],
    }


def synthetic_case(scale, spacing, thickness=4.0, noise=15.0, pixel=0.8, seed=0):
    stacks = simulate_orthogonal_stacks(thickness_mm=thickness, pixel_spacing_mm=pixel, scale=scale,
                                        noise_hu=noise, seed=seed)
    grid = phantom_grid(spacing, scale)
    truth = phantom_truth(grid, scale, supersample=2)
    return stacks, grid, truth


def axial_only(stacks, grid):
    v, covered = resample_stack(stacks[0], grid, "bspline")
    v[~covered] = -1024.0
    return v


def bench_synthetic(args):
    print(f"\n== synthetic: phantom scale {args.scale}, grid {args.spacing} mm, 3 x 4 mm series, 15 HU noise")
    stacks, grid, truth = synthetic_case(args.scale, args.spacing)
    n = grid.n_voxels
    head = truth > -900.0
    truth_surface = metrics.iso_surface(truth, BONE_HU, grid)
    print(f"grid {grid.shape} = {n / 1e6:.1f} M voxels; stacks {[s.shape for s in stacks]}")
    rows = []

    def row(name, volume, seconds, mem, extra=None):
        r = {"method": name, "seconds": seconds, "memory_mb": mem["peak_above_before_mb"],
             "grid_copies": grid_copies(mem["peak_above_before_mb"], n)}
        r.update(quality(volume, truth, grid, head, truth_surface))
        r.update(extra or {})
        rows.append(r)
        return r

    # warm-up (imports, BLAS kernels, first-touch memory) so that both methods are timed warm
    fuse_average(stacks, grid)
    reconstruct_srr(stacks, grid)
    vol, t, mem = measure(axial_only, stacks, grid)
    row("axial only (B-spline)", vol, t, mem)
    del vol
    avg, t_avg, mem = measure(fuse_average, stacks, grid)
    row("average (linear)", avg.volume, t_avg, mem)
    res, t_srr, mem = measure(reconstruct_srr, stacks, grid)
    threads = res.info["threads"]
    prior = (f"hybrid: Tikhonov {res.info['alpha']:g} + Huber {res.info['huber_alpha']:g} "
             f"at {res.info['huber_delta']:g}"
             if res.info.get("huber_alpha") is not None else f"{res.info['regularizer']} {res.info['alpha']:g}")
    row(f"srr, default (auto profile, {prior}, converged, self-check)", res.volume, t_srr, mem,
        {"iterations": res.info["iterations"], "residual": res.info["relative_residual"],
         "timings": res.info["timings_s"], "alpha": res.info["alpha"],
         "profiles": [p["kind"] + " x" + str(p["width_factor"]) for p in res.info["slice_profiles"]]})
    print("default: alpha", res.info["alpha"], "profiles", rows[-1]["profiles"], "stopped by", res.info["stopped_by"],
          "timings", res.info["timings_s"])
    del res
    res_o, t_o, mem = measure(reconstruct_srr, stacks, grid, PREVIOUS_DEFAULT)
    row("srr, previous default (Huber a=0.5, 7 CG over 4 reweightings, Gaussian)", res_o.volume, t_o, mem,
        {"iterations": res_o.info["iterations"]})
    del res_o
    res_h, t_h, mem = measure(reconstruct_srr, stacks, grid, SrrOptions(regularizer="huber"))
    row("srr, Huber, auto profile + alpha, converged", res_h.volume, t_h, mem,
        {"iterations": res_h.info["iterations"], "alpha": res_h.info["alpha"]})
    del res_h
    # Quality against iteration count (the default's prior and weight, box profiles, no early stop; an
    # edge-preserving prior reweights every 4 CG iterations)
    fixed = SrrOptions(alpha=rows[2]["alpha"], psf="box", self_check=False, tolerance=1e-12, solution_tolerance=0.0)
    conv = []
    for it in (2, 4, 8, 16, 32, 64):
        r_it = reconstruct_srr(stacks, grid, replace(fixed, max_iterations=it, outer_iterations=max(1, it // 4)))
        q = quality(r_it.volume, truth, grid, head, truth_surface)
        conv.append({"iterations": it, "psnr_db": q["psnr_db"], "surface_mean_mm": q["surface_mean_mm"],
                     "relative_change": r_it.info["relative_change"]})
        del r_it
    print_table(f"quality against CG iterations (the default's prior ({fixed.regularizer}), box, its alpha, "
                "reweighted every 4; the default stops at "
                f"{rows[2]['iterations']})", conv,
                [("iterations", "iters", ""), ("psnr_db", "PSNR dB", ".2f"), ("surface_mean_mm", "surf mm", ".3f"),
                 ("relative_change", "rel. change", ".2e")])
    print_table(f"synthetic ({n / 1e6:.1f} M voxels)", rows, COLUMNS)
    # Speed: the machine is shared, single timings vary by up to 2x; alternate the two methods a few times
    # and take each one's median (ratios of the runs side by side are printed too).
    pairs = []
    for _ in range(args.speed_runs):
        t0 = time.perf_counter()
        fuse_average(stacks, grid)
        t1 = time.perf_counter()
        reconstruct_srr(stacks, grid)
        pairs.append((t1 - t0, time.perf_counter() - t1))
    med_avg = float(np.median([p[0] for p in pairs]))
    med_srr = float(np.median([p[1] for p in pairs]))
    print(f"speed over {len(pairs)} alternating runs: average {med_avg:.2f} s, srr {med_srr:.2f} s (medians), "
          f"ratio of medians {med_srr / med_avg:.2f}; run by run " + ", ".join(f"{b / a:.2f}" for a, b in pairs))
    ratio = t_srr / t_avg
    print(f"speed: srr (default) / average = {ratio:.2f}; previous default / average = {t_o / t_avg:.2f}; "
          f"default / previous default = {t_srr / t_o:.2f} ({threads} threads)")
    for _ in range(args.speed_runs):
        t0 = time.perf_counter()
        reconstruct_srr(stacks, grid, PREVIOUS_DEFAULT)
        pairs[_] = pairs[_] + (time.perf_counter() - t0,)
    med_old = float(np.median([p[2] for p in pairs]))
    print(f"medians: average {med_avg:.2f} s, default srr {med_srr:.2f} s, previous default {med_old:.2f} s; "
          f"default / previous = {med_srr / med_old:.2f}")
    ax, av, sr = rows[0], rows[1], rows[2]
    print(f"srr - axial: {sr['psnr_db'] - ax['psnr_db']:+.2f} dB; "
          f"srr - average: {sr['psnr_db'] - av['psnr_db']:+.2f} dB; surface mean srr / best baseline = "
          f"{sr['surface_mean_mm'] / min(ax['surface_mean_mm'], av['surface_mean_mm']):.2f}")
    print(markdown_table(rows, COLUMNS))
    return {"grid_shape": grid.shape, "n_voxels": n, "rows": rows, "speed_ratio": ratio, "convergence": conv,
            "speed_runs": pairs, "speed_ratio_median": med_srr / med_avg, "default_over_previous": med_srr / med_old}


def bench_sweep(args):
    cases = [(4.0, 15.0), (2.5, 15.0), (5.0, 30.0), (4.0, 5.0), (3.0, 15.0)]
    alphas = [0.01, 0.03, 0.1, 0.3]
    rows = []
    for thickness, noise in cases:
        stacks, grid, truth = synthetic_case(args.scale, args.sweep_spacing, thickness, noise, seed=7)
        head = truth > -900.0
        ts = metrics.iso_surface(truth, BONE_HU, grid)
        avg = fuse_average(stacks, grid)
        base = quality(avg.volume, truth, grid, head, ts)
        r = {"case": f"{thickness:g} mm, {noise:g} HU", "average": base["psnr_db"],
             "average_surf": base["surface_mean_mm"]}
        for a in alphas:
            q = quality(reconstruct_srr(stacks, grid, SrrOptions(regularizer="tikhonov", alpha=a)).volume,
                        truth, grid, head, ts)
            r[f"a{a:g}"] = q["psnr_db"]
            r[f"a{a:g}_surf"] = q["surface_mean_mm"]
        vax, cax = resample_stack(stacks[0], grid, "bspline")
        vax[~cax] = -1024.0
        q = quality(vax, truth, grid, head, ts)
        r["axial_surf"] = q["surface_mean_mm"]
        q = quality(reconstruct_srr(stacks, grid).volume, truth, grid, head, ts)
        r["huber"] = q["psnr_db"]
        r["huber_surf"] = q["surface_mean_mm"]
        r["huber_ratio"] = q["surface_mean_mm"] / min(r["axial_surf"], r["average_surf"])
        rows.append(r)
        print(r, flush=True)
    cols = [("case", "case", "")] + [("average", "avg dB", ".2f")]
    cols += [(f"a{a:g}", f"tk a={a:g} dB", ".2f") for a in alphas] + [("huber", "default dB", ".2f")]
    cols += [("axial_surf", "axial mm", ".3f"), ("average_surf", "avg mm", ".3f")]
    cols += [(f"a{a:g}_surf", f"tk a={a:g} mm", ".3f") for a in alphas]
    cols += [("huber_surf", "default mm", ".3f"), ("huber_ratio", "default / best baseline", ".2f")]
    print_table(f"sweep (grid {args.sweep_spacing} mm; PSNR dB and 300 HU surface mean mm; tk = Tikhonov, "
                f"default = the library's ({SrrOptions().regularizer}))", rows, cols)
    print(markdown_table(rows, cols))
    return {"rows": rows, "alphas": alphas}


# ------------------------------------------------------------------------------------------------ cli
def bench_cli(args):
    """Wall time of ``multiplanefusion fuse`` end to end (read DICOM, grid, fuse, write NRRD), srr against
    average on the same three simulated DICOM series in one run; registration off (it is the same for both
    methods), so the ratio is the reconstruction's. Each method run twice, the faster kept."""
    import subprocess
    import tempfile

    from MultiPlaneFusionLib.simulation import write_dicom_series

    print(f"\n== cli: fuse end to end, three 4 mm series, --spacing {args.spacing}")
    stacks, grid, _ = synthetic_case(args.scale, args.spacing)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for n, s in enumerate(stacks):
            folder = Path(tmp) / f"s{n}"
            write_dicom_series(s, folder, series_number=n + 1)
            folders.append(str(folder))
        times = {}
        for method in ("average", "srr", "average", "srr"):
            cmd = [sys.executable, "-m", "MultiPlaneFusionLib.cli", "fuse", *folders, "-o", str(Path(tmp) / "f.nrrd"),
                   "--spacing", str(args.spacing), "--method", method, "--no-register", "--quiet"]
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            times[method] = min(times.get(method, 1e9), time.perf_counter() - t)
    for method, t in times.items():
        rows.append({"method": f"fuse --method {method}", "seconds": t})
    ratio = times["srr"] / times["average"]
    print_table("cli (wall time, s)", rows, [("method", "method", ""), ("seconds", "time s", ".2f")])
    print(f"speed end to end: srr / average = {ratio:.2f}")
    return {"rows": rows, "speed_ratio_cli": ratio}


# ----------------------------------------------------------------------------------------------- real
def eval_grid(g1):
    """The 1 mm series' grid at 0.9 mm in-plane (2 x 2 pixel blocks), as in ../shared/data/README.md."""
    d = g1.direction_matrix
    sp = np.asarray(g1.spacing_mm, float)
    origin = np.asarray(g1.origin_mm) + d @ np.array([0.5 * sp[0], 0.5 * sp[1], 0.0])
    return Grid(shape=(g1.shape[0], g1.shape[1] // 2, g1.shape[2] // 2),
                spacing_mm=(2 * sp[0], 2 * sp[1], sp[2]), origin_mm=tuple(float(v) for v in origin),
                direction=g1.direction)


class RealEvaluator:
    """Scores against the 1 mm series on the evaluation grid: correlation inside the object and the 300 HU
    surface distance, over the whole field of view (the issue's bar) and split into the skull (the largest
    piece above 300 HU, dilated by ``SKULL_MARGIN_MM``) and the rest: the thin plastic of the head holder, the
    only thin structures in these series, which a prior that smooths too much erases first."""

    SKULL_MARGIN_MM = 3.0

    def __init__(self, reference, ge):
        self.ge = ge
        r, _ = resample_stack(reference, ge, "linear")
        self.ref = r
        self.mask = r > -500.0
        self.surface = metrics.iso_surface(r, BONE_HU, ge)
        lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((r > BONE_HU).astype(np.uint8)),
                                                             True))
        skull = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
        radius = [int(math.ceil(self.SKULL_MARGIN_MM / s)) for s in ge.spacing_mm]
        skull_mask = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray((lab == skull).astype(np.uint8)),
                                                              radius)) > 0
        self.parts = {"skull": skull_mask, "rest": ~skull_mask}
        self.part_surfaces = {part: metrics.iso_surface(np.where(keep, r, -1024.0).astype(np.float32), BONE_HU, ge)
                              for part, keep in self.parts.items()}

    def __call__(self, volume, grid):
        if grid != self.ge:
            out = sitk.Resample(grid.image(volume), self.ge.image(), sitk.Transform(), sitk.sitkLinear, -1024.0,
                                sitk.sitkFloat32)
            volume = sitk.GetArrayFromImage(out)
        d = metrics.surface_distance(metrics.iso_surface(volume, BONE_HU, self.ge), self.surface)
        scores = {"correlation": metrics.correlation(volume, self.ref, self.mask), "surface_mean_mm": d["mean"],
                  "surface_p95_mm": d["p95"]}
        for part, keep in self.parts.items():
            v = np.where(keep, volume, -1024.0).astype(np.float32)
            dp = metrics.surface_distance(metrics.iso_surface(v, BONE_HU, self.ge), self.part_surfaces[part])
            scores[f"surface_{part}_mean_mm"] = dp["mean"]
            scores[f"surface_{part}_p95_mm"] = dp["p95"]
        # above 300 HU outside the skull, as a fraction of the 1 mm series' count there
        rest = self.parts["rest"]
        scores["rest_bone_fraction"] = float((volume[rest] > BONE_HU).sum() / max(1, (self.ref[rest] > BONE_HU).sum()))
        return scores


def _choices(info):
    """The settings a reconstruction chose from the data: per stack its slice profile (with the in-plane width),
    and the prior with every candidate's score when it was chosen (--regularizer auto)."""
    return {"slice_profiles": info.get("slice_profiles"), "in_plane_choice": info.get("in_plane_choice"),
            "regularizer": info.get("regularizer"), "alpha": info.get("alpha"),
            "prior_choice": info.get("prior_choice")}


def bench_real(args):
    print("\n== real: Philips 5 mm axial + gantry tilts -18.5 / +16.5 deg, grid of the 1 mm series")
    folders = {n: extract_series(n) for n in ("philips_axial_1mm", "philips_axial_5mm", "philips_tilt_minus18",
                                              "philips_tilt_plus16")}
    (ref,) = read_stacks([folders["philips_axial_1mm"]])
    stacks = read_stacks([folders["philips_axial_5mm"], folders["philips_tilt_minus18"],
                          folders["philips_tilt_plus16"]])
    g1 = read_grid_source(folders["philips_axial_1mm"])
    ge = eval_grid(g1)
    grid = g1 if args.real_grid == "1mm" else ge
    ev = RealEvaluator(ref, ge)
    n = grid.n_voxels
    print(f"srr grid {grid.shape} ({n / 1e6:.1f} M voxels); evaluation grid {ge.shape}")
    rows = []

    def row(name, volume, vgrid, seconds=None, mem=None, extra=None, readme=None):
        r = {"method": name, "seconds": seconds}
        if mem is not None:
            r["memory_mb"] = mem["peak_above_before_mb"]
            r["grid_copies"] = grid_copies(mem["peak_above_before_mb"], vgrid.n_voxels)
        r.update(ev(volume, vgrid))
        if readme:
            r["readme"] = "{:.3f} / {:.2f} / {:.2f}".format(*readme)
        r.update(extra or {})
        rows.append(r)
        print({k: v for k, v in r.items() if k != "timings"}, flush=True)

    v, c = resample_stack(stacks[0], ge, "linear")
    row("5 mm alone, linear (eval grid)", np.where(c, v, -1024.0), ge, readme=README_BASELINES["5mm"])
    row("mean of three, linear (eval grid)", fuse_average(stacks, ge).volume, ge, readme=README_BASELINES["mean3"])
    avg, t_avg, mem = measure(fuse_average, stacks, grid)
    row("mean of three, linear", avg.volume, grid, t_avg, mem)
    # option sets besides the default (--real-options; the default is Tikhonov now, so that row is the default's)
    extra_sets = json.loads(args.real_options) if args.real_options else {"Tikhonov": {"regularizer": "tikhonov"}}
    if not args.skip_as_acquired:
        res, t, mem = measure(reconstruct_srr, stacks, grid, None, avg.volume, avg.coverage)
        row("srr, default (as acquired)", res.volume, grid, t, mem, {"iterations": res.info["iterations"],
                                                           "paths": res.info["operator_paths"],
                                                           "timings": res.info["timings_s"]})
        del res
        for name, kw in extra_sets.items():
            res, t, mem = measure(reconstruct_srr, stacks, grid, SrrOptions(**kw), avg.volume, avg.coverage)
            row(f"srr, {name} (as acquired)", res.volume, grid, t, mem, {"iterations": res.info["iterations"],
                                                                  "choices": _choices(res.info)})
            del res
    if args.register:
        from MultiPlaneFusionLib.registration import register_stacks

        (regd, reports), t_reg, _ = measure(register_stacks, stacks, reference=0)
        for rep in reports:
            print(f"  registered '{rep['description']}': translation {np.round(rep['translation_mm'], 2)} mm, "
                  f"rotation {rep['rotation_angle_deg']:.2f} deg")
        avg, t_avg, mem = measure(fuse_average, regd, grid)
        row("mean of three, registered", avg.volume, grid, t_avg, mem, {"registration_s": t_reg})
        res, t, mem = measure(reconstruct_srr, regd, grid, None, avg.volume, avg.coverage)
        row("srr, default (registered)", res.volume, grid, t, mem, {"iterations": res.info["iterations"],
                                                          "paths": res.info["operator_paths"],
                                                          "timings": res.info["timings_s"],
                                                          "choices": _choices(res.info)})
        del res
        for name, kw in extra_sets.items():
            res, t, mem = measure(reconstruct_srr, regd, grid, SrrOptions(**kw), avg.volume, avg.coverage)
            row(f"srr, {name} (registered)", res.volume, grid, t, mem, {"iterations": res.info["iterations"],
                                                                 "timings": res.info["timings_s"],
                                                                 "choices": _choices(res.info)})
            del res
    cols = [("method", "method", ""), ("correlation", "corr", ".3f"), ("surface_mean_mm", "surf mean mm", ".3f"),
            ("surface_p95_mm", "surf p95 mm", ".3f"), ("surface_skull_mean_mm", "skull mm", ".3f"),
            ("surface_rest_mean_mm", "rest mm", ".3f"), ("rest_bone_fraction", "rest >300 HU", ".2f"),
            ("readme", "README corr / mean / p95", ""), ("seconds", "time s", ".1f"),
            ("memory_mb", "peak MB", ".0f"), ("grid_copies", "grid copies", ".1f"),
            ("iterations", "iters", "")]
    print_table(f"real (srr grid {grid.shape}, evaluated on {ge.shape})", rows, cols)
    print(markdown_table(rows, cols))
    return {"grid_shape": grid.shape, "eval_grid_shape": ge.shape, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--sweep", action="store_true", help="alpha sweep over thicknesses and noise levels")
    p.add_argument("--cli", action="store_true", help="end-to-end wall time of `fuse`, srr against average")
    p.add_argument("--register", action="store_true", help="real: also after rigid registration")
    p.add_argument("--real-options", help="real: JSON {name: {SrrOptions field: value}}, each run besides the default "
                                          "(replacing the Tikhonov rows)")
    p.add_argument("--skip-as-acquired", action="store_true",
                   help="real: no srr in scanner geometry (with --register: registered rows only)")
    p.add_argument("--scale", type=float, default=1.0, help="phantom size factor (1 = adult head)")
    p.add_argument("--spacing", type=float, default=0.93, help="synthetic grid spacing, mm (0.93: ~11.5 M voxels)")
    p.add_argument("--sweep-spacing", type=float, default=1.0)
    p.add_argument("--real-grid", choices=("1mm", "eval"), default="1mm",
                   help="srr grid for the real data: the 1 mm series' grid (default) or its 0.9 mm in-plane version")
    p.add_argument("--json", default=str(RESULTS / "bench_srr.json"))
    p.add_argument("--speed-runs", type=int, default=5, help="alternating average/srr runs for the speed ratio")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    out = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)}
    if not args.skip_synthetic:
        out["synthetic"] = bench_synthetic(args)
    if args.sweep:
        out["sweep"] = bench_sweep(args)
    if args.cli:
        out["cli"] = bench_cli(args)
    if not args.skip_real:
        try:
            out["real"] = bench_real(args)
        except FileNotFoundError as e:
            print(f"real section skipped: {e}")
    out["machine_after"] = machine()
    write_json(args.json, out)


if __name__ == "__main__":
    main()
