"""Benchmark of the rigid registration: recovered vs true motions, real series, speed, refinement cycles.

Sections
--------
- ``synthetic``: per seed, axial (reference), coronal and sagittal phantom stacks; the coronal and sagittal
  ones imaged with a random rigid patient motion (translation up to 8 mm, rotation up to 5 degrees about a
  random axis through the head centre). Table: true vs recovered translation (displacement of the stack
  centre, mm) and rotation (rotation vector, degrees), target registration error (TRE: mean distance over the
  8 corners of the head's bounding box), accepted, iterations, seconds.
- ``real``: the Philips series of ../shared/data (5 mm axial reference, gantry tilts -18.5 and +16.5 degrees),
  as acquired and with 3 mm / 2 degree offsets written into the tilted series' geometry; correlation of the
  average fusion with the 1 mm series (its grid at 0.9 mm in-plane, inside the phantom: 1 mm > -500 HU)
  before and after registration; the change of geometry and the moved-vs-unmoved agreement (TRE over the
  5 mm series' corners). Also the 1 mm vs 5 mm reformats of one acquisition (must not move).
- ``large``: large motion (``--large-angles``, default 0/10/17/25 degrees about a random axis through the head
  centre, with translations of 0-15 mm in a random direction, ``--large-seeds`` per angle): a coronal and a
  sagittal phantom stack registered to the axial one with the default options, as a stack of the same frame
  of reference and of another one, and (same frame) without the rotation search (``motion_search='off'``) to
  show what it buys. Table: TRE, accepted, motion class, whether the search ran / won, seconds.
- ``timing``: registration vs super-resolution reconstruction on the same input through the pipeline
  (``fuse_stacks``), synthetic seed 0 (and the real Philips series with ``--real-srr``, several minutes).
- ``cycles``: refinement cycles 0, 1, 2 (``--cycles``) on synthetic seed 0 with motion: PSNR and
  correlation of the srr volume with the phantom truth inside the head, TRE per stack, times.

Usage::

    python benchmarks/bench_registration.py [--seeds 8] [--scale 0.75] [--skip-real] [--real-srr]
        [--cycles 0,1,2] [--large-angles 0,10,17,25] [--large-seeds 4] [--json PATH]

Prints tables and writes JSON (default benchmarks/results/bench_registration.json).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import extract_series, shared_data_dir  # noqa: E402

from MultiPlaneFusionLib.grid import Grid  # noqa: E402
from MultiPlaneFusionLib.metrics import correlation, psnr
from MultiPlaneFusionLib.pipeline import FuseOptions, fuse_stacks
from MultiPlaneFusionLib.reading import read_stacks
from MultiPlaneFusionLib.reconstruction import fuse_average
from MultiPlaneFusionLib.registration import (
    RegistrationOptions,
    describe_motion,
    register_stacks,
    rigid_matrix,
    target_registration_error,
)
from MultiPlaneFusionLib.sampling import resample_stack
from MultiPlaneFusionLib.simulation import phantom_bounds_mm, phantom_truth, simulate_stack
from MultiPlaneFusionLib.transforms import apply, box_corners

REPO = Path(__file__).resolve().parents[1]
ORIENTATIONS = ("axial", "coronal", "sagittal")


def _fmt(v, nd=2):
    return "(" + ", ".join(f"{x:+.{nd}f}" for x in v) + ")"


# ------------------------------------------------------------------------------------------ synthetic
def head(scale):
    lo, hi = phantom_bounds_mm(scale)
    corners = box_corners(lo + 6.0 * scale, hi - 6.0 * scale)  # the bounds carry 6 mm (x scale) of air
    return corners, corners.mean(axis=0)


def motion_for(rng, centre, max_t=8.0, max_r=5.0):
    axis = rng.normal(size=3)
    direction = rng.normal(size=3)
    return rigid_matrix(
        axis / np.linalg.norm(axis) * rng.uniform(0.0, max_r),
        direction / np.linalg.norm(direction) * rng.uniform(0.0, max_t),
        centre,
    )


def synthetic_case(seed, args, still=False):
    """Three stacks of one seed (reference without motion) and the true motions (``still``: no motion, same
    noise)."""
    _, centre = head(args.scale)
    rng = np.random.default_rng(1000 + seed)
    motions = [np.eye(4), motion_for(rng, centre), motion_for(rng, centre)]
    stacks = [
        simulate_stack(o, thickness_mm=args.thickness, pixel_spacing_mm=args.pixel, scale=args.scale, noise_hu=15.0,
                       seed=3 * seed + n, motion=None if still else m, frame_of_reference_uid="1.2.3.9")
        for n, (o, m) in enumerate(zip(ORIENTATIONS, motions))
    ]
    return stacks, motions


def bench_synthetic(args):
    corners, _ = head(args.scale)
    rows = []
    print(f"\n== synthetic: scale {args.scale}, pixel {args.pixel} mm, slices {args.thickness} mm, "
          f"{args.seeds} seeds")
    print(f"{'seed':>4} {'stack':9} {'true t (mm)':>24} {'rec t (mm)':>24} {'true r (deg)':>24} "
          f"{'rec r (deg)':>24} {'TRE mm':>7} {'before':>7} {'ok':>3} {'it':>4} {'s':>5}")
    for seed in range(args.seeds):
        stacks, motions = synthetic_case(seed, args)
        t0 = time.perf_counter()
        out, reports = register_stacks(stacks)
        seconds = time.perf_counter() - t0
        for n in (1, 2):
            truth = np.linalg.inv(motions[n])
            centre = stacks[n].corners_mm().mean(axis=0)
            true = describe_motion(truth, centre)
            rec = reports[n]
            tre = target_registration_error(out[n].transform, truth, corners)
            before = target_registration_error(np.eye(4), truth, corners)
            rows.append({
                "seed": seed, "stack": ORIENTATIONS[n], "true_translation_mm": true["translation_mm"],
                "true_rotation_deg": true["rotation_deg"], "recovered_translation_mm": rec["translation_mm"],
                "recovered_rotation_deg": rec["rotation_deg"], "tre_mm": tre, "tre_before_mm": before,
                "accepted": rec["accepted"], "iterations": rec["iterations"], "seconds": rec["seconds"],
            })
            print(f"{seed:>4} {ORIENTATIONS[n]:9} {_fmt(true['translation_mm']):>24} {_fmt(rec['translation_mm']):>24} "
                  f"{_fmt(true['rotation_deg']):>24} {_fmt(rec['rotation_deg']):>24} {tre:7.3f} {before:7.2f} "
                  f"{'y' if rec['accepted'] else 'N':>3} {rec['iterations']:4d} {rec['seconds']:5.1f}")
        print(f"      (3 stacks registered in {seconds:.1f} s)")
    tre = np.array([r["tre_mm"] for r in rows])
    summary = {"mean_tre_mm": float(tre.mean()), "max_tre_mm": float(tre.max()),
               "all_accepted": all(r["accepted"] for r in rows),
               "mean_seconds_per_stack": float(np.mean([r["seconds"] for r in rows]))}
    print(f"TRE mean {summary['mean_tre_mm']:.3f} mm, max {summary['max_tre_mm']:.3f} mm; "
          f"{summary['mean_seconds_per_stack']:.1f} s per stack")
    return {"rows": rows, "summary": summary}


# ----------------------------------------------------------------------------------------- large motion
def bench_large(args):
    corners, centre = head(args.scale)
    print(f"\n== large motion: scale {args.scale}, pixel {args.pixel} mm, slices {args.thickness} mm, "
          f"{args.large_seeds} seeds per angle, translations 0-15 mm")
    print(f"{'deg':>4} {'mm':>5} {'seed':>4} {'stack':9} {'frame':6} {'search':7} {'TRE mm':>7} {'before':>7} "
          f"{'ok':>3} {'motion':11} {'searched':>8} {'won':>4} {'s':>6}")
    ref = simulate_stack("axial", thickness_mm=args.thickness, pixel_spacing_mm=args.pixel, scale=args.scale,
                         noise_hu=15.0, seed=0, frame_of_reference_uid="1.2.3.9")
    rows = []
    for angle in args.large_angles:
        for seed in range(args.large_seeds):
            rng = np.random.default_rng(5000 + seed)
            axis, direction = rng.normal(size=3), rng.normal(size=3)
            shift = 15.0 * seed / max(1, args.large_seeds - 1)
            motion = rigid_matrix(axis / np.linalg.norm(axis) * angle, direction / np.linalg.norm(direction) * shift,
                                  centre)
            truth = np.linalg.inv(motion)
            for n, orientation in ((1, "coronal"), (2, "sagittal")):
                for frame, mode in (("same", "auto"), ("other", "auto"), ("same", "off")):
                    moving = simulate_stack(
                        orientation, thickness_mm=args.thickness, pixel_spacing_mm=args.pixel, scale=args.scale,
                        noise_hu=15.0, seed=3 * seed + n, motion=motion,
                        frame_of_reference_uid="1.2.3.9" if frame == "same" else "1.2.3.10")
                    t0 = time.perf_counter()
                    out, reports = register_stacks([ref, moving], options=RegistrationOptions(motion_search=mode))
                    seconds = time.perf_counter() - t0
                    rep = reports[1]
                    search = rep.get("search") or {}
                    row = {"angle_deg": angle, "translation_mm": shift, "seed": seed, "stack": orientation,
                           "frame": frame, "motion_search": mode,
                           "tre_mm": target_registration_error(out[1].transform, truth, corners),
                           "tre_before_mm": target_registration_error(np.eye(4), truth, corners),
                           "accepted": rep["accepted"], "motion": rep["motion"], "gain": rep["gain"],
                           "initialisation": rep["initialisation"], "searched": bool(search),
                           "search_won": bool(search.get("won")), "seconds": seconds}
                    rows.append(row)
                    print(f"{angle:4.0f} {shift:5.1f} {seed:4d} {orientation:9} {frame:6} {mode:7} "
                          f"{row['tre_mm']:7.3f} {row['tre_before_mm']:7.2f} {'y' if rep['accepted'] else 'N':>3} "
                          f"{str(rep['motion']):11} "
                          f"{'y' if search else '-':>8} {'y' if search.get('won') else '-':>4} {seconds:6.1f}",
                          flush=True)
    summary = []
    print(f"\n{'deg':>4} {'frame':6} {'search':7} {'max TRE':>8} {'<=0.5 mm':>9} {'accepted':>9} {'mean s':>7}")
    for angle in args.large_angles:
        for frame, mode in (("same", "auto"), ("other", "auto"), ("same", "off")):
            sel = [r for r in rows if r["angle_deg"] == angle and r["frame"] == frame and r["motion_search"] == mode]
            tre = np.array([r["tre_mm"] for r in sel])
            entry = {"angle_deg": angle, "frame": frame, "motion_search": mode, "max_tre_mm": float(tre.max()),
                     "within_0_5_mm": int(np.sum(tre <= 0.5)), "n": len(sel),
                     "accepted": int(sum(r["accepted"] for r in sel)),
                     "mean_seconds": float(np.mean([r["seconds"] for r in sel]))}
            summary.append(entry)
            print(f"{angle:4.0f} {frame:6} {mode:7} {entry['max_tre_mm']:8.3f} "
                  f"{entry['within_0_5_mm']:>5}/{len(sel):<3} {entry['accepted']:>5}/{len(sel):<3} "
                  f"{entry['mean_seconds']:7.1f}")
    return {"rows": rows, "summary": summary}


# ----------------------------------------------------------------------------------------------- real
def read_series(name):
    return read_stacks(extract_series(name))[0]


def evaluation_grid(one, in_plane_mm=0.9):
    """The 1 mm series' field of view and slices, resampled to ``in_plane_mm`` in-plane."""
    nk, nj, ni = one.shape
    di, dj = one.pixel_spacing_mm
    size = (int(ni * di / in_plane_mm), int(nj * dj / in_plane_mm))
    corner = one.slice_origins_mm[0] - 0.5 * (di * one.row_direction + dj * one.column_direction)
    origin = corner + 0.5 * in_plane_mm * (one.row_direction + one.column_direction)
    direction = np.column_stack([one.row_direction, one.column_direction, one.normal])
    return Grid((nk, size[1], size[0]), (in_plane_mm, in_plane_mm, one.slice_step_mm), tuple(origin),
                tuple(direction.ravel()))


