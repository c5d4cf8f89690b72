"""The Slicer boundary (volume node <-> stack/grid), checked outside Slicer against SimpleITK's geometry.

SimpleITK is the oracle: a Slicer volume's IJKToRAS is built the way Slicer gets it from an image
(``F * index->LPS``, with ``F = diag(-1, -1, 1)``) from SimpleITK's own index->physical map, and
every stack voxel must land on the SimpleITK voxel with the same value.
"""

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from MultiPlaneFusionLib import slicer_boundary as sb
from MultiPlaneFusionLib.errors import InputError
from MultiPlaneFusionLib.grid import Grid

F3 = np.diag([-1.0, -1.0, 1.0])


def rotation(axis, angle_deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def sitk_volume(shape_kji, spacing, origin_lps, direction, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 2000, size=shape_kji).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in origin_lps])
    img.SetDirection([float(v) for v in np.asarray(direction, float).ravel()])
    return img, arr


def ijk_to_ras_of(img):
    """IJKToRAS of a SimpleITK image, from SimpleITK's index->physical map alone (how Slicer sees it)."""
    o = np.array(img.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0)))
    m = np.eye(4)
    for a in range(3):
        e = [0.0, 0.0, 0.0]
        e[a] = 1.0
        m[:3, a] = F3 @ (np.array(img.TransformContinuousIndexToPhysicalPoint(e)) - o)
    m[:3, 3] = F3 @ o
    return m


def assert_stack_matches_image(stack, img, n=300, seed=1):
    """Every sampled stack voxel lies on a SimpleITK voxel centre holding the same value."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = stack.shape
    arr = sitk.GetArrayViewFromImage(img)
    for _ in range(n):
        k, j, i = int(rng.integers(nk)), int(rng.integers(nj)), int(rng.integers(ni))
        p = stack.index_to_physical(k, j, i)
        ci = np.array(img.TransformPhysicalPointToContinuousIndex([float(v) for v in p]))
        idx = np.round(ci).astype(int)
        assert np.allclose(ci, idx, atol=1e-6), (k, j, i, ci)
        assert stack.pixels[k, j, i] == arr[idx[2], idx[1], idx[0]]


# ------------------------------------------------------------------------------------ volume -> stack
@pytest.mark.parametrize(
    "direction",
    [
        np.eye(3),  # axial, LPS-aligned
        rotation([1, 0.3, 0.2], 27.0),  # oblique
        np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float),  # coronal reformat, slices along -P
        np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),  # sagittal, slices along R (-L)
        np.diag([-1.0, 1.0, 1.0]),  # left-handed index frame (flipped i)
        np.diag([1.0, 1.0, -1.0]),  # slices running head to feet
    ],
)
def test_volume_to_stack_matches_simpleitk(direction):
    img, arr = sitk_volume((7, 9, 11), (0.7, 0.8, 3.0), (-20.0, 15.0, 40.0), direction)
    stack = sb.stack_from_volume(arr, ijk_to_ras_of(img), modality="CT")
    assert stack.shape == arr.shape
    assert stack.pixel_spacing_mm == pytest.approx((0.7, 0.8))
    assert stack.thickness_mm == pytest.approx(3.0)
    assert not stack.is_sheared and not stack.has_gaps
    assert np.allclose(stack.transform, np.eye(4))
    assert_stack_matches_image(stack, img)


def test_slices_are_sorted_along_the_normal():
    # A left-handed frame must come out with offsets increasing along row x column, voxels reordered.
    img, arr = sitk_volume((5, 4, 6), (1.0, 1.0, 2.5), (0, 0, 0), np.diag([1.0, 1.0, -1.0]))
    stack = sb.stack_from_volume(arr, ijk_to_ras_of(img))
    assert np.all(np.diff(stack.slice_offsets_mm) > 0)
    assert np.array_equal(stack.pixels, arr[::-1].astype(np.float32))


def test_thickness_override_and_metadata():
    img, arr = sitk_volume((4, 5, 6), (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3))
    stack = sb.stack_from_volume(arr, ijk_to_ras_of(img), thickness_mm=3.0, description="ax", modality="MR")
    assert stack.thickness_mm == 3.0 and stack.description == "ax" and stack.modality == "MR"


def tilted_series(tilt_deg=20.0, nk=8, steps=None):
    """A gantry-tilted series as per-slice SimpleITK images (the DICOM truth) and its sheared IJKToRAS."""
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(np.radians(5)), np.sin(np.radians(5))])
    normal = np.cross(row, col)
    step_dir = normal + np.tan(np.radians(tilt_deg)) * col  # slice origins drift along the column axis
    steps = np.full(nk - 1, 2.5) if steps is None else np.asarray(steps, float)
    offsets = np.concatenate([[0.0], np.cumsum(steps)])
    origin0 = np.array([-30.0, -10.0, 55.0])
    origins = origin0 + offsets[:, None] * step_dir[None, :]
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 1000, size=(nk, 6, 7)).astype(np.int16)
    slices = []
    for k in range(nk):
        s = sitk.GetImageFromArray(arr[k : k + 1])
        s.SetSpacing([0.6, 0.9, 1.0])
        s.SetOrigin([float(v) for v in origins[k]])
        s.SetDirection([float(v) for v in np.stack([row, col, normal], axis=1).ravel()])
        slices.append(s)
    return arr, slices, origins, row, col, normal


def assert_stack_matches_slices(stack, slices):
    for k, s in enumerate(slices):
        a = sitk.GetArrayViewFromImage(s)[0]
        for j, i in [(0, 0), (5, 6), (2, 3), (5, 0)]:
            p = stack.index_to_physical(k, j, i)
            ci = np.array(s.TransformPhysicalPointToContinuousIndex([float(v) for v in p]))
            assert np.allclose(ci, [i, j, 0], atol=1e-6)
            assert stack.pixels[k, j, i] == a[j, i]


def test_sheared_ijk_to_ras_gives_exact_tilted_stack():
    arr, slices, origins, row, col, _ = tilted_series()
    m = np.eye(4)
    m[:3, 0], m[:3, 1] = row * 0.6, col * 0.9
    m[:3, 2] = origins[1] - origins[0]
    m[:3, 3] = origins[0]
    stack = sb.stack_from_volume(arr, sb.flip_index_matrix(m))
    assert stack.is_sheared
    assert stack.tilt_deg == pytest.approx(20.0, abs=1e-6)
    assert stack.thickness_mm == pytest.approx(2.5)  # the step along the normal, not along the table
    assert_stack_matches_slices(stack, slices)


def acquisition_transform(ortho_ijk_to_ras, true_origins_ras):
    """World-from-RAS of Slicer's acquisition grid transform: per-slice displacement, linear in k."""
    inv = np.linalg.inv(ortho_ijk_to_ras)
    nk = len(true_origins_ras)
    # Where IJKToRAS alone puts each slice origin (0, 0, k), and how far the transform must move it.
    placed = ortho_ijk_to_ras[:3, 3] + np.arange(nk)[:, None] * ortho_ijk_to_ras[:3, 2][None, :]
    displacements = true_origins_ras - placed

    def world_from_ras(points):
        p = np.asarray(points, float)
        k = p @ inv[:3, :3].T[:, 2] + inv[2, 3]
        d = np.stack([np.interp(k, np.arange(nk), displacements[:, a]) for a in range(3)], -1)
        return p + d

    return world_from_ras


