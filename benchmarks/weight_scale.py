"""What moves the best prior strength: the hybrid's two shares scaled together on a fine ladder, per case, with
one property of the case changed at a time.

Parts (``--parts``):

- ``pixel``: Philips panel cases with their truth at the panel's 0.902 mm pixels (2 x 2 blocks of the 1 mm
  series) and at the series' own 0.451 mm pixels (``panel.Case.truth_block`` 1; 22.9 M voxels, about 4x the
  time): does the best weight follow the pixel size the series and the grid resolve?
- ``profile``: the panel's geometries with the other slice-profile family (4 mm / 4 Gaussian, 5 mm / 4 box,
  3 mm / 2.5 Gaussian): does it follow the family or the width?
- ``noise``: the 4 mm box case at 5, 15 and 30 HU: does it follow the noise?
- ``real``: the real 5 mm + tilted series (registered) on the panel's grid, as read (0.41-0.48 mm pixels) and
  averaged over 2 x 2 pixel blocks (0.81-0.96 mm): does real data follow the pixel size as the simulation does?

The real series on the 1 mm series' full grid at other weights: ``bench_panel.py --skip-panel --model
--model-options '{"x0.7": {"alpha": 0.035, "huber_alpha": 0.14}, ...}'``.

    python benchmarks/weight_scale.py [--parts pixel profile noise real] [--factors 0.5 0.7 1 1.4 2]
"""

import argparse
import dataclasses
import time

import panel
import SimpleITK as sitk
from common import RESULTS, machine, print_table, write_json

from MultiPlaneFusionLib.pipeline import fuse_stacks
from MultiPlaneFusionLib.reading import read_stacks

C = panel.Case
PANEL = {c.name: c for c in panel.CASES}
P4, P3, P5 = PANEL["P 4mm/4 box 15HU dcm"], PANEL["P 3mm/2.5 box 25HU nrrd"], PANEL["P 5mm/4 gauss 20HU dcm"]
PARTS = {
    "pixel": [P4, P3, P5] + [dataclasses.replace(c, name=c.name + " 0.45px", truth_block=1) for c in (P4, P3, P5)],
    "profile": [C("P 4mm/4 gauss 15HU dcm", "philips", "gaussian", 4.0, 4.0, 15.0, "dicom", 11),
                C("P 5mm/4 box 20HU dcm", "philips", "box", 5.0, 4.0, 20.0, "dicom", 13),
                C("P 3mm/2.5 gauss 25HU nrrd", "philips", "gaussian", 3.0, 2.5, 25.0, "nrrd", 12)],
    "noise": [dataclasses.replace(P4, name=f"P 4mm/4 box {n:g}HU dcm", noise_hu=n) for n in (5.0, 30.0)] + [P4],
}


def factor_sets(factors):
    return {f"x{f:g}": panel.hybrid_scaled(f) for f in factors}


def blocks_of(stack, b):
    """``stack`` with its pixels averaged over ``b`` x ``b`` blocks (the block centres as the new pixels)."""
    if b == 1:
        return stack
    p = panel.block_means(stack.pixels, b)
    di, dj = stack.pixel_spacing_mm
    half = (b - 1) / 2.0
    origins = stack.slice_origins_mm + half * di * stack.row_direction + half * dj * stack.column_direction
    return dataclasses.replace(stack, pixels=p, slice_origins_mm=origins, pixel_spacing_mm=(b * di, b * dj))


def real_rows(sets, log=print):
    prep = panel.PreparedCase(PANEL["R 5mm + tilts (real)"], check_positions=False, log=log)
    read = read_stacks(prep.paths)
    rows = []
    for b in (1, 2):
        stacks = [blocks_of(s, b) for s in read]
        name = "R real series " + ("as read" if b == 1 else "2x2 blocks") + \
            f" ({min(s.pixel_spacing_mm[0] for s in stacks):.2f}-{max(s.pixel_spacing_mm[0] for s in stacks):.2f} mm)"
        for method, overrides in sets.items():
            t = time.perf_counter()
            res = fuse_stacks([dataclasses.replace(s) for s in stacks], panel.fuse_options(overrides, prep.grid, True))
            row = {"case": name, "kind": "option", "method": method, "seconds": time.perf_counter() - t,
                   **prep.scorer(sitk.GetArrayFromImage(res.image))}
            log(panel._row_text(row))
            rows.append(row)
    return rows


def best_table(rows, factors):
    """One dict per case: PSNR / surface at every factor, the best factor by PSNR and its gain over x1."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = {r["method"]: r for r in rows if r["case"] == case and r["kind"] == "option"}
        best = max(rs.values(), key=lambda r: r["psnr_db"])
        row = {"case": case, "best": best["method"],
               "gain": best["psnr_db"] - rs["x1"]["psnr_db"] if "x1" in rs else None}
        for m, r in rs.items():
            row[m] = f"{r['psnr_db']:.2f} / {r['surface_mean_mm']:.3f}"
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="*", default=["pixel", "profile", "noise", "real"],
                    choices=["pixel", "profile", "noise", "real"])
    ap.add_argument("--factors", nargs="*", type=float, default=[0.5, 0.7, 1.0, 1.4, 2.0])
    ap.add_argument("--json", default=str(RESULTS / "weight_scale.json"))
    args = ap.parse_args()
    sets = factor_sets(args.factors)
    started, rows = time.strftime("%Y-%m-%d %H:%M"), []
    cases = [c for p in args.parts if p in PARTS for c in PARTS[p]]
    if cases:
        rows += panel.run_panel(sets, list(dict.fromkeys(cases)), baselines=False, check_positions=False)
    if "real" in args.parts:
        rows += real_rows(sets)
    table = best_table(rows, args.factors)
    columns = [("case", "case", "")] + [(m, m, "") for m in sets] + [("best", "best (PSNR)", ""),
                                                                     ("gain", "best - x1 dB", "+.2f")]
    print_table(f"best hybrid factor (both shares x factor; PSNR dB / 300 HU surface mean mm; {started}, "
                f"{machine()})", table, columns)
    write_json(args.json, {"started": started, "machine": machine(), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
