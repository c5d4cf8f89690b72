"""The command line carries the data-driven choices: --psf/--alpha auto (defaults) and their
explicit overrides, the JSON summary's new fields, one-line errors for invalid values."""

import json

import pytest

from MultiPlaneFusionLib.cli import main
from MultiPlaneFusionLib.errors import InputError
from MultiPlaneFusionLib.reconstruction.options import (
    DEFAULT_ALPHA,
    DEFAULT_HUBER_ALPHA,
    DEFAULT_HUBER_DELTA,
    SrrOptions,
)
from MultiPlaneFusionLib.simulation import simulate_stack, write_dicom_series


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    folders = []
    for n, o in enumerate(("axial", "coronal", "sagittal")):
        s = simulate_stack(o, thickness_mm=4.0, pixel_spacing_mm=1.0, scale=0.3, profile="box", noise_hu=10.0,
                           seed=40 + n)
        f = root / o
        write_dicom_series(s, f, series_number=n + 1)
        folders.append(str(f))
    return folders


def _fuse(series, tmp_path, capsys, *extra):
    js = tmp_path / "s.json"
    code = main(["fuse", *series, "-o", str(tmp_path / "f.nrrd"), "--no-register", "--spacing", "1.2", "--quiet",
                 "--json", str(js), *extra])
    err = capsys.readouterr().err
    return code, err, (json.loads(js.read_text()) if code == 0 else None)


def test_defaults_choose_from_the_data_and_report_it(series, tmp_path, capsys):
    code, err, summary = _fuse(series, tmp_path, capsys)
    assert code == 0, err
    rec = summary["reconstruction"]
    assert rec["psf"] == "auto" and rec["alpha_setting"] == "fixed" and rec["regularizer"] == "hybrid"
    assert rec["alpha"] == DEFAULT_ALPHA["hybrid"] and rec["huber_alpha"] == DEFAULT_HUBER_ALPHA
    assert rec["huber_delta"] == DEFAULT_HUBER_DELTA["hybrid"]
    assert len(rec["slice_profiles"]) == 3 and all(p["kind"] in ("box", "gaussian") for p in rec["slice_profiles"])
    assert rec["profile_choice"]["seconds"] > 0 and rec["alpha_choice"] is None
    assert rec["iterations"] > 0 and rec["stopped_by"] in ("solution", "residual")
    assert rec["self_check"]["per_stack"][0]["best_single_rms"] > 0
    assert rec["fusion_beats_single_series"] is True and summary["fusion_beats_single_series"] is True


def test_explicit_psf_and_alpha_still_work(series, tmp_path, capsys):
    code, err, summary = _fuse(series, tmp_path, capsys, "--psf", "gaussian", "--alpha", "0.05", "--no-self-check")
    assert code == 0, err
    rec = summary["reconstruction"]
    assert rec["alpha"] == 0.05 and rec["alpha_choice"] is None and rec["profile_choice"] is None
    assert [p["kind"] for p in rec["slice_profiles"]] == ["gaussian"] * 3 and rec["self_check"] is None


def test_huber_threshold_defaults_per_prior(series, tmp_path, capsys):
    # the hybrid's threshold is its own (0.025); plain Huber keeps 0.05; an explicit value wins for either
    assert DEFAULT_HUBER_DELTA["hybrid"] < DEFAULT_HUBER_DELTA["huber"]
    assert SrrOptions().effective_huber_delta == DEFAULT_HUBER_DELTA["hybrid"]
    assert SrrOptions(regularizer="auto").effective_huber_delta == DEFAULT_HUBER_DELTA["huber"]
    assert SrrOptions(regularizer="hybrid", huber_delta=0.1).effective_huber_delta == 0.1
    with pytest.raises(InputError, match="huber delta"):
        SrrOptions(huber_delta=0.0)
    code, err, summary = _fuse(series, tmp_path, capsys, "--regularizer", "huber", "--no-self-check")
    assert code == 0, err
    assert summary["reconstruction"]["huber_delta"] == DEFAULT_HUBER_DELTA["huber"]
    code, err, summary = _fuse(series, tmp_path, capsys, "--huber-delta", "0.04", "--no-self-check")
    assert code == 0, err
    assert summary["reconstruction"]["huber_delta"] == 0.04


@pytest.mark.parametrize("args,name", [(["--alpha", "lots"], "--alpha"), (["--psf", "cone"], "--psf"),
                                       (["--alpha", "-1"], "alpha")])
def test_invalid_values_give_one_line_errors(series, tmp_path, capsys, args, name):
    code, err, _ = _fuse(series, tmp_path, capsys, *args)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and name in lines[0], err
