"""Stack and grid geometry: index <-> LPS for sheared and gappy stacks, labels, grids, memory."""

import numpy as np
import pytest
import SimpleITK as sitk

from MultiPlaneFusionLib import memory
from MultiPlaneFusionLib.errors import InputError, MemoryLimitError
from MultiPlaneFusionLib.grid import Grid, grid_for_stacks, grid_from_image
from MultiPlaneFusionLib.stack import Stack, orientation_label, stack_from_affine


def tilted_stack(tilt_deg=18.5, n=6, step_table_mm=2.5, offsets=None):
    """A gantry-tilted stack: image plane rotated about x, origins stepping along the table (z)."""
    t = np.radians(tilt_deg)
    row = np.array([1.0, 0, 0])
    col = np.array([0, np.cos(t), -np.sin(t)])
    z = np.arange(n) * step_table_mm if offsets is None else np.asarray(offsets, float)
    origins = np.stack([np.full(n, -10.0), np.full(n, 5.0), 100 + z], axis=1)
    pixels = np.arange(n * 4 * 5, dtype=np.float32).reshape(n, 4, 5)
    return Stack(pixels, origins, row, col, (0.5, 0.7), 2.5, modality="CT", description="tilted")


def test_sheared_stack_geometry():
    s = tilted_stack()
    assert s.is_sheared and s.is_regular and not s.has_gaps
    assert s.tilt_deg == pytest.approx(18.5, abs=1e-6)
    # The step along the normal is the table step times cos(tilt).
    assert s.slice_step_mm == pytest.approx(2.5 * np.cos(np.radians(18.5)))
    # Pixel (k, j, i) sits at its own slice origin: no re-gridding along the normal.
    p = s.index_to_physical(3, 2, 4)
    expected = s.slice_origins_mm[3] + 4 * 0.5 * s.row_direction + 2 * 0.7 * s.column_direction
    np.testing.assert_allclose(p, expected, atol=1e-12)
    # Naively stepping along the normal would put slice 3 elsewhere (by the shear).
    naive = s.slice_origins_mm[0] + 3 * s.slice_step_mm * s.normal
    assert np.linalg.norm(naive - s.slice_origins_mm[3]) > 2.0


@pytest.mark.parametrize("offsets", [None, [0, 4.22, 8.44, 9.58, 16.96, 24.34]])
def test_index_physical_round_trip(offsets):
    s = tilted_stack(offsets=offsets)
    rng = np.random.default_rng(1)
    kji = rng.uniform([-0.5, -0.5, -0.5], [5.5, 3.5, 4.5], size=(200, 3))
    p = s.index_to_physical(kji[:, 0], kji[:, 1], kji[:, 2])
    k, j, i = s.physical_to_index(p)
    np.testing.assert_allclose(np.stack([k, j, i], 1), kji, atol=1e-9)
    assert s.has_gaps == (offsets is not None)
    assert s.is_regular == (offsets is None)


def test_round_trip_with_registration_transform():
    s = tilted_stack()
    a = np.radians(7)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = [3, -2, 1]
    moved = s.with_transform(m)
    p = moved.index_to_physical(2, 1, 3)
    np.testing.assert_allclose(p, m[:3, :3] @ s.index_to_physical(2, 1, 3) + m[:3, 3], atol=1e-12)
    np.testing.assert_allclose(np.array(moved.physical_to_index(p)), [2, 1, 3], atol=1e-9)


def test_affine_matches_sitk_for_regular_stack():
    img = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    img.SetSpacing((0.5, 0.6, 3.0))
    img.SetOrigin((10, -20, 30))
    d = sitk.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.3).GetMatrix()
    img.SetDirection(d)
    a = np.eye(4)
    a[:3, :3] = np.asarray(d).reshape(3, 3) * np.array([0.5, 0.6, 3.0])
    a[:3, 3] = img.GetOrigin()
    s = stack_from_affine(sitk.GetArrayFromImage(img), a)
    for idx in [(0, 0, 0), (5, 4, 3), (2, 1, 2)]:
        np.testing.assert_allclose(s.index_to_physical(idx[2], idx[1], idx[0]),
                                   img.TransformIndexToPhysicalPoint(idx), atol=1e-9)


@pytest.mark.parametrize("normal,label", [
    ((0, 0, 1), "axial"), ((0, 0, -1), "axial"), ((0, 1, 0), "coronal"), ((1, 0, 0), "sagittal"),
    ((0, np.sin(np.radians(5)), np.cos(np.radians(5))), "axial"),
    ((0, np.sin(np.radians(18.5)), np.cos(np.radians(18.5))), "oblique"),
    ((1, 1, 1), "oblique"),
])
def test_orientation_labels(normal, label):
    assert orientation_label(normal) == label


def test_stack_validation():
    with pytest.raises(InputError):
        Stack(np.zeros((2, 3, 3)), [[0, 0, 0], [0, 0, 0]], (1, 0, 0), (0, 1, 0), (1, 1), 1.0)
    with pytest.raises(InputError):
        Stack(np.zeros((2, 3, 3)), [[0, 0, 0], [0, 0, 1]], (1, 0, 0), (0, 1, 0), (0, 1), 1.0)


