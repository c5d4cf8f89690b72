"""Ctrl-C and cancel stop the run in every stage, exit 130, and leave nothing behind; argument and output
housekeeping of the CLI (argparse errors, permissions, --overwrite, no OUTDIR left by a failed run)."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import SimpleITK as sitk
from test_cli import write_volume

from MultiPlaneFusionLib.cli import main
from MultiPlaneFusionLib.errors import CancelledError
from MultiPlaneFusionLib.pipeline import FuseOptions, fuse_paths


def two_stacks(folder):
    a = write_volume(folder / "a.nrrd", size=(24, 24, 8), spacing=(1.0, 1.0, 4.0))
    b = write_volume(folder / "b.nrrd", size=(24, 8, 24), spacing=(1.0, 4.0, 1.0), origin=(0.6, 0, -0.4))
    return a, b


def cli_subprocess(args, env_extra, cwd):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "MultiPlaneFusionLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("stage", ["register", "reconstruct", "surface", "write"])
def test_sigint_in_every_stage_exits_130_and_writes_nothing(tmp_path, stage):
    """A real SIGINT, delivered while the stage runs (from inside its SimpleITK/VTK callbacks where it has them)."""
    a, b = two_stacks(tmp_path)
    out = tmp_path / "out"
    p = cli_subprocess(["run", a, b, "-o", out, "--spacing", "2", "--json", tmp_path / "s.json"],
                       {"MULTIPLANEFUSION_TEST_SIGINT_AT": stage}, tmp_path)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("multiplanefusion: error:"), p.stderr
    assert not out.exists(), os.listdir(out)
    assert not (tmp_path / "s.json").exists()


def test_cancel_event_during_registration_raises(tmp_path):
    a, b = two_stacks(tmp_path)
    cancel = threading.Event()
    seen = []

    def progress(stage, fraction):
        seen.append(stage)
        if stage == "register" and fraction > 0:
            cancel.set()  # from inside the registration's iteration callback

    with pytest.raises(CancelledError):
        fuse_paths([a, b], FuseOptions(method="average", spacing_mm=2.0), progress, cancel)
    assert "reconstruct" not in seen


def test_cancel_event_during_model_raises(tmp_path):
    from MultiPlaneFusionLib.model import build_model

    image = sitk.ReadImage(str(write_volume(tmp_path / "a.nrrd")))
    cancel = threading.Event()

    def progress(stage, fraction):
        if stage == "surface" and fraction > 0:
            cancel.set()

    with pytest.raises(CancelledError):
        build_model(image, progress=progress, cancel=cancel)


@pytest.mark.parametrize("bad", [["--spacing", "0"], ["--spacing", "-1"], ["--memory-limit-gb", "0"],
                                 ["--reference", "-1"], ["--spacing", "nan"]])
def test_bad_numbers_are_argparse_errors(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as e:
        main(["fuse", str(tmp_path / "missing"), "-o", str(tmp_path / "x.nrrd"), *bad])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "multiplanefusion fuse: error: argument" in err and "missing" not in err.splitlines()[-1]


def test_outputs_get_umask_permissions(tmp_path, capsys):
    a, b = two_stacks(tmp_path)
    old = os.umask(0o027)
    try:
        assert main(["fuse", str(a), "-o", str(tmp_path / "f.nrrd"), "--method", "average", "--quiet"]) == 0
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "f.nrrd").st_mode & 0o777) == 0o640


def test_run_refuses_to_overwrite_and_failed_run_leaves_no_outdir(tmp_path, capsys):
    a = write_volume(tmp_path / "a.nrrd")
    b = write_volume(tmp_path / "b.nrrd", origin=(0.5, 0.5, 1.0))
    out = tmp_path / "out"
    args = ["run", str(a), str(b), "-o", str(out), "--method", "average", "--no-register", "--spacing", "2",
            "--quiet"]
    assert main(args) == 0
    before = os.stat(out / "fused.nrrd").st_mtime_ns
    capsys.readouterr()
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert os.stat(out / "fused.nrrd").st_mtime_ns == before
    assert main(args + ["--overwrite"]) == 0
    far = write_volume(tmp_path / "far.nrrd", origin=(300, 0, 0))
    assert main(["run", str(a), str(far), "-o", str(tmp_path / "new"), "--method", "average", "--no-register",
                 "--quiet"]) == 1
    assert not (tmp_path / "new").exists()


def test_sigint_handler_is_default():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
