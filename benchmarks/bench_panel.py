"""The realistic benchmark panel (issue 11): one table with every case, baselines and option sets.

See ``panel.py`` for the cases, the simulation, the position check and the scores.

Usage::

    python benchmarks/bench_panel.py                      # default srr, Tikhonov, average on every case
    python benchmarks/bench_panel.py --cases "P 4mm" "R 5mm" --options '{"mine": {"psf": "auto"}}'
    python benchmarks/bench_panel.py --sweep              # best fixed setting per case next to the default

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
    """Fixed settings: profile x prior x alpha (factors of each prior's fixed default alpha)."""
    from MultiPlaneFusionLib.reconstruction.srr import DEFAULT_ALPHA

    out = {}
    for psf in ("box", "gaussian"):
        for reg in ("tikhonov", "huber"):
            for f in alpha_factors:
                a = round(DEFAULT_ALPHA[reg] * f, 6)
                out[f"{psf} {reg} a={a:g}"] = {"psf": psf, "regularizer": reg, "alpha": a}
    return out


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
    print_table("best fixed setting (by PSNR) per case next to each option set", best_rows,
                [("case", "case", ""), ("option set", "option set", ""), ("psnr_db", "PSNR dB", ".2f"),
                 ("surface_mean_mm", "surf mm", ".3f"), ("best_fixed", "best fixed (PSNR)", ""),
                 ("best_fixed_db", "its dB", ".2f"), ("best_fixed_mm", "its mm", ".3f"),
                 ("minus_best_db", "set - best dB", "+.2f"), ("best_surface_setting", "best fixed (surface)", ""),
                 ("best_surface_mm", "its mm", ".3f")])
    return {"rows": rows, "best": best_rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", help="case names or substrings (default: all)")
    p.add_argument("--options", help="JSON {name: {option: value}} replacing the default option sets")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-position-check", action="store_true")
    p.add_argument("--sweep", action="store_true", help="fixed settings profile x prior x alpha")
    p.add_argument("--alpha-factors", type=float, nargs="+", default=[0.3, 1.0, 3.0],
                   help="sweep: alphas as factors of each prior's fixed default")
    p.add_argument("--skip-panel", action="store_true", help="only --sweep / --model")
    p.add_argument("--json", default=str(RESULTS / "bench_panel.json"))
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    option_sets = json.loads(args.options) if args.options else dict(DEFAULT_OPTION_SETS)
    out = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)}
    t0 = time.perf_counter()
    if not args.skip_panel:
        rows = panel.run_panel(option_sets, args.cases, baselines=not args.no_baselines,
                               check_positions=not args.no_position_check)
        panel.print_panel(rows)
        out["panel"] = {"rows": rows, "summary": panel.summarise(rows)}
        out["panel_seconds"] = time.perf_counter() - t0
        print(f"\npanel wall time {out['panel_seconds']:.0f} s; load {machine()['load_average']}")
    if args.sweep:
        out["sweep"] = run_sweep(args.cases, option_sets, args.alpha_factors)
    out["machine_after"] = machine()
    write_json(args.json, out)


if __name__ == "__main__":
    main()
