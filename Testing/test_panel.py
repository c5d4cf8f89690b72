"""The realistic benchmark panel's simulated series sit where their headers say (benchmarks/panel.py).

Small grids, seconds: the exact-integration simulator from a volume (box and Gaussian profiles, odd, even
and fractional ratios of thickness and step to the truth spacing, all three orientations), series written
as DICOM and NRRD and read back, the library's analytic simulator, and a negative control: an even-length
box filter anchored on the truth voxels (the classic half-voxel bug) must fail the check.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import panel  # noqa: E402

from MultiPlaneFusionLib.grid import Grid  # noqa: E402
from MultiPlaneFusionLib.reading import read_stacks  # noqa: E402


def _texture_truth(shape=(41, 45, 47), spacing=(0.9, 0.9, 1.0), seed=0):
    """A smooth random 'anatomy' with soft and hard edges, HU-like, on an odd-sized grid."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftn(rng.standard_normal(shape))
    k = [np.fft.fftfreq(n) for n in shape]
    r2 = k[0][:, None, None] ** 2 + k[1][None, :, None] ** 2 + k[2][None, None, :] ** 2
    smooth = np.real(np.fft.ifftn(f * np.exp(-r2 / (2 * 0.06**2))))
    smooth /= smooth.std()
    vol = np.where(smooth > 0.8, 700.0, 40.0) + 60.0 * smooth  # "bone" with hard edges, textured tissue
    grid = Grid(shape=shape, spacing_mm=spacing, origin_mm=(-20.0, -17.5, 100.25))
    return vol.astype(np.float32), grid


@pytest.fixture(scope="module")
def truth():
    return _texture_truth()


@pytest.mark.parametrize("profile, thickness, step", [
    ("box", 3.0, 3.0),  # odd ratio to the 1 mm (axial normal) spacing
    ("box", 4.0, 2.5),  # even ratio, step below the thickness
    ("gaussian", 4.0, 4.0),
    ("gaussian", 2.7, 1.9),  # fractional
])
@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_simulated_series_sit_where_their_header_says(truth, profile, thickness, step, orientation):
    vol, grid = truth
    s = panel.simulate_from_volume(vol, grid, orientation, thickness, step, profile, noise_hu=10.0, seed=3)
    assert s.thickness_mm == thickness
    assert np.allclose(s.slice_steps_mm, step)
    p = panel.position_error(s, vol, grid, profile, thickness)
    assert p["ok"], p
    assert p["shift_mm"] < 0.02, p
    assert abs(p["gain"] - 1.0) < 0.05


def _even_box(d, profile, width_vox):
    """A naive even-length box filter: taps floor(u) - L/2 + 1 .. floor(u) + L/2, centred half a voxel off
    when the slice centre ``u`` is on a truth voxel."""
    n_rel = np.rint(d + np.mod(-d, 1.0))  # tap index minus floor(u)
    half = int(round(width_vox)) // 2
    return ((n_rel >= -half + 1) & (n_rel <= half)).astype(float)


def test_position_check_fails_for_a_shifted_kernel(truth):
    vol, grid = truth
    # 4 mm box on 1 mm voxels (even length 4), slice centres on voxel centres (odd grid: (47 - 1) / 2)
    good = panel.simulate_from_volume(vol, grid, "axial", 4.0, 4.0, "box", noise_hu=10.0)
    bad = panel.simulate_from_volume(vol, grid, "axial", 4.0, 4.0, "box", noise_hu=10.0, kernel=_even_box)
    assert np.allclose(good.slice_origins_mm, bad.slice_origins_mm)
    ok = panel.position_error(good, vol, grid, "box", 4.0)
    wrong = panel.position_error(bad, vol, grid, "box", 4.0)
    assert ok["ok"] and ok["shift_mm"] < 0.01
    assert not wrong["ok"]
    assert abs(abs(wrong["normal_mm"]) - 0.5) < 0.05  # half a 1 mm voxel along the normal
    assert abs(wrong["row_mm"]) < 0.01 and abs(wrong["column_mm"]) < 0.01
    # and a header moved by 0.1 mm is caught as well
    moved = panel.simulate_from_volume(vol, grid, "coronal", 3.0, 3.0, "gaussian", noise_hu=10.0)
    moved.slice_origins_mm = moved.slice_origins_mm + 0.1 * moved.normal
    m = panel.position_error(moved, vol, grid, "gaussian", 3.0)
    assert not m["ok"] and abs(abs(m["normal_mm"]) - 0.1) < 0.02


@pytest.mark.parametrize("fmt", ["dicom", "nrrd"])
def test_written_series_read_back_in_place_and_nrrd_has_no_thickness(truth, tmp_path, fmt):
    vol, grid = truth
    s = panel.simulate_from_volume(vol, grid, "sagittal", 3.0, 2.5, "box", noise_hu=10.0)
    path = panel.write_series(s, tmp_path / "sag", fmt)
    (back,) = read_stacks([path])
    if fmt == "nrrd":
        header = panel.nrrd_header(path)
        assert "thickness" not in header.lower()
        assert back.thickness_mm == pytest.approx(2.5)  # the reader takes the slice step
    else:
        assert back.thickness_mm == pytest.approx(3.0)
    assert np.allclose(back.slice_origins_mm, s.slice_origins_mm, atol=1e-3)
    p = panel.position_error(back, vol, grid, "box", 3.0)  # the true profile, not the header's
    assert p["ok"], p


def test_analytic_phantom_series_pass_the_check():
    from MultiPlaneFusionLib.simulation import phantom_grid, phantom_truth, simulate_stack

    scale = 0.3
    grid = phantom_grid(1.2, scale)
    vol = phantom_truth(grid, scale, supersample=2)
    s = simulate_stack("coronal", thickness_mm=3.0, slice_step_mm=2.0, pixel_spacing_mm=1.0, scale=scale,
                       profile="box", noise_hu=5.0, seed=1, subsamples=12)
    p = panel.position_error(s, vol, grid, "box", 3.0)
    assert p["ok"], p


def test_profile_kernels_are_centred_and_normalised():
    d = np.linspace(-12, 12, 24001)
    for profile, w in (("box", 3.0), ("box", 4.4), ("gaussian", 5.0), ("point", 0.0)):
        k = panel.profile_kernel(d, profile, w)
        area = k.sum() * (d[1] - d[0])
        assert area == pytest.approx(1.0, abs=1e-3)
        assert np.allclose(k, k[::-1], atol=1e-12)  # even: no shift
    rows = panel.sampling_matrix(np.array([9.25, 15.5]), 30, "gaussian", 4.0)
    assert np.allclose(rows.sum(axis=1), 1.0)
    centre = rows @ np.arange(30)
    assert np.allclose(centre, [9.25, 15.5], atol=1e-6)