@pytest.mark.parametrize("steps", [None, [2.5, 2.5, 5.0, 2.5, 2.5, 2.5, 2.5]])
def test_acquisition_grid_transform_recovers_tilted_geometry(steps):
    # Slicer's default for a tilted series: orthogonal IJKToRAS + grid transform moving each slice.
    arr, slices, origins, row, col, normal = tilted_series(steps=steps)
    ortho = np.eye(4)
    ortho[:3, 0], ortho[:3, 1], ortho[:3, 2] = row * 0.6, col * 0.9, normal * 2.5
    ortho[:3, 3] = origins[0]
    ortho_ras = sb.flip_index_matrix(ortho)
    to_world = acquisition_transform(ortho_ras, sb.flip_points(origins))
    stack = sb.stack_from_volume(arr, ortho_ras, world_from_ras=to_world)
    assert stack.is_sheared and stack.tilt_deg == pytest.approx(20.0, abs=1e-6)
    assert stack.has_gaps == (steps is not None)
    assert_stack_matches_slices(stack, slices)
    # Without the transform the slices would sit along the normal: the transform really mattered.
    plain = sb.stack_from_volume(arr, ortho_ras)
    assert not plain.is_sheared


def test_linear_parent_transform_is_composed():
    img, arr = sitk_volume((6, 7, 8), (0.8, 0.8, 2.0), (5.0, -3.0, 12.0), rotation([0, 0, 1], 10))
    r = rotation([0.2, 1, 0.1], 12.0)
    t_lps = np.eye(4)
    t_lps[:3, :3], t_lps[:3, 3] = r, [4.0, -7.0, 2.5]
    # Truth: the same image with the rigid transform applied to its geometry (in LPS).
    moved = sitk.Image(img)
    moved.SetOrigin([float(v) for v in r @ np.array(img.GetOrigin()) + t_lps[:3, 3]])
    moved.SetDirection([float(v) for v in (r @ np.array(img.GetDirection()).reshape(3, 3)).ravel()])
    stack = sb.stack_from_volume(arr, ijk_to_ras_of(img), world_from_ras=sb.flip_physical_matrix(t_lps))
    assert_stack_matches_image(stack, moved)
    # A callable giving the same map must agree with the matrix form.
    m_ras = sb.flip_physical_matrix(t_lps)
    stack2 = sb.stack_from_volume(arr, ijk_to_ras_of(img), world_from_ras=lambda p: p @ m_ras[:3, :3].T + m_ras[:3, 3])
    assert np.allclose(stack2.slice_origins_mm, stack.slice_origins_mm)


