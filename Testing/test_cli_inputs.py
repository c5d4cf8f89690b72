"""Identical input series are used once; one series alone is warned about; inspect shows the path and the signed
tilt."""

import json
import logging

import numpy as np
from test_cli import write_volume

from MultiPlaneFusionLib.cli import main, signed_tilt
from MultiPlaneFusionLib.pipeline import FuseOptions, fuse_paths
from MultiPlaneFusionLib.stack import stack_from_affine


def test_same_series_twice_is_used_once(tmp_path, caplog):
    a = write_volume(tmp_path / "a.nrrd")
    b = write_volume(tmp_path / "b.nrrd", size=(24, 8, 24), spacing=(1.0, 4.0, 1.0))
    copy = tmp_path / "copy.nrrd"
    copy.write_bytes(a.read_bytes())  # another file, same geometry and pixels
    with caplog.at_level(logging.WARNING, logger="MultiPlaneFusionLib"):
        result = fuse_paths([a, b, a, copy], FuseOptions(method="average", register=False, spacing_mm=2.0))
    assert len(result.stacks) == 2
    assert result.summary["duplicates_dropped"] == [{"stack": 2, "same_as": 0}, {"stack": 3, "same_as": 0}]
    assert "same series" in caplog.text and "copy.nrrd" in caplog.text


def test_one_series_alone_is_warned_about(tmp_path, caplog):
    a = write_volume(tmp_path / "a.nrrd")
    copy = tmp_path / "copy.nrrd"
    copy.write_bytes(a.read_bytes())
    b = write_volume(tmp_path / "b.nrrd", size=(24, 8, 24), spacing=(1.0, 4.0, 1.0))
    for paths, alone in (([a], True), ([a, copy], True), ([a, b], False)):  # a copy is no second series
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="MultiPlaneFusionLib"):
            fuse_paths(paths, FuseOptions(method="average", register=False, spacing_mm=2.0))
        assert ("only one series" in caplog.text) == alone, (paths, caplog.text)


def test_different_series_are_kept(tmp_path):
    a = write_volume(tmp_path / "a.nrrd")
    c = write_volume(tmp_path / "c.nrrd", value=700)  # same geometry, other pixels
    result = fuse_paths([a, c], FuseOptions(method="average", register=False, spacing_mm=2.0))
    assert len(result.stacks) == 2 and result.summary["duplicates_dropped"] == []


def test_inspect_shows_path(tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd")
    assert main(["inspect", str(a), "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    assert str(a) in out
    assert json.loads((tmp_path / "i.json").read_text())["stacks"][0]["source"].endswith("a.nrrd")


def test_signed_tilt():
    pixels = np.zeros((10, 8, 8), np.float32)
    for sign in (1, -1):
        affine = np.eye(4)
        affine[:3, 2] = [0.0, sign * np.tan(np.radians(15)) * 2.0, 2.0]  # slice origins drift along j
        tilt, along = signed_tilt(stack_from_affine(pixels, affine))
        assert np.isclose(tilt, sign * 15.0, atol=0.01) and along == "columns"
