"""The CLI: user failures give one clear line and a non-zero exit, and leave no partial output."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MultiPlaneFusionLib.cli import main


def write_volume(path, origin=(0, 0, 0), size=(24, 24, 8), spacing=(1.0, 1.0, 4.0), value=None):
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 20, size=size[::-1]).astype(np.float32) - 1000
    arr[:, 6:18, 6:18] = 600 if value is None else value  # a bright block
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("multiplanefusion")]
    assert len(lines) == 1, err
    assert "Traceback" not in err


def no_partial_files(folder):
    return [f for f in os.listdir(folder) if ".partial" in f]


@pytest.mark.parametrize("kind", ["empty", "not_dicom", "two_d", "missing"])
def test_bad_inputs(tmp_path, capsys, kind):
    out = tmp_path / "fused.nrrd"
    if kind == "empty":
        src = tmp_path / "empty"
        src.mkdir()
    elif kind == "not_dicom":
        src = tmp_path / "docs"
        src.mkdir()
        (src / "a.txt").write_text("hello")
        (src / "b.dcm").write_bytes(b"\x00" * 300)
    elif kind == "two_d":
        src = tmp_path / "slice.png"
        sitk.WriteImage(sitk.Image(16, 16, sitk.sitkUInt8), str(src))
    else:
        src = tmp_path / "nope"
    code, _, err = run_cli(["fuse", src, "-o", out, "--method", "average", "--quiet"], capsys)
    assert_one_line_error(code, err)
    assert not out.exists() and not no_partial_files(tmp_path)


@pytest.mark.parametrize("method", ["average", "srr"])
def test_non_overlapping_stacks(tmp_path, capsys, method):
    a = write_volume(tmp_path / "a.nrrd")
    b = write_volume(tmp_path / "b.nrrd", origin=(200, 0, 0))
    out = tmp_path / "fused.nrrd"
    code, _, err = run_cli(["fuse", a, b, "-o", out, "--method", method, "--no-register", "--quiet"], capsys)
    assert_one_line_error(code, err)
    assert "overlap" in err
    assert not out.exists()


def test_unwritable_output(tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd")
    for out in (tmp_path / "missing_dir" / "fused.nrrd", tmp_path, tmp_path / "fused.xyz"):
        code, _, err = run_cli(["fuse", a, "-o", out, "--method", "average", "--quiet"], capsys)
        assert_one_line_error(code, err)
    assert not no_partial_files(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc: a folder no one can create files in")
def test_output_folder_that_refuses_files_fails_before_the_work(tmp_path, capsys):
    # /proc passes os.access(W_OK) for root (CI runs as root) but refuses new files: the check must try one,
    # else the run fails after the reconstruction with a traceback.
    a = write_volume(tmp_path / "a.nrrd")
    for args in (["fuse", a, "-o", "/proc/fused.nrrd", "--method", "average"],
                 ["fuse", a, "-o", tmp_path / "f.nrrd", "--method", "average", "--json", "/proc/s.json"],
                 ["model", a, "-o", "/proc/bone.stl"]):
        code, _, err = run_cli([*args, "--quiet"], capsys)
        assert_one_line_error(code, err)
        assert "/proc" in err and "not writable" in err
    assert not (tmp_path / "f.nrrd").exists()


def test_memory_limit_refused(tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd")
    out = tmp_path / "fused.nrrd"
    code, _, err = run_cli(["fuse", a, "-o", out, "--spacing", "0.02", "--method", "average", "--quiet"], capsys)
    assert_one_line_error(code, err)
    assert "limit" in err and not out.exists()


def test_fuse_average_and_json(tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd")
    b = write_volume(tmp_path / "b.nrrd", size=(24, 8, 24), spacing=(1.0, 4.0, 1.0))
    out, js, cov = tmp_path / "fused.nrrd", tmp_path / "s.json", tmp_path / "cov.nrrd"
    code, _, err = run_cli(["fuse", a, b, "-o", out, "--method", "average", "--no-register", "--spacing", "1",
                            "--json", js, "--coverage", cov], capsys)
    assert code == 0, err
    img = sitk.ReadImage(str(out))
    assert img.GetSpacing() == (1.0, 1.0, 1.0)
    summary = json.loads(js.read_text())
    assert summary["method"] == "average" and len(summary["stacks"]) == 2
    assert summary["grid"]["size_ijk"] == list(img.GetSize())
    assert "read_s" in summary["timings_s"] and summary["peak_memory_mb"] > 0
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cov))).max() == 2
    assert "100%" in err and "write" in err  # progress went to stderr


def test_inspect_lists_stacks(tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd")
    code, out, _ = run_cli(["inspect", a, "--quiet"], capsys)
    assert code == 0
    assert "axial" in out and "24x24x8" in out


def test_console_script_error_has_no_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "multiplanefusion")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "MultiPlaneFusionLib.cli"]
    p = subprocess.run(cmd + ["fuse", str(tmp_path / "missing"), "-o", str(tmp_path / "x.nrrd")],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("multiplanefusion: error:") and "Traceback" not in p.stderr


def test_transforms_out_writes_tfm_files(tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd")
    b = write_volume(tmp_path / "b.nrrd", size=(24, 8, 24), spacing=(1.0, 4.0, 1.0))
    out, tdir = tmp_path / "fused.nrrd", tmp_path / "tfm"
    code, _, err = run_cli(["fuse", a, b, "-o", out, "--method", "average", "--spacing", "2",
                            "--transforms-out", tdir, "--quiet"], capsys)
    assert code == 0, err
    files = sorted(tdir.glob("*.tfm"))
    assert len(files) == 2
    assert sitk.ReadTransform(str(files[1])).GetDimension() == 3
