"""The report picture: written by run (and fuse --report), labelled table rows, skipped without matplotlib."""

import sys

import numpy as np
import SimpleITK as sitk
from test_cli import write_volume

from MultiPlaneFusionLib.cli import main
from MultiPlaneFusionLib.pipeline import FuseOptions, fuse_paths
from MultiPlaneFusionLib.report_picture import _best_stack, _table_rows, write_report_picture


def test_fuse_report_png(tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd")
    b = write_volume(tmp_path / "b.nrrd", size=(24, 8, 24), spacing=(1.0, 4.0, 1.0))
    png = tmp_path / "r.png"
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "f.nrrd"), "--method", "average", "--no-register",
                 "--spacing", "1", "--report", str(png), "--quiet"]) == 0
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
    assert img.shape[:2] == (1350, 1350)
    assert img.std() > 10  # not a blank canvas


def test_best_stack_follows_the_plane(tmp_path):
    a = write_volume(tmp_path / "a.nrrd")
    b = write_volume(tmp_path / "b.nrrd", size=(24, 8, 24), spacing=(1.0, 4.0, 1.0))
    stacks = fuse_paths([a, b], FuseOptions(method="average", register=False, spacing_mm=2.0)).stacks
    assert _best_stack(stacks, np.array([0, 0, 1.0])) == 0  # axial plane: the axial series
    assert _best_stack(stacks, np.array([0, 1.0, 0])) == 1  # coronal plane: the coronal series


def test_table_rows_read_the_summary_defensively():
    summary = {
        "stacks": [
            {"description": "AX 5mm", "orientation": "axial", "thickness_mm": 5, "pixel_spacing_mm": [0.4, 0.4]},
            {"description": "TILT", "orientation": "axial", "thickness_mm": 2.5, "pixel_spacing_mm": [0.5, 0.5],
             "sheared": True, "tilt_deg": -12.0, "self_check": {"psnr_db": 31.25, "note": "x"}},
            {"description": "COR"},
        ],
        "registration": [{"index": 1, "translation_mm": [3, 4, 0], "rotation_angle_deg": 1.25}, {"bad": 1}],
    }
    rows = _table_rows(summary)
    assert rows[0][5] == "reference"
    assert rows[1][2] == "axial tilt -12.0" and rows[1][5] == "5.0 mm, 1.2 deg" and rows[1][6] == "psnr_db 31.2"
    assert rows[2][5] == "-" and rows[2][6] == "-"


def test_missing_matplotlib_skips_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert write_report_picture(tmp_path / "r.png", result=None) is None
    assert "matplotlib" in caplog.text and not (tmp_path / "r.png").exists()

def test_table_shows_the_srr_self_check_per_stack():
    per = [{"fusion_rms_where_best_single_covers": 55.7, "best_single_rms": 88.2, "fusion_beats_best_single": True},
           {"fusion_rms_where_best_single_covers": 90.0, "best_single_rms": 60.4, "fusion_beats_best_single": False},
           None]
    summary = {"stacks": [{"description": "A"}, {"description": "B"}, {"description": "C"}],
               "reconstruction": {"self_check": {"per_stack": per}}}
    rows = _table_rows(summary)
    assert [r[6] for r in rows] == ["56 / 88", "90 / 60 WORSE", "-"]
