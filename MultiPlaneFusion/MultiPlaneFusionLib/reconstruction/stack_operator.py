"""Forward models of thick-slice stacks, y_k = D_k B_k T_k x, with exact adjoints.

A :class:`StackOperator` maps a volume ``x`` on the reconstruction grid (float, shape ``grid.shape``) to
the stack that an ideal scanner would have produced from it (shape ``stack.shape``), and back by the
exact transpose. Build one with :func:`.operators.make_operator`; the super-resolution solver and the registration
refinement (simulated slices) both use this API, which stays stable:

- ``op.forward(x)``: float32 (float64 for float64 input) stack-shaped; samples the model cannot predict
  (pixel centre outside the grid) are 0 and ``op.valid`` is False there;
- ``op.adjoint(y)``: grid-shaped, exact transpose of ``forward`` (invalid samples ignored);
- ``op.normal(x)``: ``adjoint(forward(x))`` without the stack-shaped round trip (optionally scaled and
  added into a given array);
- ``op.adjoint_add(y, out)``: ``out += adjoint(y)``;
- ``op.coverage()``: bool grid mask of the voxels inside the stack's sampled region;
- ``op.path``: ``"separable"``, ``"skew"``, ``"shear"`` or ``"general"``.

The continuous image behind ``x`` is, along each axis of the 1-D PSF matrices, Keys' cubic-convolution
interpolant of the nodes (``sampling.psf.IMAGE_BASIS``: the matrices integrate the PSF against it exactly,
so a row is as wide as the PSF wherever the sample falls; the values extend beyond the outer voxel
centres). A sample is the integral of that image against the stack's point-spread
function (PSF), centred on the pixel centre, oriented with the slice: Gaussian with through-plane
FWHM = slice thickness and in-plane FWHM = 1.2 x pixel spacing (``sampling.psf.IN_PLANE_FWHM_FACTOR``,
NiftyMIC/SVRTK's convention),
or ``psf="box"``: a slab of the slice thickness through-plane (MPR slab reformats), same Gaussian
in-plane. Each sample's weights are normalised over the part of the PSF inside the grid, so a constant
volume maps to the same constant (``A 1 = 1`` on valid samples) and intensity offsets pass through; a sample
with less than ``MIN_MODEL_MASS`` of its PSF on the grid is not valid.

Four paths, chosen by :func:`.operators.make_operator` (the PSF itself is :mod:`.psf`, the 1-D matrices
:mod:`.banded`):

- **separable** (stack axes parallel to grid axes up to permutation and flip, after the registration
  transform; slices not sheared; gaps allowed): A is the tensor product of three 1-D banded matrices,
  one per grid axis, holding the PSF integrated against the interpolation basis of that axis.
  It is applied by blocked matrix products (BLAS) along each axis, reducing the most-downsampled axis
  first. No 3-D interpolation. :mod:`.separable_operator`.
- **skew** (a stack whose slice normal is within 30 degrees of a grid axis; any turn about the normal):
  through-plane first along that axis at the slices' exact positions, then two in-plane Lanczos-3 shears and
  the in-plane PSF on the reduced array; when the profile integrated along the axis would drift more than
  ``skew_operator.SKEW_MAX_DRIFT_VOXELS``, the grid is first pre-sheared so that the axis runs along the normal.
  :mod:`.skew_operator`.
- **shear** (on request: a stack within 12 degrees of the grid axes): the general path's lattice and matrices,
  with the grid carried onto the lattice by Lanczos-3 shears instead of trilinear interpolation.
  :mod:`.shear_operator`.
- **general** (any other orientation: strongly oblique, tilted beyond the skew path's pre-shear): the grid
  is interpolated trilinearly (the one place the image is the grid's linear interpolant) at the nodes of a
  lattice aligned with the stack frame (row, column, normal); then the
  PSF and the sampling are 1-D banded matrices along the lattice axes: through-plane along the slice
  NORMAL (even when a tilted series' slice origins step along the table), in-plane per slice (a sheared
  slice is shifted in-plane, so its in-plane matrices differ per slice). When one stack axis is parallel
  to a grid axis (gantry tilt: the row is the patient's left-right axis) the lattice shares that axis's
  nodes with the grid and the interpolation is bilinear per plane, vectorised along the shared axis;
  otherwise it is trilinear, computed on the fly lattice chunk by lattice chunk. The transpose of the
  interpolation is a sorted segment sum (shared axis) or ``np.add.at`` per corner (trilinear).
  :mod:`.general_operator`.

Everything is numpy; memory is bounded by chunking (a few grid-sized arrays at most). The banded products
split over threads (``workers``, :mod:`.parallel`) and can write into given arrays, and the solver lends
the operators reusable work memory (:class:`.workspace.Scratch`): a fresh grid-sized array costs page faults.

This module holds the contract (:class:`StackOperator`) and the geometry every path shares: the stack's frame
against the grid, and the test for axes parallel to grid axes that decides between the paths.
"""

import math

import numpy as np

from ..transforms import stack_frame

