"""The boundary between 3D Slicer's MRML volumes and the library, as pure functions.

Nothing here imports ``slicer``: the Slicer module reads a node's voxel array and matrices and hands
them to these functions, so the geometry conversion is tested outside Slicer against SimpleITK.

Conventions on the two sides
----------------------------
Slicer (MRML)
    Physical space is RAS (mm). A scalar volume node holds a voxel array indexed ``[k, j, i]``
    (``slicer.util.arrayFromVolume``) and a 4x4 ``IJKToRAS`` matrix mapping the homogeneous index
    ``(i, j, k, 1)`` to RAS. The matrix need not be orthogonal. A volume may sit under a parent transform
    node (linear, or non-linear such as the acquisition transform below) that maps it on to world RAS.
Library
    Physical space is LPS (mm); a :class:`~MultiPlaneFusionLib.stack.Stack` places every slice by its own
    origin, so shear and gaps are exact; a :class:`~MultiPlaneFusionLib.grid.Grid` follows SimpleITK.

RAS and LPS differ by ``F = diag(-1, -1, 1)``: ``p_lps = F p_ras``. ``F`` is its own inverse, so every
``flip_*`` function below converts in both directions.

Gantry tilt and Slicer's acquisition transform
----------------------------------------------
A gantry-tilted CT series has slice origins that step along the table, not along the slice normal.
Depending on the setting *DICOM > Acquisition geometry regularization*, Slicer loads it as:

- ``default`` / ``apply regularization transform``: a volume with an orthogonal ``IJKToRAS`` (slices
  stacked along the normal) under a parent *grid* transform ("<name> acquisition transform") whose
  displacements move each slice's corners to the DICOM positions. The displacement is constant within
  a slice and varies linearly between slices, so mapping the slice corners through the parent
  transform recovers every slice's true origin exactly. :func:`stack_from_volume` does that (the module
  passes a ``world_from_ras`` callable that evaluates the node's transform to world) and the
  resulting stack carries the true sheared geometry: nothing is resampled before the fusion.
- ``harden regularization transform``: the volume was already resampled on to the orthogonal grid by
  Slicer; it is used as it is (one interpolation has happened, in Slicer).
- ``none``: the slices sit at the wrong positions; a warning is in Slicer's log. The module cannot
  detect this from the node, so the user should reload with regularization on.

A volume whose ``IJKToRAS`` itself is sheared (a non-orthogonal k column, as written by some NRRD/NIfTI
tools for tilted series) is represented the same way: the k column becomes the per-slice origin step.

Parent transforms that are linear are composed with ``IJKToRAS`` (the same as hardening them, without
resampling). Non-linear parent transforms are accepted when they move each slice rigidly in its plane
(as the acquisition transform does); otherwise :class:`~MultiPlaneFusionLib.errors.InputError` asks the
user to harden the transform first.
"""

import numpy as np

from .errors import InputError
from .grid import Grid
from .model.thresholds import PRESETS
from .stack import Stack
from .transforms import apply as apply_matrix

# Choices of the settings that exist only at the Slicer boundary (the module's combo boxes show them; the
# other choice lists live next to their option classes: pipeline.METHODS, model.options.SURFACE_METHODS...).
EXPORT_SOURCES = ("model", "segment")  # the library's surface, or the (edited) Bone segment's closed surface
EXPORT_FORMATS = ("STL", "OBJ")
COORDINATE_SYSTEMS = ("LPS", "RAS")  # of exported files; LPS is what Slicer writes by default
# The library's CT presets, then a user range and the automatic (Otsu) threshold.
THRESHOLD_CHOICES = (*PRESETS, "custom", "automatic")

# F = diag(-1, -1, 1, 1): RAS <-> LPS, its own inverse.
LPS_RAS_4X4 = np.diag([-1.0, -1.0, 1.0, 1.0])

# Slicer's "CT-Bone" window/level preset (Modules/Loadable/Volumes/Resources/VolumeDisplayPresets.json).
CT_BONE_WINDOW_LEVEL = (1000.0, 400.0)

