"""Resampling a stack onto the reconstruction grid, honouring its per-slice geometry.

Two exact routes:

- regularly spaced stacks (including gantry-tilted, i.e. sheared, ones) become an orthonormal SimpleITK
  image in the stack's own frame plus one affine transform that undoes the shear and applies the
  registration; SimpleITK (multi-threaded C++) does the interpolation;
- stacks with irregular gaps have no affine, so grid points are mapped to continuous stack indices
  (:meth:`Stack.physical_to_index`) and interpolated linearly in numpy, slab by slab.
"""

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


def stack_sampling_image(stack):
    """(image, transform) so that ``sitk.Resample(image, grid, transform)`` samples the stack exactly.

    ``image`` holds the pixels on an orthonormal lattice in the stack's frame (row, column, normal) with
    the slices at their offsets along the normal; ``transform`` maps patient-space points to that frame:
    it inverts the registration transform and removes the in-plane drift of a sheared stack's slices.
    Only for regular stacks (see :attr:`Stack.is_regular`).
    """
    if not stack.is_regular:
        raise InputError(f"'{stack.description}' has irregular gaps; it has no sampling image")
    o0 = stack.slice_origins_mm[0]
    n = stack.normal
    step_n = stack.slice_step_mm
    img = sitk.GetImageFromArray(stack.pixels)
    img.SetSpacing((*stack.pixel_spacing_mm, step_n))
    img.SetOrigin([float(v) for v in o0])
    img.SetDirection([float(v) for v in np.stack([stack.row_direction, stack.column_direction, n], 1).ravel()])
    # In-plane drift per mm along the normal, as an LPS vector: zero unless sheared.
    drift = stack.shear_per_mm[0] * stack.row_direction + stack.shear_per_mm[1] * stack.column_direction
    shear = np.eye(3) - np.outer(drift, n)  # p' = p - drift * ((p - o0) . n)
    r_inv = np.linalg.inv(stack.transform)
    m = shear @ r_inv[:3, :3]
    b = o0 - shear @ o0 + shear @ r_inv[:3, 3]
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in m.ravel()])
    t.SetTranslation([float(v) for v in b])
    return img, t


def _resample_regular(stack, grid, interpolation):
    img, t = stack_sampling_image(stack)
    out = sitk.Resample(
        img,
        [int(v) for v in grid.shape[::-1]],
        t,
        _INTERPOLATORS[interpolation],
        [float(v) for v in grid.origin_mm],
        [float(v) for v in grid.spacing_mm],
        [float(v) for v in grid.direction],
        float("nan"),
        sitk.sitkFloat32,
    )
    values = sitk.GetArrayFromImage(out)
    covered = ~np.isnan(values)
    values[~covered] = 0.0
    return values, covered


def _linear_at(pixels, k, j, i):
    """Trilinear interpolation of ``pixels`` at continuous indices; points outside are clamped."""
    shape = pixels.shape
    out = np.zeros(k.shape, dtype=np.float64)
    idx = []
    for c, n in zip((k, j, i), shape):
        c0 = np.clip(np.floor(c), 0, max(n - 2, 0)).astype(np.intp)
        f = np.clip(c - c0, 0.0, 1.0) if n > 1 else np.zeros_like(c)
        idx.append((c0, np.minimum(c0 + 1, n - 1), f))
    (k0, k1, fk), (j0, j1, fj), (i0, i1, fi) = idx
    for kk, wk in ((k0, 1 - fk), (k1, fk)):
        for jj, wj in ((j0, 1 - fj), (j1, fj)):
            for ii, wi in ((i0, 1 - fi), (i1, fi)):
                out += pixels[kk, jj, ii] * (wk * wj * wi)
    return out


def _resample_points(stack, grid, monitor=None, slab_voxels=2_000_000):
    nk, nj, ni = grid.shape
    values = np.zeros(grid.shape, dtype=np.float32)
    covered = np.zeros(grid.shape, dtype=bool)
    step = max(1, slab_voxels // max(1, nj * ni))
    sk, sj, si = stack.shape
    for k0 in range(0, nk, step):
        k1 = min(nk, k0 + step)
        k, j, i = stack.physical_to_index(grid.slab_points(k0, k1))
        inside = (k >= -0.5) & (k <= sk - 0.5) & (j >= -0.5) & (j <= sj - 0.5) & (i >= -0.5) & (i <= si - 0.5)
        v = np.zeros(k.shape, dtype=np.float32)
        if inside.any():
            v[inside] = _linear_at(stack.pixels, k[inside], j[inside], i[inside])
        values[k0:k1] = v
        covered[k0:k1] = inside
        if monitor is not None:
            monitor.check()
    return values, covered


def resample_stack(stack, grid, interpolation="linear", monitor=None):
    """Sample a stack at every voxel centre of ``grid``.

    Parameters
    ----------
    stack : Stack
    grid : Grid
    interpolation : {'linear', 'bspline', 'nearest'}
        Irregularly spaced stacks are always interpolated linearly (between the slices bounding a gap).

    Returns
    -------
    values : ndarray, float32, shape grid.shape
        Interpolated intensities (0 where not covered).
    covered : ndarray, bool, shape grid.shape
        True where the voxel centre lies inside the stack's sampled region (pixel edges, first/last slice
        +- half a slice step).
    """
    if interpolation not in _INTERPOLATORS:
        raise InputError(f"unknown interpolation '{interpolation}' (use linear, bspline or nearest)")
    if stack.is_regular and len(stack.slice_origins_mm) > 1:
        return _resample_regular(stack, grid, interpolation)
    return _resample_points(stack, grid, monitor)