# Axes count as parallel when the largest position error this causes across the stack's field of view
# stays below this fraction of a grid voxel.
PARALLEL_TOLERANCE_VOXELS = 0.1
# Grid or lattice nodes handled per chunk when the work is chunked (bounds the temporaries to ~100 MB).
CHUNK_NODES = 1 << 21
# A sample is modelled only when this much of its PSF's mass falls on the grid: below, the normalisation (1 /
# mass) would blow up the few edge voxels it reaches, and a pre-sheared grid's interpolation lobes can make that
# part small or negative (a moved phantom series lost 3.8 dB and overflowed the solver with a limit of 1e-6).
MIN_MODEL_MASS = 0.5


def stack_placement(stack):
    """``(frame, p0, slice_uvw)``: the stack's patient-space unit axes (row, column, normal, as columns) after
    its registration transform (:func:`transforms.stack_frame`), the patient position of pixel (0, 0, 0) of
    slice 0, and each slice origin in that frame, shape (nk, 3)."""
    q = stack_frame(stack)
    p0 = stack.index_to_physical(0.0, 0.0, 0.0)
    origins = stack.index_to_physical(np.arange(stack.shape[0], dtype=float), 0.0, 0.0)
    return q, p0, (origins - p0) @ q


def grid_axes(grid):
    """Unit vectors of grid array axes 0, 1, 2 (k, j, i) in LPS, as columns."""
    d = grid.direction_matrix
    return np.stack([d[:, 2], d[:, 1], d[:, 0]], axis=1)


def grid_spacing_kji(grid):
    """Grid spacing along array axes k, j, i (mm)."""
    return np.asarray(grid.spacing_mm, dtype=float)[::-1]


def spacing_along(grid, direction):
    """Grid sampling distance along a direction: 1 / ||(e . axis_a / h_a)_a||."""
    e = grid_axes(grid).T @ np.asarray(direction, float)
    return 1.0 / float(np.linalg.norm(e / grid_spacing_kji(grid)))


def field_of_view_mm(stack):
    """Diagonal of the box around the stack's corners (mm)."""
    c = stack.corners_mm()
    return float(np.linalg.norm(c.max(axis=0) - c.min(axis=0)))


def parallel_axis(direction, grid, extent_mm):
    """(grid array axis, sign) when ``direction`` is parallel to a grid axis within the tolerance."""
    cos = grid_axes(grid).T @ direction
    g = int(np.argmax(np.abs(cos)))
    sin = math.sqrt(max(0.0, 1.0 - cos[g] ** 2))
    if sin * extent_mm <= PARALLEL_TOLERANCE_VOXELS * float(np.min(grid.spacing_mm)):
        return g, (1 if cos[g] > 0 else -1)
    return None


def separable_axes(stack, grid):
    """Grid array axes (for stack axes k, j, i) when the stack can take the separable path, else None.

    The stack's row, column and normal (after its transform) must each be parallel to a grid axis and its
    slices must not drift in-plane (no gantry-tilt shear), within ``PARALLEL_TOLERANCE_VOXELS``.
    """
    frame, _, slice_uvw = stack_placement(stack)
    extent = field_of_view_mm(stack)
    found = []
    for col in (2, 1, 0):  # normal -> k, column -> j, row -> i
        hit = parallel_axis(frame[:, col], grid, extent)
        if hit is None:
            return None
        found.append(hit[0])
    if len(set(found)) != 3:
        return None
    drift = np.abs(slice_uvw[:, :2]).max() if len(slice_uvw) else 0.0
    if drift > PARALLEL_TOLERANCE_VOXELS * float(np.min(grid.spacing_mm)):
        return None
    return tuple(found)


def index_box_mask(k, j, i, shape):
    """Points whose continuous stack indices lie inside the sampled box [-0.5, n - 0.5)^3 (half-open, as
    ITK decides "inside" when resampling, so the coverage equals the average fusion's)."""
    nk, nj, ni = shape
    return (k >= -0.5) & (k < nk - 0.5) & (j >= -0.5) & (j < nj - 0.5) & (i >= -0.5) & (i < ni - 0.5)


def affine_coverage(stack, grid):
    """:meth:`StackOperator.coverage` plane by plane for a regular (possibly sheared) stack, where one affine
    maps grid indices to stack indices; None for other stacks."""
    if not stack.is_regular or stack.shape[0] < 2:
        return None
    to_stack = np.linalg.inv(stack.ijk_to_lps_affine()) @ grid.index_to_lps_affine
    nk, nj, ni = grid.shape
    out = np.zeros((nk, nj, ni), dtype=bool)
    jj, ii = np.meshgrid(np.arange(nj, dtype=np.float32), np.arange(ni, dtype=np.float32), indexing="ij")
    n_stack = (stack.shape[2], stack.shape[1], stack.shape[0])  # along stack i, j, k
    for k in range(nk):
        inside = np.ones((nj, ni), dtype=bool)
        for row in range(3):
            m = to_stack[row].astype(np.float32)
            c = m[0] * ii + m[1] * jj + (m[2] * k + m[3])
            inside &= (c >= -0.5) & (c < n_stack[row] - 0.5)
        out[k] = inside
    return out