# |cos| between the in-plane axes above which a slice plane counts as sheared (DICOM never is).
_INPLANE_ORTHOGONALITY_TOL = 1e-3
# Largest disagreement (mm) allowed between the corners a transform gives and a rigid in-plane slice.
_CORNER_TOL_MM = 1e-3
# A non-k axis whose spacing exceeds k's by this factor is taken as the slice axis.
_SLICE_AXIS_RATIO = 1.2


# --------------------------------------------------------------------------------------- RAS <-> LPS
def flip_points(points):
    """LPS <-> RAS for points or vectors of shape (..., 3) (negates x and y); returns a new array."""
    p = np.array(points, dtype=float)
    if p.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., 3), got {p.shape}")
    p[..., :2] *= -1.0
    return p


def flip_physical_matrix(matrix):
    """LPS <-> RAS for a 4x4 transform between physical spaces (``F M F``)."""
    m = np.asarray(matrix, dtype=float).reshape(4, 4)
    return LPS_RAS_4X4 @ m @ LPS_RAS_4X4


def flip_index_matrix(matrix):
    """IJK->LPS <-> IJK->RAS for a 4x4 index-to-physical matrix (``F M``; the index side is unchanged)."""
    m = np.asarray(matrix, dtype=float).reshape(4, 4)
    return LPS_RAS_4X4 @ m


def flip_polydata(polydata):
    """A copy of a vtkPolyData with its points (and normals) converted LPS <-> RAS.

    Negating x and y is a rotation by 180 degrees about z (determinant +1), so triangle winding and
    therefore outward orientation are kept; normals are rotated with the points. Imports vtk lazily
    (through :func:`~MultiPlaneFusionLib.model.mesh.transform_polydata`) so the rest of this module needs
    numpy only.
    """
    from .model.mesh import transform_polydata

    return transform_polydata(polydata, LPS_RAS_4X4[:3, :3], (0.0, 0.0, 0.0))


# ----------------------------------------------------------------------------- volume -> stack
def slice_corner_indices(shape_kji):
    """Index points (i, j, k) of three corners of every slice; shape (nk, 3, 3).

    Per slice: pixel (0, 0), (i_far, 0) and (0, j_far), where ``i_far = max(ni - 1, 1)`` (likewise j),
    so a slice of one row or column still defines its axes. The Slicer module maps these through the
    volume's IJKToRAS and parent transform and passes them back as world RAS points.
    """
    nk, nj, ni = (int(v) for v in shape_kji)
    i_far, j_far = max(ni - 1, 1), max(nj - 1, 1)
    k = np.arange(nk, dtype=float)
    pts = np.zeros((nk, 3, 3))
    pts[:, :, 2] = k[:, None]
    pts[:, 1, 0] = i_far
    pts[:, 2, 1] = j_far
    return pts


def _slice_axis_permutation(ijk_to_ras, shape_kji):
    """Index permutation putting the slice (largest-spacing) axis last, or None when k already is.

    Only for volumes with orthogonal index axes: a sheared volume keeps k as its slice axis (that is
    how tilted series are stored).
    """
    cols = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    unit = cols / spacing
    gram = unit.T @ unit
    if np.max(np.abs(gram - np.eye(3))) > _INPLANE_ORTHOGONALITY_TOL:
        return None
    if min(shape_kji) < 2:
        return None
    axis = int(np.argmax(spacing))
    if axis == 2 or spacing[axis] <= _SLICE_AXIS_RATIO * spacing[2]:
        return None
    others = [a for a in (0, 1, 2) if a != axis]
    return others + [axis]  # new (i, j, k) in terms of old axes


