"""The memory estimate printed before a run covers the peak the run then reaches (measured in a fresh
process), and the default limit follows the machine's available memory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MultiPlaneFusionLib import memory
from MultiPlaneFusionLib.errors import MemoryLimitError


def ball_stack(path, size, spacing, degrees=0.0, axis=(1.0, 0.6, 0.3)):
    """A stack through a 20 mm ball (600 HU in -1000 HU, noise 20 HU) centred in the 64 mm box, its geometry
    turned by ``degrees`` about ``axis`` (default oblique) through that centre; written to ``path``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    r = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    centre = np.full(3, 32.0)
    spacing = np.asarray(spacing, float)
    origin = centre - r @ (spacing * (np.asarray(size) - 1) / 2)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in size], indexing="ij")
    pts = origin[:, None] + r @ (np.stack([ii.ravel(), jj.ravel(), kk.ravel()]) * spacing[:, None])
    inside = (np.linalg.norm(pts - centre[:, None], axis=0) < 20.0).reshape(size)
    rng = np.random.default_rng(0)
    arr = np.where(inside, 600.0, -1000.0) + rng.normal(0, 20, size)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0), dtype=np.float32))
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(origin.tolist())
    img.SetDirection(r.ravel().tolist())
    sitk.WriteImage(img, str(path))
    return path


# srr's operator paths of the two turned stacks: separable (0 degrees), skew (1 degree; with its pre-shear at 8), at
# 40 degrees general (trilinear) for the one whose normal is 40 degrees off and the skew path with its two-axis
# pre-shear for the one within 30 degrees of a grid axis, and, turned 18 degrees about x (a gantry tilt for the
# coronal stack), the skew path with its pre-shear
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in kB and /proc/self/statm: Linux")
@pytest.mark.parametrize("method, degrees, paths, axis", [
    ("average", 0, None, None), ("srr", 0, ["separable"] * 2, None), ("srr", 1, ["skew"] * 2, None),
    ("srr", 8, ["skew"] * 2, None), ("srr", 40, ["general", "skew"], None), ("srr", 18, ["skew"] * 2, (1, 0, 0))])
def test_estimate_covers_measured_peak(tmp_path, method, degrees, paths, axis):
    turn = {} if axis is None else {"axis": axis}
    a = ball_stack(tmp_path / "a.nrrd", (64, 64, 16), (1.0, 1.0, 4.0))
    b = ball_stack(tmp_path / "b.nrrd", (64, 16, 64), (1.0, 4.0, 1.0), degrees, **turn)
    c = ball_stack(tmp_path / "c.nrrd", (16, 64, 64), (4.0, 1.0, 1.0), degrees, **turn)
    js = tmp_path / "s.json"
    spacing = "1.0" if degrees > 10 else "0.75"  # the trilinear path is the slow one
    extra = ["--psf", "gaussian"] if degrees else []  # no slice-profile choice: faster
    p = subprocess.run([sys.executable, "-m", "MultiPlaneFusionLib.cli", "fuse", str(a), str(b), str(c), "-o",
                        str(tmp_path / "f.nrrd"), "--method", method, "--spacing", spacing, "--no-register", "--quiet",
                        "--json", str(js), *extra], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    s = json.loads(js.read_text())
    estimate, peak = s["estimated_peak_memory_mb"], s["peak_memory_mb"]
    assert s["grid"]["n_voxels"] >= 250_000
    if paths:
        assert s["reconstruction"]["operator_paths"][1:] == paths
    print(f"{method} {paths}: estimate {estimate:.0f} MB, measured peak {peak:.0f} MB")
    assert peak <= estimate <= 1.25 * peak, (estimate, peak)


def test_default_limit_is_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * 1024**3)
    assert memory.default_limit_gb() == pytest.approx(8 * memory.AVAILABLE_MARGIN)
    memory.check_limit(7 * 1024**3, None)
    with pytest.raises(MemoryLimitError, match="available"):
        memory.check_limit(7.5 * 1024**3, None)
    memory.check_limit(7.5 * 1024**3, 10.0)  # an explicit limit overrides
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert memory.default_limit_gb() == memory.FALLBACK_LIMIT_GB == 16.0


def test_available_bytes_is_plausible():
    n = memory.available_bytes()
    assert n is None or 64 * 1024**2 < n <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory.current_rss_bytes() > 10 * 1024**2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS in kB and /proc/self/statm: Linux")
def test_run_estimate_covers_the_model_and_report(tmp_path):
    """`run` estimates again before the bone model and the report picture, whose peak can pass the fusion's."""
    a = ball_stack(tmp_path / "a.nrrd", (64, 64, 16), (1.0, 1.0, 4.0))
    b = ball_stack(tmp_path / "b.nrrd", (64, 16, 64), (1.0, 4.0, 1.0))
    js = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "MultiPlaneFusionLib.cli", "run", str(a), str(b), "-o",
                        str(tmp_path / "out"), "--method", "average", "--spacing", "0.5", "--no-register", "--quiet",
                        "--json", str(js)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    s = json.loads(js.read_text())
    estimate, peak = s["estimated_peak_memory_mb"], s["peak_memory_mb"]
    print(f"run: estimate {estimate:.0f} MB, measured peak {peak:.0f} MB")
    assert peak <= estimate <= 1.25 * peak, (estimate, peak)
