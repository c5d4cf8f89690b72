"""The issue-date engine against today's default on the panel: issue 11's held-out bars moved onto the panel.

Issue 11's held-out table was measured with the engine of its date (commit ``ISSUE_DATE_COMMIT``) on cases
this repository does not hold; its bars sit a fixed step above that table's best fixed setting (e.g. 39.0 dB
/ 0.075 mm against Tikhonov + box's 38.7 / 0.080 on the 4 mm box case). The panel's first three Philips cases
repeat those cases' geometry, profile, noise and file format on another truth. This script runs the
issue-date engine (a ``git archive`` of that commit, its own CLI in a subprocess: ``fuse --grid-like TRUTH
--no-register`` with the issue table's flags) and today's default on the same panel series, scores both with
the panel's scorer, and states each bar as the same step above the issue-date setting the bar is keyed on.
PSNR levels differ between truths (see ``panel.py``), so only such within-case steps carry over.

Usage::

    python benchmarks/issue_date.py                          # every simulated panel case
    python benchmarks/issue_date.py --cases "P 4mm" "P 3mm"  # some of them
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

import panel  # noqa: E402
from common import REPO, RESULTS, cache_dir, machine, print_table, write_json  # noqa: E402

ISSUE_DATE_COMMIT = "c0457ca"  # main when issue 11 was filed (2026-12-01 21:39), before any of its work

# The issue table's columns (flags of the issue-date CLI, "tried as a new user would").
OLD_SETTINGS = {
    "srr default": [],
    "srr tikhonov (gaussian)": ["--regularizer", "tikhonov"],
    "srr tikhonov + box": ["--regularizer", "tikhonov", "--psf", "box"],
    "srr huber + box": ["--psf", "box"],
}

# Held-out bars (PSNR dB, surface mm) per panel case, with the issue table's setting and figures they are keyed
# on: the bars are that setting's figures plus a step.
HELD_OUT = {
    "P 4mm/4 box 15HU dcm": {"bar": (39.0, 0.075), "keyed_on": "srr tikhonov + box", "table": (38.7, 0.080)},
    "P 3mm/2.5 box 25HU nrrd": {"bar": (40.5, 0.058), "keyed_on": "srr tikhonov + box", "table": (40.2, 0.060)},
    "P 5mm/4 gauss 20HU dcm": {"bar": (37.5, 0.100), "keyed_on": "srr tikhonov (gaussian)", "table": (37.2, 0.107)},
}

# The issue's table (PSNR dB on its held-out cases), to check the analogue: each column's step from the keyed
# setting there against the same step here. "axial" is the axial series alone (B-spline).
ISSUE_TABLE_DB = {
    "P 4mm/4 box 15HU dcm": {"axial": 31.7, "average": 29.4, "srr default": 33.6, "srr tikhonov (gaussian)": 35.6,
                             "srr tikhonov + box": 38.7, "srr huber + box": 35.9},
    "P 3mm/2.5 box 25HU nrrd": {"axial": 35.7, "average": 32.9, "srr default": 35.0,
                                "srr tikhonov (gaussian)": 37.8, "srr tikhonov + box": 40.2, "srr huber + box": 36.9},
    "P 5mm/4 gauss 20HU dcm": {"axial": 29.8, "srr default": 34.9, "srr tikhonov (gaussian)": 37.2,
                               "srr tikhonov + box": 36.0},
}


def old_tree(commit=ISSUE_DATE_COMMIT):
    """The issue-date source tree (extracted once into the benchmark cache)."""
    dest = cache_dir() / f"engine-{commit}"
    done = dest / ".complete"
    if not done.exists():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"cannot extract commit {commit} (a full clone of the repository is needed): "
                             f"{archive.stderr.decode(errors='replace').strip()}")
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        done.write_text(commit)
    return dest


def run_old(tree, paths, truth_path, flags, work):
    """(volume, wall seconds, the old CLI's JSON summary) of one issue-date fusion."""
    out = Path(work) / "old.nrrd"
    summary = Path(work) / "old.json"
    env = dict(os.environ, PYTHONPATH=str(Path(tree) / "MultiPlaneFusion"))
    cmd = [sys.executable, "-m", "MultiPlaneFusionLib.cli", "fuse", *[str(p) for p in paths], "-o", str(out),
           "--grid-like", str(truth_path), "--no-register", "--quiet", "--json", str(summary), *flags]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"issue-date engine failed ({' '.join(flags) or 'defaults'}): {done.stderr.strip()}")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out))), seconds, json.loads(summary.read_text())


def run_case(case, tree, log=print):
    prep = panel.PreparedCase(case, check_positions=True, log=log)
    rows = panel.baseline_rows(prep, log)
    with tempfile.TemporaryDirectory() as work:
        truth_path = Path(work) / "truth.nrrd"
        sitk.WriteImage(prep.grid.image(prep.truth), str(truth_path))
        for name, flags in OLD_SETTINGS.items():
            vol, seconds, summary = run_old(tree, prep.paths, truth_path, flags, work)
            if vol.shape != tuple(prep.grid.shape):
                raise RuntimeError(f"issue-date output {vol.shape} is not on the truth grid {prep.grid.shape}")
            row = {"case": case.name, "kind": "option", "method": "issue date: " + name, "seconds": seconds,
                   **prep.scorer(vol), "summary_timings": summary.get("timings_s")}
            log(panel._row_text(row))
            rows.append(row)
    rows.append(panel.option_row(prep, "today: default", {}, log))
    return rows