def test_transform_that_rotates_slices_individually_is_refused():
    img, arr = sitk_volume((6, 5, 5), (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3))

    def twist(points):
        p = np.asarray(points, float)
        out = np.empty_like(p)
        for n, q in enumerate(p):
            out[n] = rotation([0, 0, 1], 2.0 * q[2]) @ q  # rotation grows with z
        return out

    with pytest.raises(InputError, match="harden"):
        sb.stack_from_volume(arr, ijk_to_ras_of(img), world_from_ras=twist)


def test_in_plane_shear_is_refused():
    m = np.diag([1.0, 1.0, 2.0, 1.0])
    m[0, 1] = 0.3  # j column leans towards i
    with pytest.raises(InputError, match="sheared"):
        sb.stack_from_volume(np.zeros((3, 4, 5)), m)


def test_bad_inputs():
    with pytest.raises(InputError):
        sb.stack_from_volume(np.zeros((4, 5)), np.eye(4))
    with pytest.raises(InputError):
        sb.stack_from_volume(np.zeros((3, 4, 5)), np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError):
        sb.stack_from_volume(np.zeros((3, 4, 5)), np.eye(4), slice_axis="x")


def test_auto_slice_axis_finds_thick_axis():
    # A coronal stack saved with its thick axis along j (axis order of some reformat tools).
    img, arr = sitk_volume((9, 6, 8), (0.7, 4.0, 0.7), (1.0, 2.0, 3.0), np.eye(3))
    stack = sb.stack_from_volume(arr, ijk_to_ras_of(img), slice_axis="auto")
    assert stack.thickness_mm == pytest.approx(4.0)
    assert stack.shape[0] == 6
    assert stack.orientation == "coronal"
    assert_stack_matches_image(stack, img)
    # 'k' keeps the stored order.
    assert sb.stack_from_volume(arr, ijk_to_ras_of(img)).shape == arr.shape


def test_stack_to_volume_round_trip():
    arr, slices, origins, row, col, _ = tilted_series()
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = row * 0.6, col * 0.9, origins[1] - origins[0], origins[0]
    stack = sb.stack_from_volume(arr, sb.flip_index_matrix(m), thickness_mm=3.0)
    pixels, ijk_to_ras = sb.volume_from_stack(stack)
    assert np.allclose(ijk_to_ras, sb.flip_index_matrix(m))
    back = sb.stack_from_volume(pixels, ijk_to_ras, thickness_mm=stack.thickness_mm)
    assert np.array_equal(back.pixels, stack.pixels)
    assert np.allclose(back.slice_origins_mm, stack.slice_origins_mm)
    assert_stack_matches_slices(back, slices)
    # A stack with a gap has no single IJKToRAS.
    gappy = sb.stack_from_volume(arr, sb.flip_index_matrix(m),
                                 world_from_ras=lambda p: p + (p[:, 2:3] > 60.0) * np.array([0.0, 0.0, 2.0]))
    assert gappy.has_gaps
    with pytest.raises(InputError):
        sb.volume_from_stack(gappy)


# -------------------------------------------------------------------------------- grid -> volume node
def test_grid_to_ijk_to_ras_matches_simpleitk():
    grid = Grid(shape=(5, 6, 7), spacing_mm=(0.5, 0.6, 0.7), origin_mm=(10.0, -4.0, 33.0),
                direction=tuple(rotation([1, 2, 3], 40.0).ravel()))
    img = grid.image()
    m = sb.ijk_to_ras_from_grid(grid)
    assert np.allclose(m, ijk_to_ras_of(img))
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        ras = m @ np.r_[ijk, 1.0]
        assert np.allclose(F3 @ ras[:3], img.TransformIndexToPhysicalPoint(ijk))