def box_stack(orientation, lo, hi, pixel=1.0, thickness=4.0):
    """An axis-aligned stack covering the LPS box lo..hi (voxel edges)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    axes = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}[orientation]
    a = np.zeros((4, 4))
    a[3, 3] = 1.0
    sp = [pixel, pixel, thickness]
    n = [int(round((hi[ax] - lo[ax]) / s)) for ax, s in zip(axes, sp)]
    for c, (ax, s) in enumerate(zip(axes, sp)):
        a[ax, c] = s
    a[:3, 3] = [lo[ax] + 0.5 * sp[list(axes).index(ax)] for ax in range(3)]
    return stack_from_affine(np.zeros((n[2], n[1], n[0]), np.float32), a, thickness_mm=thickness)


def test_grid_overlap_and_union():
    a = box_stack("axial", (0, 0, 0), (40, 40, 40))
    b = box_stack("coronal", (10, 0, 0), (60, 40, 40))
    g = grid_for_stacks([a, b])
    assert g.spacing_mm == (1.0, 1.0, 1.0)
    lo = np.asarray(g.origin_mm) - 0.5
    hi = lo + np.asarray(g.shape[::-1]) * 1.0
    np.testing.assert_allclose(lo, [10, 0, 0], atol=1e-6)
    np.testing.assert_allclose(hi, [40, 40, 40], atol=1e-6)
    u = grid_for_stacks([a, b], extent="union", spacing_mm=2.0)
    assert u.shape[::-1] == (30, 20, 20)
    # Axes follow the reference stack.
    g2 = grid_for_stacks([b, a], reference=0)
    np.testing.assert_allclose(g2.direction_matrix[:, 2], b.normal, atol=1e-12)


def test_grid_refuses_disjoint_stacks():
    a = box_stack("axial", (0, 0, 0), (20, 20, 20))
    b = box_stack("axial", (100, 0, 0), (120, 20, 20))
    with pytest.raises(InputError, match="do not overlap"):
        grid_for_stacks([a, b])


def test_grid_like_is_exact():
    img = sitk.Image(7, 8, 9, sitk.sitkInt16)
    img.SetSpacing((0.45, 0.46, 1.3))
    img.SetOrigin((-1.5, 2.25, 700.125))
    img.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.1, 0.2, 0.3).GetMatrix())
    g = grid_from_image(img)
    out = g.image()
    assert out.GetSize() == img.GetSize()
    assert out.GetSpacing() == img.GetSpacing()
    assert out.GetOrigin() == img.GetOrigin()
    assert out.GetDirection() == img.GetDirection()
    k, j, i = g.physical_to_index(img.TransformIndexToPhysicalPoint((3, 4, 5)))
    np.testing.assert_allclose([i, j, k], [3, 4, 5], atol=1e-9)


def test_memory_estimate_and_limit():
    g = Grid((100, 200, 300), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    est = memory.estimate_bytes(g.n_voxels, 1_000_000, "srr")
    assert 4 * 6 * 6_000_000 < est < 4 * 9 * 6_000_000  # srr: about 7 float32 grid copies
    assert memory.estimate_bytes(g.n_voxels, 0, "average") < est
    # stacks off the grid axes need more (shear path: grid-sized boxes; general path: per-sample arrays)
    assert memory.estimate_bytes(g.n_voxels, 1_000_000, "srr", stack_paths=[("shear", 500_000)]) > est
    assert memory.estimate_bytes(g.n_voxels, 1_000_000, "srr", stack_paths=[("general", 500_000)]) > est
    # an edge-preserving prior (the default hybrid) holds its IRLS weights: 1.5 grid copies more
    edge = memory.estimate_bytes(g.n_voxels, 1_000_000, "srr", edge_preserving=True)
    assert edge - est == pytest.approx(4 * memory.EDGE_PRESERVING_GRID_COPIES * g.n_voxels, abs=8)
    assert memory.estimate_bytes(g.n_voxels, 0, "average", edge_preserving=True) < est
    memory.check_limit(est, 1.0)
    with pytest.raises(MemoryLimitError, match="limit"):
        memory.check_limit(est, 0.1)


def test_fusion_estimate_follows_the_prior():
    # the default (hybrid) and Huber count the IRLS weights, Tikhonov does not, "auto" may choose Huber
    from MultiPlaneFusionLib.reconstruction.budget import estimate_fusion_bytes
    from MultiPlaneFusionLib.reconstruction.options import SrrOptions
    from MultiPlaneFusionLib.simulation import phantom_grid, simulate_orthogonal_stacks

    stacks = simulate_orthogonal_stacks(thickness_mm=4.0, pixel_spacing_mm=2.0, scale=0.4, noise_hu=0.0, seed=0)
    grid = phantom_grid(2.0, 0.4)
    by = {r: estimate_fusion_bytes(stacks, grid, "srr", srr_options=SrrOptions(regularizer=r))
          for r in ("tikhonov", "huber", "hybrid", "auto")}
    assert estimate_fusion_bytes(stacks, grid, "srr") == by["hybrid"] == by["huber"] == by["auto"] > by["tikhonov"]
    assert by["hybrid"] - by["tikhonov"] == pytest.approx(4 * memory.EDGE_PRESERVING_GRID_COPIES * grid.n_voxels,
                                                          abs=8)