def displaced(stack, motion):
    r = motion[:3, :3]
    return replace(stack, slice_origins_mm=apply(motion, stack.slice_origins_mm),
                   row_direction=r @ stack.row_direction, column_direction=r @ stack.column_direction)


def bench_real(args, tmp):
    if shared_data_dir() is None:
        print("\n== real: skipped (../shared/data/dcm_qa_ct not found)")
        return None
    names = ("philips_axial_5mm", "philips_tilt_minus18", "philips_tilt_plus16", "philips_axial_1mm")
    ref5, minus18, plus16, one = (read_series(n) for n in names)
    grid = evaluation_grid(one)
    truth, covered = resample_stack(one, grid)
    inside = covered & (truth > -500)

    def score(stacks):
        fused = fuse_average(stacks, grid)
        return correlation(fused.volume, truth, inside & (fused.coverage > 0))

    box = ref5.corners_mm()
    centre = box.mean(axis=0)
    offsets = [rigid_matrix(np.array([1.0, 0.0, 1.0]) / np.sqrt(2) * 2.0, (3.0, 0.0, 0.0), centre),
               rigid_matrix((0.0, -2.0, 0.0), np.array([0.0, 1.0, -1.0]) / np.sqrt(2) * 3.0, centre)]
    stacks = [ref5, minus18, plus16]
    moved = [ref5] + [displaced(s, m) for s, m in zip(stacks[1:], offsets)]
    t0 = time.perf_counter()
    reg_unmoved, rep_unmoved = register_stacks(stacks)
    t_unmoved = time.perf_counter() - t0
    t0 = time.perf_counter()
    reg_moved, rep_moved = register_stacks(moved)
    t_moved = time.perf_counter() - t0
    t0 = time.perf_counter()
    same, rep_same = register_stacks([one, ref5])
    t_same = time.perf_counter() - t0
    res = {
        "fused_correlation": {"as_acquired": score(stacks), "as_acquired_registered": score(reg_unmoved),
                              "moved": score(moved), "moved_registered": score(reg_moved)},
        "seconds": {"as_acquired": t_unmoved, "moved": t_moved, "1mm_vs_5mm": t_same},
        "stacks": [],
        "one_vs_five_change_tre_mm": target_registration_error(same[1].transform, np.eye(4), box),
        "one_vs_five_report": {k: rep_same[1][k] for k in ("translation_mm", "rotation_deg", "accepted")},
    }
    for k, m in ((1, offsets[0]), (2, offsets[1])):
        res["stacks"].append({
            "stack": stacks[k].description + (" tilt -18.5" if k == 1 else " tilt +16.5"),
            "as_acquired_translation_mm": rep_unmoved[k]["translation_mm"],
            "as_acquired_rotation_deg": rep_unmoved[k]["rotation_deg"],
            "as_acquired_change_tre_mm": target_registration_error(reg_unmoved[k].transform, np.eye(4), box),
            "moved_vs_unmoved_tre_mm": target_registration_error(
                reg_moved[k].transform, reg_unmoved[k].transform @ np.linalg.inv(m), box),
            "moved_vs_scanner_tre_mm": target_registration_error(reg_moved[k].transform, np.linalg.inv(m), box),
            "accepted": [rep_unmoved[k]["accepted"], rep_moved[k]["accepted"]],
        })
    fc = res["fused_correlation"]
    print("\n== real: Philips 5 mm axial + tilted series, average fusion vs the 1 mm series (0.9 mm in-plane)")
    print(f"fused correlation: as acquired {fc['as_acquired']:.4f} -> registered {fc['as_acquired_registered']:.4f}; "
          f"moved 3 mm/2 deg {fc['moved']:.4f} -> registered {fc['moved_registered']:.4f}")
    for s in res["stacks"]:
        print(f"  {s['stack']:24} as acquired: t {_fmt(s['as_acquired_translation_mm'])} mm, "
              f"r {_fmt(s['as_acquired_rotation_deg'])} deg, change {s['as_acquired_change_tre_mm']:.3f} mm TRE; "
              f"moved vs unmoved result {s['moved_vs_unmoved_tre_mm']:.3f} mm TRE")
    print(f"  1 mm vs 5 mm reformats (one acquisition): change {res['one_vs_five_change_tre_mm']:.3f} mm TRE")
    print(f"  time: {t_unmoved:.1f} s (as acquired), {t_moved:.1f} s (moved) for two stacks")
    res["_stacks"] = (stacks, grid, truth, inside)
    return res