def test_grid_round_trip():
    grid = Grid(shape=(5, 6, 7), spacing_mm=(0.5, 0.5, 0.5), origin_mm=(1.0, 2.0, 3.0),
                direction=tuple(rotation([0, 1, 1], -25.0).ravel()))
    back = sb.grid_from_ijk_to_ras(sb.ijk_to_ras_from_grid(grid), grid.shape)
    assert back.shape == grid.shape
    assert np.allclose(back.spacing_mm, grid.spacing_mm)
    assert np.allclose(back.origin_mm, grid.origin_mm)
    assert np.allclose(back.direction, grid.direction)
    sheared = np.eye(4)
    sheared[1, 2] = 0.4
    with pytest.raises(InputError):
        sb.grid_from_ijk_to_ras(sheared, (2, 2, 2))


def test_stack_round_trip_through_volume_geometry():
    # A stack built from a fused grid's volume lands on the grid's own voxel centres.
    grid = Grid(shape=(4, 5, 6), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0),
                direction=tuple(rotation([1, 0, 0], 90.0).ravel()))
    arr = np.arange(grid.n_voxels, dtype=np.float32).reshape(grid.shape)
    stack = sb.stack_from_volume(arr, sb.ijk_to_ras_from_grid(grid))
    assert_stack_matches_image(stack, grid.image(arr))


# ---------------------------------------------------------------------------------- RAS <-> LPS
def test_flips_are_involutions_and_consistent():
    rng = np.random.default_rng(5)
    pts = rng.normal(size=(10, 3))
    assert np.allclose(sb.flip_points(sb.flip_points(pts)), pts)
    assert np.allclose(sb.flip_points(pts)[:, 2], pts[:, 2])
    assert np.allclose(sb.flip_points(pts)[:, :2], -pts[:, :2])
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = rotation([1, 1, 0], 33.0), [1.0, 2.0, 3.0]
    t_ras = sb.flip_physical_matrix(t)
    assert np.allclose(sb.flip_physical_matrix(t_ras), t)
    # F T F applied to RAS points equals flipping, applying T in LPS, flipping back.
    lhs = pts @ t_ras[:3, :3].T + t_ras[:3, 3]
    rhs = sb.flip_points(sb.flip_points(pts) @ t[:3, :3].T + t[:3, 3])
    assert np.allclose(lhs, rhs)
    with pytest.raises(ValueError):
        sb.flip_points(np.zeros((3, 2)))


def signed_volume(polydata):
    mass = vtk.vtkMassProperties()
    mass.SetInputData(polydata)
    mass.Update()
    return mass.GetVolume(), mass.GetVolumeProjected()


def test_flip_polydata_keeps_orientation():
    src = vtk.vtkSphereSource()
    src.SetCenter(10.0, -5.0, 3.0)
    src.SetRadius(4.0)
    src.SetThetaResolution(24)
    src.SetPhiResolution(24)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(src.GetOutputPort())
    normals.ComputePointNormalsOn()
    normals.Update()
    mesh = normals.GetOutput()
    flipped = sb.flip_polydata(mesh)
    from vtk.util import numpy_support as ns

    p0 = ns.vtk_to_numpy(mesh.GetPoints().GetData())
    p1 = ns.vtk_to_numpy(flipped.GetPoints().GetData())
    assert np.allclose(p1, sb.flip_points(p0))
    n0 = ns.vtk_to_numpy(mesh.GetPointData().GetNormals())
    n1 = ns.vtk_to_numpy(flipped.GetPointData().GetNormals())
    assert np.allclose(n1, sb.flip_points(n0))
    # Outward normals stay outward: the normal at each point still points away from the centre.
    centre = sb.flip_points([10.0, -5.0, 3.0])
    assert np.all(np.einsum("ij,ij->i", p1 - centre, n1) > 0)
    # The input is untouched.
    assert np.allclose(ns.vtk_to_numpy(mesh.GetPoints().GetData()), p0)
    assert signed_volume(flipped)[0] == pytest.approx(signed_volume(mesh)[0], rel=1e-9)


def test_display_window_level():
    assert sb.display_window_level(None, "CT") == (1000.0, 400.0)
    a = np.linspace(0, 1000, 10001)
    w, lvl = sb.display_window_level(a, "MR")
    assert w == pytest.approx(985.0, rel=0.01) and lvl == pytest.approx(502.5, rel=0.01)
    assert sb.display_window_level(np.zeros(10), "MR") == (1.0, 0.5)
