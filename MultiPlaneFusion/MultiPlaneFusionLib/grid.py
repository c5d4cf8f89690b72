"""The reconstruction grid: the isotropic LPS lattice every stack is fused onto.

A grid follows SimpleITK's conventions so it can be turned into an image without surprises:
``spacing_mm``, ``origin_mm`` and the axes of ``direction`` are in (i, j, k) order, while ``shape`` is the
numpy shape ``(nk, nj, ni)`` of arrays on the grid.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .stack import check_reference
from .transforms import stack_frame


@dataclass(frozen=True)
class Grid:
    """A regular, orthonormal LPS grid.

    Attributes
    ----------
    shape : (nk, nj, ni)
        Numpy shape of a volume on the grid.
    spacing_mm : (si, sj, sk)
    origin_mm : (x, y, z)
        LPS centre of voxel (0, 0, 0).
    direction : 9-tuple
        Row-major 3x3 matrix whose columns are the i, j, k axes in LPS (SimpleITK layout).
    """

    shape: Tuple[int, int, int]
    spacing_mm: Tuple[float, float, float]
    origin_mm: Tuple[float, float, float]
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self):
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def n_voxels(self):
        return int(np.prod(self.shape))

    @property
    def index_to_lps_affine(self):
        """4x4 affine from (i, j, k, 1) to LPS."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing_mm)[None, :]
        m[:3, 3] = self.origin_mm
        return m

    def index_to_physical(self, k, j, i):
        """LPS of (continuous) voxel indices; arrays broadcast; returns shape (..., 3)."""
        ijk = np.stack(np.broadcast_arrays(np.asarray(i, float), np.asarray(j, float), np.asarray(k, float)), -1)
        a = self.index_to_lps_affine
        return ijk @ a[:3, :3].T + a[:3, 3]

    def physical_to_index(self, points):
        """Continuous (k, j, i) of LPS points of shape (..., 3)."""
        a = np.linalg.inv(self.index_to_lps_affine)
        ijk = np.asarray(points, float) @ a[:3, :3].T + a[:3, 3]
        return ijk[..., 2], ijk[..., 1], ijk[..., 0]

    def slab_points(self, k0, k1):
        """LPS of every voxel centre in slices k0..k1-1, shape (k1-k0, nj, ni, 3)."""
        _, nj, ni = self.shape
        kk, jj, ii = np.meshgrid(np.arange(k0, k1), np.arange(nj), np.arange(ni), indexing="ij")
        return self.index_to_physical(kk, jj, ii)

    def image(self, array=None, dtype=np.float32):
        """A SimpleITK image on the grid holding ``array`` (shape ``self.shape``) or zeros."""
        if array is None:
            array = np.zeros(self.shape, dtype=dtype)
        array = np.asarray(array)
        if array.shape != tuple(self.shape):
            raise ValueError(f"array shape {array.shape} does not match grid shape {self.shape}")
        img = sitk.GetImageFromArray(array)
        img.SetSpacing([float(v) for v in self.spacing_mm])
        img.SetOrigin([float(v) for v in self.origin_mm])
        img.SetDirection([float(v) for v in self.direction])
        return img

    def summary(self):
        return {
            "shape_kji": [int(v) for v in self.shape],
            "size_ijk": [int(v) for v in self.shape[::-1]],
            "spacing_mm": [float(v) for v in self.spacing_mm],
            "origin_mm": [float(v) for v in self.origin_mm],
            "direction": [float(v) for v in self.direction],
            "n_voxels": self.n_voxels,
        }


def grid_from_image(image):
    """Exactly the grid of a SimpleITK image (size, spacing, origin and direction identical)."""
    if image.GetDimension() != 3:
        raise InputError(f"a reconstruction grid needs a 3-D volume, got {image.GetDimension()}-D")
    size = image.GetSize()
    return Grid(
        shape=(int(size[2]), int(size[1]), int(size[0])),
        spacing_mm=tuple(float(v) for v in image.GetSpacing()),
        origin_mm=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
    )


def grid_for_stacks(
    stacks: Sequence,
    reference: int = 0,
    spacing_mm: float = None,
    extent: str = "overlap",
    margin_mm: float = 0.0,
):
    """The default reconstruction grid for a set of stacks.

    Axes follow the reference stack (its row, column and normal directions); spacing is isotropic,
    ``spacing_mm`` or else the finest in-plane pixel spacing of the inputs; the extent is the box,
    in that frame, covered by all stacks (``extent='overlap'``) or by any (``'union'``).

    Raises InputError when the stacks do not overlap.
    """
    if not stacks:
        raise InputError("no stacks to build a grid from")
    check_reference(stacks, reference)
    if extent not in ("overlap", "union"):
        raise InputError(f"grid extent must be 'overlap' or 'union', not '{extent}'")
    if spacing_mm is None:
        spacing_mm = min(min(s.pixel_spacing_mm) for s in stacks)
    spacing_mm = float(spacing_mm)
    if not spacing_mm > 0:
        raise InputError(f"grid spacing must be positive, got {spacing_mm}")
    frame = stack_frame(stacks[reference])
    lows, highs = [], []
    for s in stacks:
        c = s.corners_mm() @ frame  # coordinates along the grid axes
        lows.append(c.min(axis=0))
        highs.append(c.max(axis=0))
    if extent == "overlap":
        lo, hi = np.max(lows, axis=0), np.min(highs, axis=0)
    else:
        lo, hi = np.min(lows, axis=0), np.max(highs, axis=0)
    lo = lo - margin_mm
    hi = hi + margin_mm
    if np.any(hi - lo < spacing_mm):
        raise InputError(
            "the stacks do not overlap: their fields of view share no volume "
            "(check that they belong to the same patient and frame of reference, or use --extent union)"
        )
    n = np.maximum(1, np.floor((hi - lo) / spacing_mm + 1e-6)).astype(int)
    # Centre the lattice in the box so both ends lose the same fraction of a voxel.
    first = lo + 0.5 * ((hi - lo) - (n - 1) * spacing_mm)
    origin = frame @ first
    return Grid(
        shape=(int(n[2]), int(n[1]), int(n[0])),
        spacing_mm=(spacing_mm, spacing_mm, spacing_mm),
        origin_mm=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in frame.ravel()),
    )