# ---------------------------------------------------------------------------------------- timing, cycles
def srr_run(stacks, cycles, grid=None, register=True):
    options = FuseOptions(method="srr", grid=grid, register=register,
                          registration=RegistrationOptions(refine_cycles=cycles))
    t0 = time.perf_counter()
    result = fuse_stacks(stacks, options)
    total = time.perf_counter() - t0
    timings = dict(result.summary["timings_s"])
    refine = sum(v for k, v in timings.items() if k.startswith("refine"))
    return result, {"total_s": total, "register_s": timings.get("register_s", 0.0), "refine_s": refine,
                    "srr_s": timings.get("srr_s", 0.0), "timings_s": timings}


def bench_cycles(args):
    """srr quality against the phantom: motion-free, moved without registration, moved with 0..N cycles."""
    stacks, motions = synthetic_case(0, args)
    still = synthetic_case(0, args, still=True)[0]
    corners, _ = head(args.scale)
    rows = []
    truth = inside = None
    print(f"\n== srr with refinement cycles (synthetic seed 0, scale {args.scale}, slices {args.thickness} mm)")
    print(f"{'case':28} {'PSNR dB':>8} {'corr':>7} {'TRE cor':>8} {'TRE sag':>8} {'register s':>10} "
          f"{'refine s':>9} {'srr s':>7} {'reg/srr':>8} {'fuse s':>7} {'paths'}")
    cases = [("motion-free, not registered", still, 0, False)]
    cases += [(f"motion-free, registered, {c} cycles", still, c, True) for c in args.cycles]
    cases += [("moved, not registered", stacks, 0, False)]
    cases += [(f"moved, registered, {c} cycles", stacks, c, True) for c in args.cycles]
    grid = None
    for name, inputs, cycles, register in cases:
        # Every case on the motion-free case's grid (the overlap of the stacks in place) so the scores compare.
        result, t = srr_run(inputs, cycles, grid=grid, register=register)
        if truth is None:
            grid = result.grid
            truth = phantom_truth(grid, args.scale)
            inside = truth > -500
        volume = sitk.GetArrayFromImage(result.image)
        truths = [np.eye(4)] * 3 if inputs is still else [np.linalg.inv(m) for m in motions]
        tre = [target_registration_error(result.stacks[n].transform, truths[n], corners) for n in (1, 2)]
        shift = [r.get("cycle_max_shift_mm") for r in result.summary["registration"] if "cycle" in r]
        row = {"case": name, "cycles": cycles, "registered": register, "psnr_db": psnr(volume, truth, inside),
               "correlation": correlation(volume, truth, inside), "tre_mm": tre, "cycle_max_shift_mm": shift, **t,
               "ratio_register_to_srr": (t["register_s"] + t["refine_s"]) / t["srr_s"]}
        rows.append(row)
        print(f"{name:28} {row['psnr_db']:8.2f} {row['correlation']:7.4f} {tre[0]:8.3f} {tre[1]:8.3f} "
              f"{t['register_s']:10.1f} {t['refine_s']:9.1f} {t['srr_s']:7.1f} {row['ratio_register_to_srr']:8.3f} "
              f"{t['total_s']:7.1f} {','.join(result.summary['reconstruction'].get('operator_paths', []))}")
    return rows


