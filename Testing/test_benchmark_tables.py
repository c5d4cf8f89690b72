"""The arithmetic behind two of issue 11's reported bars (benchmarks/bench_panel.py, benchmarks/issue_date.py).

Synthetic score rows, no reconstruction: the panel's best fixed setting is the one with the highest mean over
the cases (not each case's own best), and a held-out bar moves onto the panel as the same step over the
issue-date setting it is keyed on.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_panel  # noqa: E402
import issue_date  # noqa: E402


def _row(case, method, db, mm=0.1, kind="option"):
    return {"case": case, "kind": kind, "method": method, "psnr_db": db, "surface_mean_mm": mm}


def test_panel_wide_best_is_the_highest_mean_not_each_cases_best():
    # "spiky" wins case A by far but loses case B; "steady" has the higher mean.
    rows = [_row("A", "spiky", 40.0), _row("B", "spiky", 20.0),
            _row("A", "steady", 35.0), _row("B", "steady", 30.0),
            _row("A", "default", 36.0), _row("B", "default", 29.5)]
    wide = bench_panel.panel_wide_best(rows, {"spiky": {}, "steady": {}}, {"default": {}})
    assert wide["setting"] == "steady"
    assert wide["mean_db"] == pytest.approx(32.5)
    by_case = {r["case"]: r["minus_fixed_db"] for r in wide["rows"]}
    assert by_case == {"A": pytest.approx(1.0), "B": pytest.approx(-0.5)}


def test_held_out_bar_moves_as_the_same_step_over_its_keyed_setting():
    case = "P 4mm/4 box 15HU dcm"  # bar 39.0 / 0.075 over Tikhonov + box's 38.7 / 0.080 in the issue's table
    rows = [_row(case, "single 0 axial", 25.0, 0.3, kind="baseline"),
            _row(case, "issue date: srr tikhonov + box", 32.0, 0.064),
            _row(case, "today: default", 32.2, 0.058)]
    (b,) = issue_date.bars(rows)
    assert b["bar_db"] == pytest.approx(32.3)
    assert b["bar_mm"] == pytest.approx(0.064 * 0.075 / 0.080)
    assert b["margin_db"] == pytest.approx(-0.1)
    assert not b["met"]  # 0.1 dB short although the surface clears its bar
    rows[-1]["psnr_db"] = 32.4
    (b,) = issue_date.bars(rows)
    assert b["met"]
    rows[-1]["surface_mean_mm"] = 0.061  # now over the moved surface bar (0.060)
    (b,) = issue_date.bars(rows)
    assert not b["met"]
