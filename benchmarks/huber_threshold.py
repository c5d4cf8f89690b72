"""Huber threshold from the inputs' texture on the realistic panel (issue 11, point 4; an experiment).

The statistic, measured on the input series only (no truth): per series, the median in-plane gradient
magnitude (forward differences / pixel spacing) over the pixels inside the object (> -500 HU), in the
reconstruction's normalised units (``srr._robust_range`` above -1024 HU); the median over the series.
Real anatomy is textured everywhere (the Philips cases: 0.07-0.08 per mm), the analytic phantom is
piecewise constant (0.007-0.03), which is the split between the cases that want a high threshold and
those that want a low one in the grid of README "Current figures". A rule sets
``huber_delta = factor x statistic`` at a fixed alpha; each rule runs through the panel's user path with
that number as the fixed threshold.

``--floor F`` (an experiment, not a library setting): the IRLS weights ``min(1, delta / |grad|)`` are
raised to at least F, i.e. a weighted combination of Tikhonov (weight alpha x F, kept at edges) and Huber,
by wrapping the solver's weight function for this process.

Usage::

    python benchmarks/huber_threshold.py --rules 0.5:2 0.5:1 0.3:2.5 [--cases "P " "A "]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import panel  # noqa: E402
from common import RESULTS, machine, write_json  # noqa: E402

from MultiPlaneFusionLib.reading import read_stacks  # noqa: E402
from MultiPlaneFusionLib.reconstruction.srr import _robust_range  # noqa: E402

INSIDE_HU = -500.0


def texture_statistic(stacks, offset=-1024.0):
    """Median over the series of the median in-plane |gradient| (per mm) inside the object, normalised."""
    scale = _robust_range(stacks, offset)
    per = []
    for s in stacks:
        p = s.pixels.astype(np.float32)
        di, dj = s.pixel_spacing_mm
        gi = np.diff(p, axis=2)[:, :-1, :] / np.float32(di)
        gj = np.diff(p, axis=1)[:, :, :-1] / np.float32(dj)
        g = np.sqrt(gi * gi + gj * gj)
        inside = p[:, :-1, :-1] > INSIDE_HU
        if inside.any():
            per.append(float(np.median(g[inside])) / scale)
    return float(np.median(per)) if per else 0.0


def floor_weights(floor):
    """Make the solvers' Huber weights at least ``floor`` (this process only)."""
    from MultiPlaneFusionLib.reconstruction import solvers

    plain = solvers.huber_weights

    def floored(*args, **kwargs):
        w = plain(*args, **kwargs)
        np.maximum(w, w.dtype.type(floor), out=w)
        return w

    solvers.huber_weights = floored


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", help="case names or substrings (default: all)")
    p.add_argument("--rules", nargs="+", default=["0.5:2"], help="ALPHA:FACTOR, delta = FACTOR x statistic")
    p.add_argument("--floor", type=float, default=None, help="experiment: Huber weights at least this")
    p.add_argument("--no-default", action="store_true", help="skip the default (Tikhonov) row")
    p.add_argument("--json", default=str(RESULTS / "huber_threshold.json"))
    args = p.parse_args(argv)
    if args.floor:
        floor_weights(args.floor)
    rules = [tuple(float(v) for v in r.split(":")) for r in args.rules]
    rows = []
    for case in panel.get_cases(args.cases):
        print(f"== {case.name}")
        prep = panel.PreparedCase(case, check_positions=False)
        stat = texture_statistic(read_stacks(prep.paths))
        print(f"  texture statistic {stat:.4f} per mm")
        sets = {} if args.no_default else {"default": {}}
        for alpha, factor in rules:
            name = f"huber a={alpha:g} d={factor:g}xtex" + (f" floor {args.floor:g}" if args.floor else "")
            sets[name] = {"regularizer": "huber", "alpha": alpha, "huber_delta": factor * stat}
        for name, overrides in sets.items():
            row = panel.option_row(prep, name, overrides)
            row["texture_statistic"] = stat
            rows.append(row)
    out = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    for r in rows:
        d = r["options"].get("huber_delta")
        print(f"{r['case']:<26} {r['method']:<24} delta {'' if d is None else f'{d:.4f}':<7} "
              f"{r['psnr_db']:.2f} / {r['surface_mean_mm']:.3f}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