class StackOperator:
    """Linear model of one stack on one grid. See the module docstring for the API contract."""

    path = ""

    def __init__(self, stack, grid, psf):
        self.stack = stack
        self.grid = grid
        self.psf = psf
        self.shape = tuple(int(v) for v in stack.shape)
        self.grid_shape = tuple(int(v) for v in grid.shape)

    @property
    def valid(self):
        """Bool mask, stack-shaped: samples the model predicts (pixel centre inside the grid)."""
        raise NotImplementedError

    def forward(self, x, workers=None):
        """Simulated stack from grid volume ``x``; stack-shaped, 0 at invalid samples. ``workers``
        (:class:`parallel.Workers`) lets the work run on several threads."""
        raise NotImplementedError

    def adjoint(self, y, workers=None):
        """Exact transpose of :meth:`forward` applied to a stack-shaped ``y``; grid-shaped."""
        raise NotImplementedError

    def normal(self, x, out=None, scale=1.0, workers=None, scratch=None, accumulate=True):
        """``scale * adjoint(forward(x))``; into ``out`` when given (added to it when ``accumulate``), else
        a new array. ``scratch`` (:class:`.workspace.Scratch`) lends reusable intermediate arrays."""
        y = self.forward(x, workers=workers)
        if scale != 1.0:
            y *= y.dtype.type(scale)
        if out is None:
            return self.adjoint(y, workers)
        if not accumulate:
            out[...] = 0
        return self.adjoint_add(y, out, workers=workers, scratch=scratch)

    def adjoint_add(self, y, out, workers=None, scratch=None):
        """``out += adjoint(y)`` (``scratch``: reusable intermediates); returns out."""
        out += self.adjoint(y, workers)
        return out

    def adjoint_ones(self, out=None, scale=1.0, workers=None):
        """``scale * A^T 1`` over the valid samples (float32, grid-shaped): the absolute row sums of A^T A,
        since every row of A sums to 1. Added to ``out`` when given."""
        ones = self.valid.astype(np.float32)
        if scale != 1.0:
            ones *= np.float32(scale)
        t = self.adjoint(ones, workers)
        if out is None:
            return t
        out += t
        return out

    def coverage(self):
        """Bool grid mask: voxel centres inside the stack's sampled box (pixel edges, slices +- half a
        step, gaps included), after the registration transform."""
        out = np.zeros(self.grid_shape, dtype=bool)
        nk, nj, ni = self.grid_shape
        per = max(1, CHUNK_NODES // max(nj * ni, 1))
        for k0 in range(0, nk, per):
            k1 = min(nk, k0 + per)
            pts = self.grid.slab_points(k0, k1)
            out[k0:k1] = index_box_mask(*self.stack.physical_to_index(pts), self.shape)
        return out

    @staticmethod
    def _dtype(x):
        return np.float64 if np.asarray(x).dtype == np.float64 else np.float32

    def describe(self):
        """A small dict for logs and ``info``."""
        return {"path": self.path, "psf": self.psf, "valid_samples": int(np.count_nonzero(self.valid))}


class NormalisedOperator(StackOperator):
    """A model whose samples are normalised over their own mass (``A 1 = 1`` on valid samples) after the fact:
    subclasses provide ``_raw_forward(x, workers)`` and ``_raw_adjoint(y, workers, out=None)`` (exact
    transposes) and call :meth:`_normalise` once their geometry is built."""

    def _normalise(self, valid, workers=None):
        """Keep the ``valid`` samples that the raw model reaches and their 1 / mass scale."""
        mass = self._raw_forward(np.ones(self.grid_shape, dtype=np.float32), workers)
        ok = valid & (mass > MIN_MODEL_MASS)
        self._valid = ok
        self._scale = np.where(ok, 1.0 / np.where(ok, mass, 1.0), 0.0).astype(np.float32)
        self._scale64 = None

    @property
    def valid(self):
        return self._valid

    def _scale_for(self, dt):
        if dt == np.float64:
            if self._scale64 is None:
                self._scale64 = self._scale.astype(np.float64)
            return self._scale64
        return self._scale

    def forward(self, x, workers=None):
        x = np.asarray(x, dtype=self._dtype(x))
        y = self._raw_forward(x, workers)
        y *= self._scale_for(x.dtype)
        return y

    def adjoint(self, y, workers=None):
        dt = self._dtype(y)
        return self._raw_adjoint(np.asarray(y, dtype=dt) * self._scale_for(dt), workers)

    def adjoint_add(self, y, out, workers=None, scratch=None):
        dt = out.dtype.type
        y = np.asarray(y, dtype=dt) * self._scale_for(np.dtype(dt))
        if not out.flags.c_contiguous:
            out += self._raw_adjoint(y, workers)
            return out
        return self._raw_adjoint(y, workers, out)


__all__ = ["NormalisedOperator", "PARALLEL_TOLERANCE_VOXELS", "StackOperator", "affine_coverage", "field_of_view_mm",
           "grid_axes", "grid_spacing_kji", "index_box_mask", "parallel_axis", "separable_axes", "spacing_along",
           "stack_placement"]