def _cases_in(rows, table):
    """(case, its entry of ``table``, its rows by method) for each case of ``table`` that ``rows`` hold."""
    for case, entry in table.items():
        mine = {r["method"]: r for r in rows if r["case"] == case}
        if mine:
            yield case, entry, mine


def bars(rows):
    """Per held-out-like case: the bar moved onto the panel and today's default against it."""
    out = []
    for case, h, mine in _cases_in(rows, HELD_OUT):
        ref = mine["issue date: " + h["keyed_on"]]
        today = mine["today: default"]
        step_db = h["bar"][0] - h["table"][0]
        ratio = h["bar"][1] / h["table"][1]
        bar_db = ref["psnr_db"] + step_db
        bar_mm = ref["surface_mean_mm"] * ratio
        best_single = max(r["psnr_db"] for name, r in mine.items() if name.startswith("single"))
        out.append({"case": case, "keyed_on": h["keyed_on"], "ref_db": ref["psnr_db"],
                    "ref_mm": ref["surface_mean_mm"], "bar_db": bar_db, "bar_mm": bar_mm,
                    "today_db": today["psnr_db"], "today_mm": today["surface_mean_mm"],
                    "margin_db": today["psnr_db"] - bar_db, "surface_vs_bar": today["surface_mean_mm"] / bar_mm,
                    "vs_best_single_db": today["psnr_db"] - best_single,
                    "met": bool(today["psnr_db"] >= bar_db and today["surface_mean_mm"] <= bar_mm
                                and today["psnr_db"] > best_single)})
    return out


def analogue_steps(rows):
    """Per case and issue-table column: its PSNR step from the keyed setting in the issue's table and here."""
    out = []
    for case, table, mine in _cases_in(rows, ISSUE_TABLE_DB):
        keyed = HELD_OUT[case]["keyed_on"]
        here_ref = mine["issue date: " + keyed]["psnr_db"]
        for col, db in table.items():
            if col == keyed:
                continue
            if col == "axial":  # the panel writes the axial series first
                r = next(m for name, m in mine.items() if name.startswith("single 0"))
            else:
                r = mine.get("issue date: " + col) or mine[col]
            step_issue = db - table[keyed]
            step_here = r["psnr_db"] - here_ref
            out.append({"case": case, "column": col, "keyed_on": keyed, "issue_step_db": step_issue,
                        "panel_step_db": step_here, "difference_db": step_here - step_issue})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", default=["P ", "A "],
                   help="panel case names or substrings (default: the simulated ones)")
    p.add_argument("--commit", default=ISSUE_DATE_COMMIT)
    p.add_argument("--json", default=str(RESULTS / "issue_date.json"))
    args = p.parse_args(argv)
    tree = old_tree(args.commit)
    out = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": args.commit}
    rows = []
    for case in panel.get_cases(args.cases):
        if not case.simulated:
            print(f"skipping {case.name}: the issue-date comparison runs without registration")
            continue
        print(f"== {case.name}")
        rows.extend(run_case(case, tree))
    panel.print_panel(rows, title=f"issue-date engine ({args.commit}) and today's default on the panel")
    b = bars(rows)
    if b:
        print()
        print_table("issue 11's held-out bars moved onto the panel (bar = the issue-date setting it is keyed on "
                    "+ the bar's step over that setting in the issue's table)", b,
                    [("case", "case", ""), ("keyed_on", "keyed on", ""), ("ref_db", "ref dB", ".2f"),
                     ("ref_mm", "ref mm", ".3f"), ("bar_db", "bar dB", ".2f"), ("bar_mm", "bar mm", ".3f"),
                     ("today_db", "today dB", ".2f"), ("today_mm", "today mm", ".3f"),
                     ("margin_db", "margin dB", "+.2f"), ("surface_vs_bar", "surf / bar", ".2f"),
                     ("vs_best_single_db", "vs best single", "+.2f"), ("met", "met", "")])
    steps = analogue_steps(rows)
    if steps:
        print()
        print_table("the analogue: PSNR step of each issue-table column from the keyed setting, the issue's "
                    "held-out table against the issue-date engine here", steps,
                    [("case", "case", ""), ("column", "column", ""), ("keyed_on", "from", ""),
                     ("issue_step_db", "issue dB", "+.2f"), ("panel_step_db", "here dB", "+.2f"),
                     ("difference_db", "here - issue", "+.2f")])
    out.update(rows=rows, bars=b, analogue_steps=steps, machine_after=machine())
    write_json(args.json, out)
    print(f"\nload {machine()['load_average']}")


if __name__ == "__main__":
    main()