def stack_from_volume(
    array_kji,
    ijk_to_ras,
    world_from_ras=None,
    thickness_mm=None,
    slice_axis="k",
    **stack_kwargs,
):
    """A library stack (LPS, exact per-slice geometry) from a Slicer volume's voxels and matrices.

    Parameters
    ----------
    array_kji : ndarray, shape (nk, nj, ni)
        The voxels as ``slicer.util.arrayFromVolume`` returns them (copied to float32).
    ijk_to_ras : array_like, shape (4, 4)
        The node's IJKToRAS matrix. May be sheared (a tilted series stored with a non-orthogonal k axis).
    world_from_ras : None, array_like (4, 4), or callable
        The volume's parent transform to world: None for none, a 4x4 RAS matrix for a linear transform,
        or a callable mapping RAS points of shape (N, 3) to world RAS points (N, 3) for a non-linear one
        (e.g. Slicer's acquisition grid transform of a gantry-tilted series).
    thickness_mm : float, optional
        Slice thickness (DICOM SliceThickness when the module can find it); default: the median slice
        step along the normal.
    slice_axis : {'k', 'auto'}
        ``'k'``: slices are the k planes (DICOM series, always true for a freshly loaded series).
        ``'auto'``: for a volume with orthogonal axes whose coarsest spacing lies along i or j (a
        reformat saved in another axis order), that axis becomes the slice axis.
    **stack_kwargs
        ``modality``, ``description``, ``series_uid``... passed to :class:`Stack`.

    Returns
    -------
    Stack
        Slices sorted so offsets increase along ``row x column``; identity ``transform`` (parent
        transforms are folded into the slice geometry, like hardening without resampling).

    Raises
    ------
    InputError
        Not a 3-D volume, a slice plane that the matrix or transform shears or bends, or slices at
        the same position.
    """
    pixels = np.asarray(array_kji)
    if pixels.ndim != 3:
        raise InputError(f"a stack needs a 3-D scalar volume, got an array of shape {pixels.shape}")
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    if abs(np.linalg.det(ijk_to_ras[:3, :3])) < 1e-12:
        raise InputError("the volume's IJK-to-RAS matrix is singular")

    if slice_axis not in ("k", "auto"):
        raise ValueError(f"slice_axis must be 'k' or 'auto', not {slice_axis!r}")
    if slice_axis == "auto" and not callable(world_from_ras):
        perm = _slice_axis_permutation(ijk_to_ras, pixels.shape)
        if perm is not None:
            # Index axis a of the new volume is old axis perm[a]; numpy axes run (k, j, i).
            pixels = np.transpose(pixels, [2 - perm[2], 2 - perm[1], 2 - perm[0]])
            m = np.eye(4)
            m[:3, :3] = ijk_to_ras[:3, :3][:, perm]
            m[:3, 3] = ijk_to_ras[:3, 3]
            ijk_to_ras = m

    corners_ras = apply_matrix(ijk_to_ras, slice_corner_indices(pixels.shape).reshape(-1, 3))
    if world_from_ras is None:
        world = corners_ras
    elif callable(world_from_ras):
        world = np.asarray(world_from_ras(corners_ras), dtype=float).reshape(-1, 3)
    else:
        world = apply_matrix(world_from_ras, corners_ras)
    corners_lps = flip_points(world).reshape(pixels.shape[0], 3, 3)
    return stack_from_slice_corners(pixels, corners_lps, thickness_mm=thickness_mm, **stack_kwargs)


