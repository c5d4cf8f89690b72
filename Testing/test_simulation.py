"""Tests of the analytic head phantom, the thick-slice acquisition simulator and the DICOM writer."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from MultiPlaneFusionLib.errors import CancelledError, InputError
from MultiPlaneFusionLib.progress import Monitor
from MultiPlaneFusionLib.simulation import (
    TISSUE_HU,
    head_phantom_hu,
    phantom_bounds_mm,
    phantom_grid,
    phantom_truth,
    simulate_orthogonal_stacks,
    simulate_stack,
    write_dicom_series,
    write_localizer,
    write_secondary_capture,
)
from MultiPlaneFusionLib.simulation.acquisition import profile_samples

BONE_HU = 300.0


def _bone_along_ray(direction, start=(0.0, 0.0, 10.0), step_mm=0.01, scale=1.0):
    """Length (mm) of bone (HU > 300) along a ray and the set of HU values met in it."""
    d = np.asarray(direction, dtype=float)
    d /= np.linalg.norm(d)
    r = np.arange(0.0, 140.0 * scale, step_mm)
    hu = head_phantom_hu(np.asarray(start) * scale + r[:, None] * d, scale)
    bone = hu > BONE_HU
    return bone.sum() * step_mm, set(np.unique(hu[bone]).tolist())


def _nearest(index):
    return int(np.rint(float(index)))


def _read_series(paths):
    return [pydicom.dcmread(p) for p in paths]


def _hu(ds):
    return ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def tilted_stack():
    return simulate_stack("axial", 4.0, pixel_spacing_mm=(1.5, 2.0), scale=0.4, tilt_deg=12.0, noise_hu=10.0, seed=3)


# --------------------------------------------------------------------------------------- phantom
def test_phantom_values_at_known_points():
    lo, hi = phantom_bounds_mm()
    pts = np.array(
        [
            [0.0, 0.0, 300.0],  # far outside
            lo + 1.0,  # corner of the bounds: air
            [79.0, 0.0, -2.0],  # scalp beside the temporal bone
            [0.0, 96.5, 10.0],  # occipital outer table
            [0.0, 94.0, 10.0],  # occipital diploe
            [30.0, 0.0, 40.0],  # brain
            [11.0, -2.0, 28.0],  # left lateral ventricle
            [0.0, 12.0, -100.0],  # neck
        ]
    )
    hu = head_phantom_hu(pts)
    assert hu.dtype == np.float32
    assert hu[0] == TISSUE_HU["air"] and hu[1] == TISSUE_HU["air"]
    assert hu[2] == TISSUE_HU["soft_tissue"]
    assert 1200 <= hu[3] <= 1600
    assert 300 <= hu[4] <= 500
    assert hu[5] == TISSUE_HU["brain"]
    assert hu[6] == TISSUE_HU["ventricle"]
    assert hu[7] == TISSUE_HU["soft_tissue"]


def test_phantom_shape_and_scale():
    rng = np.random.default_rng(0)
    lo, hi = phantom_bounds_mm()
    pts = rng.uniform(lo, hi, size=(4, 500, 3))
    full = head_phantom_hu(pts)
    assert full.shape == (4, 500)
    # scale shrinks every length: the half-size phantom at p/2 equals the full one at p
    np.testing.assert_array_equal(head_phantom_hu(pts * 0.5, scale=0.5), full)
    lo5, hi5 = phantom_bounds_mm(0.5)
    np.testing.assert_allclose(hi5 - lo5, 0.5 * (hi - lo))


def test_skull_thin_at_temples_thick_at_back():
    temple_l, temple_hu = _bone_along_ray((1.0, 0.0, -0.15))
    temple_r, _ = _bone_along_ray((-1.0, 0.0, -0.15))
    occipital, occipital_hu = _bone_along_ray((0.0, 1.0, 0.05))
    frontal, _ = _bone_along_ray((0.0, -1.0, 0.4))
    assert 1.0 <= temple_l <= 2.0 and 1.0 <= temple_r <= 2.0
    assert 5.5 <= occipital <= 7.5 and 5.5 <= frontal <= 7.5
    # thick bone has a diploe layer between two cortical tables; the thin temporal wall has none
    assert TISSUE_HU["diploe"] in occipital_hu and TISSUE_HU["diploe"] not in temple_hu
    # the brain cavity reaches the neck through the foramen magnum
    column = head_phantom_hu(np.array([[0.0, 28.0, z] for z in np.arange(-70.0, -45.0, 0.5)]))
    assert np.all(column < BONE_HU)
    assert np.any(head_phantom_hu(np.array([[0.0, 0.0, z] for z in np.arange(-60.0, -20.0, 0.5)])) > BONE_HU)


def test_foramina_and_sutures_cut_through_the_bone():
    from MultiPlaneFusionLib.simulation import phantom

    along = np.arange(-16.0, 6.0, 0.1)
    for anchor, axis, radius, _ in phantom._HOLES[:6]:  # the holes through the vault
        line = anchor + along[:, None] * axis
        assert np.all(head_phantom_hu(line) < BONE_HU)
        side = np.cross(axis, [0.3, 0.5, 0.8])
        side /= np.linalg.norm(side)
        assert np.any(head_phantom_hu(line + (radius + 1.5) * side) > BONE_HU)
    # the sagittal suture: a ~0.9 mm soft-tissue gap in the parietal bone along x at the vertex
    xs = np.arange(-5.0, 5.0, 0.01)
    hu = head_phantom_hu(np.stack([xs, np.full_like(xs, 20.0), np.full_like(xs, 103.5)], axis=1))
    gap = (hu == TISSUE_HU["soft_tissue"]).sum() * 0.01
    assert 0.8 <= gap <= 1.0 and hu[0] > BONE_HU and hu[-1] > BONE_HU


def test_phantom_grid_and_truth():
    grid = phantom_grid(3.0, scale=0.3, margin_mm=2.0)
    lo, hi = phantom_bounds_mm(0.3)
    first = grid.index_to_physical(0, 0, 0)
    last = grid.index_to_physical(*(np.array(grid.shape) - 1))
    assert np.all(first < lo + 6 * 0.3) and np.all(last > hi - 6 * 0.3)
    centres = head_phantom_hu(grid.slab_points(0, grid.shape[0]), 0.3)
    np.testing.assert_array_equal(phantom_truth(grid, 0.3, supersample=1), centres)
    truth = phantom_truth(grid, 0.3, supersample=2)
    assert truth.shape == grid.shape and truth.dtype == np.float32
    assert truth.min() >= -1000 and truth.max() <= 1500
    # averaging changes values only near edges; both see the same amount of bone
    assert 0.5 < (truth > BONE_HU).sum() / max(1, (centres > BONE_HU).sum()) < 2.0


# ---------------------------------------------------------------------------------- acquisition
def test_profile_samples_integrate_the_profile():
    s, w = profile_samples("box", 4.0, 16)
    assert w.sum() == pytest.approx(1.0)
    assert (w * s**2).sum() == pytest.approx(4.0**2 / 12, rel=0.02)
    s, w = profile_samples("gaussian", 4.0, 16)
    sigma = 4.0 / 2.3548
    assert (w * s).sum() == pytest.approx(0.0, abs=1e-12)
    assert (w * s**2).sum() == pytest.approx(sigma**2, rel=0.12)
    with pytest.raises(InputError):
        profile_samples("triangle", 4.0, 8)


@pytest.mark.parametrize("profile", ["gaussian", "box"])
@pytest.mark.parametrize("n", [8, 15, 40])
def test_subsample_pattern_neither_shifts_nor_shears(profile, n):
    from MultiPlaneFusionLib.simulation.acquisition import _subsample_pattern

    s, w, u, v = _subsample_pattern(profile, 4.0, n)
    assert len(s) == n + n % 2 and w.sum() == pytest.approx(1.0)
    for offset in (u, v):
        assert np.all(np.abs(offset) <= 0.5)
        assert (w * offset).sum() == pytest.approx(0.0, abs=1e-12)  # no sub-pixel shift
        assert (w * s * offset).sum() == pytest.approx(0.0, abs=1e-12)  # no shear of the PSF
        assert (w * offset**2).sum() == pytest.approx(1.0 / 12.0, rel=0.05)  # pixel-box variance


@pytest.mark.parametrize("profile", ["gaussian", "box"])
def test_stack_and_truth_hold_the_same_amount_of_head(profile):
    # Integration check: sum of (HU + 1000) x voxel volume over a stack equals that over the truth.
    s = simulate_stack("sagittal", 3.0, pixel_spacing_mm=1.5, scale=0.4, noise_hu=0.0, profile=profile)
    truth = phantom_truth(phantom_grid(1.5, scale=0.4), scale=0.4)
    stack_mass = float(np.sum(s.pixels + 1000.0, dtype=np.float64)) * 1.5 * 1.5 * s.slice_step_mm
    truth_mass = float(np.sum(truth + 1000.0, dtype=np.float64)) * 1.5**3
    assert stack_mass == pytest.approx(truth_mass, rel=0.01)


def test_axial_stack_geometry():
    s = simulate_stack("axial", 4.0, pixel_spacing_mm=1.5, scale=0.5, noise_hu=0.0)
    np.testing.assert_allclose(s.row_direction, [1, 0, 0])
    np.testing.assert_allclose(s.column_direction, [0, 1, 0])
    np.testing.assert_allclose(s.normal, [0, 0, 1])
    assert s.orientation == "axial" and s.modality == "CT"
    assert s.pixel_spacing_mm == (1.5, 1.5) and s.thickness_mm == 4.0
    assert s.slice_step_mm == pytest.approx(4.0)
    assert s.is_regular and not s.has_gaps and not s.is_sheared
    assert s.pixels.dtype == np.float32
    # the field of view covers the phantom bounds
    lo, hi = phantom_bounds_mm(0.5)
    c = s.corners_mm()
    assert np.all(c.min(axis=0) <= lo + 1e-6) and np.all(c.max(axis=0) >= hi - 1e-6)
    # the middle of the stack is brain, the FOV corner is air
    k, j, i = s.physical_to_index(np.array([15.0, 0.0, 20.0]))
    assert abs(s.pixels[_nearest(k), _nearest(j), _nearest(i)] - TISSUE_HU["brain"]) < 5
    assert s.pixels[0, 0, 0] == pytest.approx(-1000.0)
    assert len({s.study_uid, s.series_uid, s.frame_of_reference_uid}) == 3


@pytest.mark.parametrize(
    "name, row, col, normal",
    [("coronal", [1, 0, 0], [0, 0, -1], [0, 1, 0]), ("sagittal", [0, 1, 0], [0, 0, -1], [-1, 0, 0])],
)
def test_standard_orientations(name, row, col, normal):
    s = simulate_stack(name, 5.0, pixel_spacing_mm=2.5, scale=0.3, noise_hu=0.0)
    np.testing.assert_allclose(s.row_direction, row, atol=1e-12)
    np.testing.assert_allclose(s.column_direction, col, atol=1e-12)
    np.testing.assert_allclose(s.normal, normal, atol=1e-12)
    assert s.orientation == name
    lo, hi = phantom_bounds_mm(0.3)
    c = s.corners_mm()
    assert np.all(c.min(axis=0) <= lo + 1e-6) and np.all(c.max(axis=0) >= hi - 1e-6)


def test_tilted_stack_is_sheared(tilted_stack):
    s = tilted_stack
    assert s.is_sheared and s.orientation == "oblique"
    assert s.tilt_deg == pytest.approx(12.0, abs=1e-6)
    t = np.radians(12.0)
    np.testing.assert_allclose(s.column_direction, [0, np.cos(t), np.sin(t)], atol=1e-12)
    steps = np.diff(s.slice_origins_mm, axis=0)
    np.testing.assert_allclose(steps, np.tile([0.0, 0.0, 4.0], (len(steps), 1)), atol=1e-9)
    assert s.slice_step_mm == pytest.approx(4.0 * np.cos(t))


def test_index_physical_round_trip_on_tilted_stack(tilted_stack):
    s = tilted_stack
    rng = np.random.default_rng(1)
    kji = rng.uniform([-1, 0, 0], np.array(s.shape) + [1, 0, 0], size=(200, 3))
    p = s.index_to_physical(kji[:, 0], kji[:, 1], kji[:, 2])
    k, j, i = s.physical_to_index(p)
    np.testing.assert_allclose(np.stack([k, j, i], axis=1), kji, atol=1e-9)


def test_irregular_offsets_give_gaps():
    steps = [4.22] * 5 + [1.14] + [7.38] * 4
    offsets = np.concatenate([[-20.0], -20.0 + np.cumsum(steps)])
    s = simulate_stack("axial", 4.0, pixel_spacing_mm=3.0, scale=0.4, slice_offsets_mm=offsets, tilt_deg=18.5)
    assert s.has_gaps and not s.is_regular
    # each slice plane crosses the table line through the phantom box centre at z = offset
    lo, hi = phantom_bounds_mm(0.4)
    c = 0.5 * (lo + hi)
    on_table = np.stack([np.full_like(offsets, c[0]), np.full_like(offsets, c[1]), offsets], axis=1)
    np.testing.assert_allclose(np.einsum("kd,d->k", on_table - s.slice_origins_mm, s.normal), 0.0, atol=1e-9)
    np.testing.assert_allclose(s.slice_steps_mm, np.array(steps) * np.cos(np.radians(18.5)), atol=1e-9)
    with pytest.raises(InputError):
        simulate_stack("axial", scale=0.3, slice_offsets_mm=[1.0, 1.0])


def test_noise_matches_noise_hu_in_air():
    kw = dict(thickness_mm=4.0, pixel_spacing_mm=1.5, scale=0.5)
    clean = simulate_stack("coronal", noise_hu=0.0, **kw)
    noisy = simulate_stack("coronal", noise_hu=20.0, seed=7, **kw)
    air = np.abs(clean.pixels + 1000.0) < 1e-3
    assert air.sum() > 20000
    assert np.std(noisy.pixels[air]) == pytest.approx(20.0, rel=0.03)
    assert np.mean(noisy.pixels[air]) == pytest.approx(-1000.0, abs=0.5)
    again = simulate_stack("coronal", noise_hu=20.0, seed=7, **kw)
    np.testing.assert_array_equal(again.pixels, noisy.pixels)


def _max_slope(profile, spacing_mm):
    return float(np.max(np.abs(np.diff(profile)))) / spacing_mm


def test_thick_slices_are_blurrier_through_plane_than_in_plane():
    # The same edges (scalp and skull at the vertex, 20 mm left of the sagittal suture) seen along z
    # through-plane by overlapping axial slices and in-plane by a coronal slice of equal thickness.
    x, y = 20.0, -5.5  # (0, -5.5) is the centre of the phantom box, where both FOVs are centred
    zs = np.arange(95.0, 120.0, 0.5)
    axial = simulate_stack("axial", 4.0, pixel_spacing_mm=0.5, noise_hu=0.0, slice_offsets_mm=zs, fov_mm=(50, 20))
    k, j, i = axial.physical_to_index(np.array([x, y, 100.0]))
    through = axial.pixels[:, _nearest(j), _nearest(i)]
    coronal = simulate_stack("coronal", 4.0, pixel_spacing_mm=0.5, noise_hu=0.0, slice_offsets_mm=[y], fov_mm=(50, 240))
    kk, jj, ii = coronal.physical_to_index(np.stack([np.full_like(zs, x), np.full_like(zs, y), zs], axis=1))
    in_plane = coronal.pixels[0, np.rint(jj).astype(int), _nearest(ii[0])]
    # both profiles go from bone to air
    assert through.max() > 600 and in_plane.max() > 600
    assert through[-1] < -990 and in_plane[-1] < -990
    # a 4 mm Gaussian profile (sigma 1.7 mm) against ~0.6 mm in-plane: edges at least twice as steep
    assert _max_slope(in_plane, 0.5) > 2.0 * _max_slope(through, 0.5)


def test_motion_moves_the_patient_not_the_scanner():
    kw = dict(thickness_mm=5.0, pixel_spacing_mm=1.0, scale=0.4, noise_hu=0.0, slice_offsets_mm=[-10.0, 0.0, 12.0])
    ref = simulate_stack("axial", fov_mm=(90, 100), **kw)
    motion = np.eye(4)
    motion[0, 3] = 10.0  # the patient moves 10 mm to the left (+x)
    moved = simulate_stack("axial", fov_mm=(90, 100), motion=motion, **kw)
    np.testing.assert_array_equal(moved.slice_origins_mm, ref.slice_origins_mm)
    np.testing.assert_array_equal(moved.transform, np.eye(4))
    diff = np.abs(moved.pixels[:, :, 13:] - ref.pixels[:, :, 3:-10])
    assert np.median(diff) < 0.01 and np.percentile(diff, 99) < 1.0
    assert np.mean(np.abs(moved.pixels - ref.pixels)) > 10.0
    with pytest.raises(InputError):
        simulate_stack("axial", scale=0.3, motion=np.diag([2.0, 1.0, 1.0, 1.0]))


def test_orthogonal_stacks_share_study_and_frame():
    stacks = simulate_orthogonal_stacks(5.0, 2.5, scale=0.3, noise_hu=5.0)
    assert [s.orientation for s in stacks] == ["axial", "coronal", "sagittal"]
    assert len({s.frame_of_reference_uid for s in stacks}) == 1
    assert len({s.study_uid for s in stacks}) == 1
    assert len({s.series_uid for s in stacks}) == 3
    shift = np.eye(4)
    shift[2, 3] = 5.0
    moved = simulate_orthogonal_stacks(5.0, 2.5, scale=0.3, noise_hu=5.0, motions=[None, shift, None])
    np.testing.assert_array_equal(moved[0].pixels, stacks[0].pixels)
    # the default field of view is planned on the patient as positioned: it moved with the head
    np.testing.assert_allclose(
        moved[1].slice_origins_mm - stacks[1].slice_origins_mm, [[0, 0, 5.0]] * len(moved[1].pixels)
    )
    np.testing.assert_allclose(moved[1].pixels, stacks[1].pixels, atol=0.5)


def test_simulation_can_be_cancelled():
    with pytest.raises(CancelledError):
        simulate_stack("axial", scale=0.3, pixel_spacing_mm=3.0, monitor=Monitor(cancel=lambda: True))


def test_oblique_orientation_matrix():
    a = np.radians(30.0)
    m = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])  # columns row, col, normal
    s = simulate_stack(m, 5.0, pixel_spacing_mm=3.0, scale=0.3, noise_hu=0.0)
    np.testing.assert_allclose(s.normal, m[:, 2], atol=1e-12)
    assert s.orientation == "oblique" and not s.is_sheared
    with pytest.raises(InputError):
        simulate_stack(np.eye(3) * 2, scale=0.3)


# ------------------------------------------------------------------------------------- DICOM
def test_dicom_round_trip(tmp_path, tilted_stack):
    s = tilted_stack
    paths = write_dicom_series(s, tmp_path / "series", series_number=7)
    assert [p.rsplit("/", 1)[-1] for p in paths[:2]] == ["IM00001.dcm", "IM00002.dcm"]
    dss = _read_series(paths)
    for k, ds in enumerate(dss):
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], s.slice_origins_mm[k], atol=1e-6)
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient],
            np.concatenate([s.row_direction, s.column_direction]),
            atol=1e-9,
        )
        # PixelSpacing is [row spacing (j), column spacing (i)]
        assert [float(v) for v in ds.PixelSpacing] == [2.0, 1.5]
        assert (ds.Rows, ds.Columns) == s.shape[1:]
        assert float(ds.SliceThickness) == 4.0
        assert float(ds.GantryDetectorTilt) == pytest.approx(12.0)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(4.0)
        assert ds.InstanceNumber == k + 1 and ds.SeriesNumber == 7
        assert ds.SeriesInstanceUID == s.series_uid and ds.StudyInstanceUID == s.study_uid
        assert ds.FrameOfReferenceUID == s.frame_of_reference_uid
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] and ds.PatientPosition == "HFS"
        slope = float(ds.RescaleSlope)
        assert float(ds.RescaleIntercept) == -1024.0
        assert np.max(np.abs(_hu(ds) - s.pixels[k])) <= 0.5 * slope + 1e-3


def test_dicom_gantry_tilt_sign_follows_philips(tmp_path):
    # Philips writes GantryDetectorTilt -18.5 with ImageOrientationPatient [1, 0, 0, 0, 0.948, -0.317]
    s = simulate_stack("axial", 5.0, pixel_spacing_mm=3.0, scale=0.3, tilt_deg=-18.5, slice_offsets_mm=[0.0, 2.5, 5.0])
    ds = pydicom.dcmread(write_dicom_series(s, tmp_path)[0])
    assert float(ds.GantryDetectorTilt) == pytest.approx(-18.5)
    np.testing.assert_allclose(
        [float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 0.9483237, -0.3173047], atol=1e-6
    )


def test_dicom_regular_spacing_only_when_regular(tmp_path):
    s = simulate_stack("sagittal", 4.0, pixel_spacing_mm=3.0, scale=0.3, slice_offsets_mm=[-10.0, -6.0, 5.0, 9.0])
    ds = pydicom.dcmread(write_dicom_series(s, tmp_path)[0])
    assert "SpacingBetweenSlices" not in ds and "GantryDetectorTilt" not in ds
    assert list(ds.ImageOrientationPatient) == [0, 1, 0, 0, 0, -1]


def test_dicom_rescale_fits_wide_ranges(tmp_path):
    s = simulate_stack("axial", 5.0, pixel_spacing_mm=3.0, scale=0.3, slice_offsets_mm=[0.0, 5.0], noise_hu=0.0)
    s.pixels[0, 0, 0] = 60000.0
    ds = _read_series(write_dicom_series(s, tmp_path))
    slope = float(ds[0].RescaleSlope)
    assert slope > 1.0
    for k in range(2):
        assert np.max(np.abs(_hu(ds[k]) - s.pixels[k])) <= 0.5 * slope + 1e-3


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_decode(tmp_path, tilted_stack, syntax):
    try:
        paths = write_dicom_series(tilted_stack, tmp_path, transfer_syntax=syntax)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    ref = _read_series(write_dicom_series(tilted_stack, tmp_path / "plain"))
    for ds, plain in zip(_read_series(paths), ref):
        assert ds.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(ds.pixel_array, plain.pixel_array)


def test_unsupported_encoders_raise(tmp_path, tilted_stack):
    from pydicom.pixels import get_encoder

    for syntax in (JPEGLSLossless, JPEGLosslessSV1):
        try:
            available = get_encoder(syntax).is_available
        except NotImplementedError:
            available = False
        if available:
            continue
        with pytest.raises(NotImplementedError):
            write_dicom_series(tilted_stack, tmp_path / syntax.name, transfer_syntax=syntax)


def test_files_a_reader_must_skip(tmp_path, tilted_stack):
    sc = pydicom.dcmread(write_secondary_capture(tmp_path))
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.pixel_array.shape == (64, 64)
    loc = pydicom.dcmread(write_localizer(tmp_path, stack=tilted_stack, scale=0.4, pixel_spacing_mm=4.0))
    assert loc.SOPClassUID == pydicom.uid.CTImageStorage and loc.ImageType[2] == "LOCALIZER"
    assert loc.SeriesInstanceUID == tilted_stack.series_uid
    scout = _hu(loc)
    assert scout.min() < -900 and scout.max() > 0  # air around a head