def bench_real_srr(real):
    stacks, grid, truth, inside = real["_stacks"]
    result, t = srr_run(stacks, 0, grid)
    volume = sitk.GetArrayFromImage(result.image)
    row = {**t, "ratio_register_to_srr": t["register_s"] / t["srr_s"],
           "correlation": correlation(volume, truth, inside)}
    print(f"\n== real srr timing: registration {t['register_s']:.1f} s vs srr {t['srr_s']:.1f} s "
          f"(ratio {row['ratio_register_to_srr']:.3f}); srr correlation with the 1 mm series {row['correlation']:.4f}")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--scale", type=float, default=0.75)
    p.add_argument("--pixel", type=float, default=1.0)
    p.add_argument("--thickness", type=float, default=4.0)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--real-srr", action="store_true", help="also time srr on the real series (minutes)")
    p.add_argument("--cycles", default="0,1,2", help="refinement cycles to compare ('' to skip)")
    p.add_argument("--large-angles", default="0,10,17,25", help="large-motion rotations in degrees ('' to skip)")
    p.add_argument("--large-seeds", type=int, default=4, help="large-motion cases per angle (translations 0-15 mm)")
    p.add_argument("--skip-synthetic", action="store_true", help="skip the small-motion synthetic table")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "bench_registration.json"))
    args = p.parse_args(argv)
    args.cycles = [int(v) for v in args.cycles.split(",") if v.strip()]
    args.large_angles = [float(v) for v in args.large_angles.split(",") if v.strip()]
    out = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
           "options": RegistrationOptions().summary(), "args": {k: v for k, v in vars(args).items()},
           "load_average_start": os.getloadavg()}
    print(f"load average at start (1, 5, 15 min): {_fmt(out['load_average_start'])} on {os.cpu_count()} cpus")
    if not args.skip_synthetic:
        out["synthetic"] = bench_synthetic(args)
    if args.large_angles:
        out["large"] = bench_large(args)
    if not args.skip_real:
        with tempfile.TemporaryDirectory() as tmp:
            real = bench_real(args, tmp)
            if real is not None and args.real_srr:
                real["srr_timing"] = bench_real_srr(real)
            if real is not None:
                real.pop("_stacks")
            out["real"] = real
    if args.cycles:
        out["cycles"] = bench_cycles(args)
    out["load_average_end"] = os.getloadavg()
    print(f"load average at end (1, 5, 15 min): {_fmt(out['load_average_end'])}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