def stack_from_slice_corners(pixels_kji, corners_lps, thickness_mm=None, **stack_kwargs):
    """A stack from the LPS positions of three corners of every slice.

    Parameters
    ----------
    pixels_kji : ndarray, shape (nk, nj, ni)
    corners_lps : ndarray, shape (nk, 3, 3)
        Per slice, LPS of pixels (0, 0), (i_far, 0) and (0, j_far) as in :func:`slice_corner_indices`.
    thickness_mm : float, optional
        Default: the median slice step along the normal.

    Raises InputError when the in-plane axes are not orthogonal or differ between slices by more than
    ``_CORNER_TOL_MM`` at the slice edge (a transform that bends or rotates slices individually).
    """
    pixels = np.asarray(pixels_kji, dtype=np.float32)
    nk, nj, ni = pixels.shape
    c = np.asarray(corners_lps, dtype=float).reshape(nk, 3, 3)
    i_far, j_far = max(ni - 1, 1), max(nj - 1, 1)
    origins = c[:, 0]
    row_vecs = (c[:, 1] - origins) / i_far  # one pixel step along i, per slice
    col_vecs = (c[:, 2] - origins) / j_far
    row, col = row_vecs.mean(axis=0), col_vecs.mean(axis=0)
    # Slices must share their in-plane axes: measured as corner displacement at the slice edge.
    drift = max(
        float(np.max(np.linalg.norm(row_vecs - row, axis=1))) * i_far,
        float(np.max(np.linalg.norm(col_vecs - col, axis=1))) * j_far,
    )
    if drift > _CORNER_TOL_MM:
        raise InputError(
            f"the volume's transform rotates or scales individual slices (by up to {drift:.3g} mm at the "
            "slice edge): harden the transform in Slicer (Transforms module) before fusing"
        )
    di, dj = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if min(di, dj) <= 0:
        raise InputError("the volume has a zero pixel spacing")
    cos = abs(float(row @ col)) / (di * dj)
    if cos > _INPLANE_ORTHOGONALITY_TOL:
        raise InputError(
            f"the slice plane is sheared (in-plane axes at {np.degrees(np.arccos(min(cos, 1.0))):.2f} degrees): "
            "harden or remove the volume's transform, or resample it, before fusing"
        )
    row_dir, col_dir = row / di, col / dj
    normal = np.cross(row_dir, col_dir)
    offsets = (origins - origins[0]) @ normal
    if nk > 1 and offsets[-1] < offsets[0]:
        # Library stacks have offsets increasing along row x column.
        pixels = pixels[::-1]
        origins = origins[::-1]
        offsets = offsets[::-1]
    if thickness_mm is None:
        thickness_mm = float(np.median(np.abs(np.diff(offsets)))) if nk > 1 else min(di, dj)
    # Stack raises InputError for repeated positions; the rest of its checks apply as usual.
    return Stack(pixels, origins, row_dir, col_dir, (di, dj), thickness_mm, **stack_kwargs)


# ----------------------------------------------------------------------------- stack -> volume node
def volume_from_stack(stack):
    """The voxel array and IJKToRAS of a volume node holding ``stack`` (the inverse of
    :func:`stack_from_volume` for regular stacks).

    A sheared (gantry-tilted) stack gets a non-orthogonal IJKToRAS, which MRML volume nodes store as
    they are. The stack's registration ``transform`` is folded in.

    Returns
    -------
    (ndarray float32 (nk, nj, ni), ndarray (4, 4))

    Raises
    ------
    InputError
        For a stack with irregular slice gaps: no single matrix places its slices.
    """
    return stack.pixels, flip_index_matrix(stack.ijk_to_lps_affine())


# ------------------------------------------------------------------------------ grid -> volume node
def ijk_to_ras_from_grid(grid):
    """The IJKToRAS 4x4 for a new volume node holding an array on ``grid`` (shape ``grid.shape``)."""
    return flip_index_matrix(grid.index_to_lps_affine)


def grid_from_ijk_to_ras(ijk_to_ras, shape_kji):
    """The library grid of a volume node (the inverse of :func:`ijk_to_ras_from_grid`).

    Raises InputError when the volume's axes are not orthogonal (a grid is always orthonormal).
    """
    m = flip_index_matrix(ijk_to_ras)
    cols = m[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0):
        raise InputError("the volume has a zero voxel spacing")
    direction = cols / spacing
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > _INPLANE_ORTHOGONALITY_TOL:
        raise InputError("the volume's axes are not orthogonal; it cannot define a reconstruction grid")
    return Grid(
        shape=tuple(int(v) for v in shape_kji),
        spacing_mm=tuple(float(v) for v in spacing),
        origin_mm=tuple(float(v) for v in m[:3, 3]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def display_window_level(array=None, modality="CT"):
    """(window, level) to show a fused volume: Slicer's CT-Bone preset for CT, else robust percentiles.

    For other modalities (MR...), the 1st..99.5th percentile range of the non-zero voxels of
    ``array`` (any shape); (1, 0.5) when there is nothing to measure.
    """
    if str(modality).upper() == "CT":
        return CT_BONE_WINDOW_LEVEL
    if array is None:
        return (1.0, 0.5)
    a = np.asarray(array, dtype=float).ravel()
    a = a[np.isfinite(a) & (a != 0)]
    if a.size == 0:
        return (1.0, 0.5)
    lo, hi = np.percentile(a, [1.0, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (float(hi - lo), float(0.5 * (hi + lo)))
