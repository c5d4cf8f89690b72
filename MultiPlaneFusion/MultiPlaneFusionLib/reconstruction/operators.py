"""Forward models of thick-slice stacks, y_k = D_k B_k T_k x, with exact adjoints.

A :class:`StackOperator` maps a volume ``x`` on the reconstruction grid (float, shape ``grid.shape``) to
the stack that an ideal scanner would have produced from it (shape ``stack.shape``), and back by the
exact transpose. Build one with :func:`make_operator`; the super-resolution solver and the registration
refinement (simulated slices) both use this API, which stays stable:

- ``op.forward(x)``: float32 (float64 for float64 input) stack-shaped; samples the model cannot predict
  (pixel centre outside the grid) are 0 and ``op.valid`` is False there;
- ``op.adjoint(y)``: grid-shaped, exact transpose of ``forward`` (invalid samples ignored);
- ``op.normal(x)``: ``adjoint(forward(x))`` without the stack-shaped round trip (optionally scaled and
  added into a given array);
- ``op.adjoint_add(y, out)``: ``out += adjoint(y)``;
- ``op.coverage()``: bool grid mask of the voxels inside the stack's sampled region;
- ``op.path``: ``"separable"`` or ``"general"``.

The continuous image behind ``x`` is the trilinear interpolant of the grid (constant for the half voxel
beyond the outer voxel centres). A sample is the integral of that image against the stack's point-spread
function (PSF), centred on the pixel centre, oriented with the slice: Gaussian with through-plane
FWHM = slice thickness and in-plane FWHM = 1.2 x pixel spacing (NiftyMIC/SVRTK/MIALSRTK convention),
or ``psf="box"``: a slab of the slice thickness through-plane (MPR slab reformats), same Gaussian
in-plane. Each sample's weights are normalised over the part of the PSF inside the grid, so a constant
volume maps to the same constant (``A 1 = 1`` on valid samples) and intensity offsets pass through.

Two paths, chosen by :func:`make_operator`:

- **separable** (stack axes parallel to grid axes up to permutation and flip, after the registration
  transform; slices not sheared; gaps allowed): A is the tensor product of three 1-D banded matrices,
  one per grid axis, holding the PSF integrated against the linear-interpolation basis of that axis.
  It is applied by blocked matrix products (BLAS) along each axis, reducing the most-downsampled axis
  first. No 3-D interpolation.
- **general** (oblique, gantry-tilted/sheared, rotated by registration): the grid is interpolated
  trilinearly at the nodes of a lattice aligned with the stack frame (row, column, normal); then the
  PSF and the sampling are 1-D banded matrices along the lattice axes: through-plane along the slice
  NORMAL (even when a tilted series' slice origins step along the table), in-plane per slice (a sheared
  slice is shifted in-plane, so its in-plane matrices differ per slice). When one stack axis is parallel
  to a grid axis (gantry tilt: the row is the patient's left-right axis) the lattice shares that axis's
  nodes with the grid and the interpolation is bilinear per plane, vectorised along the shared axis;
  otherwise it is trilinear, computed on the fly lattice chunk by lattice chunk. The transpose of the
  interpolation is a sorted segment sum (shared axis) or ``np.add.at`` per corner (trilinear).

Everything is numpy; memory is bounded by chunking (a few grid-sized arrays at most). The banded products
split over threads (``workers``, :mod:`.parallel`) and can write into given arrays, and the solver lends
the operators reusable work memory (:class:`Scratch`): a fresh grid-sized array costs page faults.
"""

import math
import threading

import numpy as np

from ..errors import InputError
from .parallel import row_slabs, split, workers_or_serial

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
IN_PLANE_FWHM_FACTOR = 1.2
# Gaussian PSFs are truncated at this many standard deviations (0.27 % of the mass), as NiftyMIC does.
GAUSSIAN_CUTOFF_SIGMAS = 3.0
# Axes count as parallel when the largest position error this causes across the stack's field of view
# stays below this fraction of a grid voxel.
PARALLEL_TOLERANCE_VOXELS = 0.1
# Rows of a banded matrix grouped per BLAS call, by the array axis it contracts (measured on the phantom's
# operators, 8-26 taps, n = 44-253, single thread): along axis 0 the product runs over whole planes and
# stays efficient with few rows, so small blocks waste the fewest multiplications by zero (4 rows: 8 ms
# against 13 ms with 32); along axis 1 (a batch of products) 8 rows; along the contiguous axis 2 the
# product writes strided columns and needs wide blocks (64 rows), and an expanding matrix (a transposed
# sampling matrix, n_out >= 2 n_in) is fastest as one dense product (18 ms against 28 ms with 32 rows).
_BLOCK_ROWS_BY_AXIS = (4, 8, 64)
# Separable normal operator: axes whose sample count is below this fraction of the grid nodes are applied
# as M then M^T, the others through their Gram matrix M^T M.
_REDUCE_RATIO = 0.75
# Lattice nodes interpolated per chunk in the general path (bounds the temporaries to ~100 MB).
_CHUNK_NODES = 1 << 21
_erf = np.frompyfunc(math.erf, 1, 1)


# ----------------------------------------------------------------------------------------- 1-D PSF rows
def psf_sigma_mm(stack, psf="gaussian"):
    """PSF sizes in mm as (along i (row), along j (column), through-plane).

    In-plane: Gaussian sigma = 1.2 x pixel spacing / 2.3548. Through-plane: Gaussian sigma = thickness /
    2.3548, or for ``psf="box"`` the full slab width (= thickness).
    """
    di, dj = stack.pixel_spacing_mm
    s_i = IN_PLANE_FWHM_FACTOR * di / FWHM_PER_SIGMA
    s_j = IN_PLANE_FWHM_FACTOR * dj / FWHM_PER_SIGMA
    if psf == "gaussian":
        return s_i, s_j, stack.thickness_mm / FWHM_PER_SIGMA
    if psf == "box":
        return s_i, s_j, stack.thickness_mm
    raise InputError(f"unknown PSF '{psf}' (use gaussian or box)")


def _cdf_moments(z, kind, width):
    """CDF P0(z) and first moment P1(z) = int_{-inf}^{z} t p(t) dt of a centred PSF (index units)."""
    if kind == "gaussian":
        s = max(width, 1e-9)
        u = z / s
        p0 = 0.5 * (1.0 + _erf(u / math.sqrt(2.0)).astype(float))
        p1 = -s / math.sqrt(2.0 * math.pi) * np.exp(-0.5 * u * u)
        return p0, p1
    w = max(width, 1e-9)  # box of full width w
    zc = np.clip(z, -0.5 * w, 0.5 * w)
    return (zc + 0.5 * w) / w, (zc * zc - 0.25 * w * w) / (2.0 * w)


def psf_rows(positions, n_nodes, kind, width):
    """Normalised PSF weights of samples against the linear-interpolation basis of a 1-D lattice.

    Parameters
    ----------
    positions : array (m,)
        Sample centres in node-index units (node ``v`` sits at ``v``).
    n_nodes : int
        Number of lattice nodes; the image is their linear interpolant, constant for half a node beyond
        each end and unknown (excluded) further out.
    kind : {"gaussian", "box"}
    width : float
        Gaussian sigma, or the box's full width, in node-index units.

    Returns
    -------
    start : int array (m,)
        Index of the first node of each row.
    weights : float64 array (m, taps)
        Row weights (summing to 1) for nodes ``start .. start + taps - 1``; all zero for samples whose
        centre lies outside ``[-0.5, n_nodes - 0.5]``.
    """
    c = np.asarray(positions, dtype=float).reshape(-1)
    reach = (GAUSSIAN_CUTOFF_SIGMAS * width if kind == "gaussian" else 0.5 * width) + 1.0
    taps = int(math.ceil(2 * reach)) + 2
    start = np.floor(c - reach).astype(np.int64)
    start = np.clip(start, 0, max(n_nodes - taps, 0))
    taps = min(taps, n_nodes)
    v = start[:, None] + np.arange(taps)[None, :]  # node of each tap
    cc = c[:, None]
    # Left piece of node v's basis: ramp on [v-1, v] (constant 1 on [-0.5, 0] for the first node).
    a_l = np.where(v == 0, -0.5, v - 1.0)
    alpha_l = np.where(v == 0, 1.0, 1.0 - v)
    beta_l = np.where(v == 0, 0.0, 1.0)
    # Right piece: ramp down on [v, v+1] (constant 1 on [n-1, n-0.5] for the last node).
    last = v == n_nodes - 1
    b_r = np.where(last, n_nodes - 0.5, v + 1.0)
    alpha_r = np.where(last, 1.0, v + 1.0)
    beta_r = np.where(last, 0.0, -1.0)
    vf = v.astype(float)
    p0a, p1a = _cdf_moments(a_l - cc, kind, width)
    p0b, p1b = _cdf_moments(vf - cc, kind, width)
    p0c, p1c = _cdf_moments(b_r - cc, kind, width)
    w = (alpha_l + beta_l * cc) * (p0b - p0a) + beta_l * (p1b - p1a)
    w += (alpha_r + beta_r * cc) * (p0c - p0b) + beta_r * (p1c - p1b)
    w = np.maximum(w, 0.0)
    # Keep the truncated PSF support (the analytic tails beyond the cutoff are dropped) ...
    if kind == "gaussian":
        far = np.abs(vf - cc) > GAUSSIAN_CUTOFF_SIGMAS * width + 1.0
        w[far] = 0.0
    inside = (c >= -0.5) & (c <= n_nodes - 0.5)
    total = w.sum(axis=1)
    ok = inside & (total > 1e-12)
    # ... and normalise over the part inside the lattice: A 1 = 1.
    w = np.where(ok[:, None], w / np.where(ok, total, 1.0)[:, None], 0.0)
    return start, w


class Banded:
    """An (m x n) matrix whose rows have contiguous support, applied along one axis of a 3-D array by
    blocked matrix products (a few BLAS calls; cost ~ rows x (block + taps) instead of rows x n)."""

    def __init__(self, dense):
        self._dense = np.asarray(dense, dtype=np.float64)
        self.shape = self._dense.shape
        self._cast = {}

    @classmethod
    def from_rows(cls, start, weights, n_cols):
        """From per-row weights ``weights[r, t]`` of columns ``start[r] + t``."""
        m, taps = weights.shape
        dense = np.zeros((m, int(n_cols)))
        if m and taps:
            rows = np.repeat(np.arange(m), taps)
            cols = (start[:, None] + np.arange(taps)[None, :]).ravel()
            np.add.at(dense, (rows, cols), weights.ravel())
        return cls(dense)

    @classmethod
    def from_psf(cls, positions, n_nodes, kind, width):
        """PSF rows of :func:`psf_rows`."""
        start, w = psf_rows(positions, n_nodes, kind, width)
        return cls.from_rows(start, w, n_nodes)

    def dense(self):
        """The matrix as a float64 array."""
        return self._dense.copy()

    def gram(self):
        """``M^T M`` as a Banded (n x n)."""
        d = self._dense
        return Banded(d.T @ d)

    def blocks(self, transpose, dtype, axis=0):
        """Row blocks ``(r0, r1, c0, c1, block)`` of M (or M^T) in ``dtype``, sized for products along
        ``axis`` (``_BLOCK_ROWS_BY_AXIS``); built once per combination."""
        n_out, n_in = self.shape[::-1] if transpose else self.shape
        rows = _BLOCK_ROWS_BY_AXIS[min(axis, 2)]
        if axis >= 2 and n_out >= 2 * n_in:
            rows = max(n_out, 1)
        key = (transpose, np.dtype(dtype), rows)
        if key not in self._cast:
            d = self._dense.T if transpose else self._dense
            self._cast[key] = [(r0, r1, c0, c1, b.astype(dtype)) for r0, r1, c0, c1, b in _row_blocks(d, rows)]
        return self._cast[key]

    def apply(self, x, axis, transpose=False, out=None, accumulate=False, workers=None):
        """``M @ x`` (or ``M.T @ x``) contracted along ``axis`` of the 3-D array ``x``.

        The result goes to a new array, or to ``out`` (C-contiguous, of the result's shape and x's dtype;
        added to it when ``accumulate``). ``workers`` (:class:`parallel.Workers`) splits the product
        over the axes it does not contract, in disjoint output pieces.
        """
        m = self.shape[1] if transpose else self.shape[0]
        shape = list(x.shape)
        shape[axis] = m
        if out is None:
            out = np.empty(shape, dtype=x.dtype)
            accumulate = False
        elif tuple(out.shape) != tuple(shape) or out.dtype != x.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {x.dtype} array of shape {tuple(shape)}")
        blocks = self.blocks(transpose, x.dtype, axis)
        workers = workers_or_serial(workers)
        x = np.ascontiguousarray(x)
        if axis == 0:
            x2 = x.reshape(x.shape[0], -1)
            o2 = out.reshape(m, -1)
            workers.ranges(lambda lo, hi: _blocks_left(blocks, x2[:, lo:hi], o2[:, lo:hi], m, accumulate),
                           x2.shape[1], 4096)
        elif axis == 1:
            workers.ranges(lambda lo, hi: _blocks_batched(blocks, x[lo:hi], out[lo:hi], m, accumulate), x.shape[0])
        else:
            # One BLAS call per block over all rows of the array seen as 2-D (batched 3-D calls are slow).
            x2 = x.reshape(-1, x.shape[2])
            o2 = out.reshape(-1, m)
            workers.ranges(lambda lo, hi: _blocks_right(blocks, x2[lo:hi], o2[lo:hi], m, accumulate),
                           x2.shape[0], 256)
        return out


def _uncovered(blocks, m):
    """Output rows no block writes (all-zero rows of the matrix), as (start, stop) ranges."""
    gaps, r = [], 0
    for r0, r1, _, _, _ in blocks:
        if r0 > r:
            gaps.append((r, r0))
        r = r1
    if r < m:
        gaps.append((r, m))
    return gaps


def _blocks_left(blocks, x2, o2, m, accumulate):
    """o2 (=|+=) B @ x2 by row blocks; x2, o2 2-D (rows along the contracted axis)."""
    if not accumulate:
        for r0, r1 in _uncovered(blocks, m):
            o2[r0:r1] = 0
    for r0, r1, c0, c1, b in blocks:
        if accumulate:
            o2[r0:r1] += b @ x2[c0:c1]
        else:
            np.matmul(b, x2[c0:c1], out=o2[r0:r1])


def _blocks_batched(blocks, x, o, m, accumulate):
    """The same along axis 1 of 3-D arrays (a batch of products along axis 0)."""
    if not accumulate:
        for r0, r1 in _uncovered(blocks, m):
            o[:, r0:r1] = 0
    for r0, r1, c0, c1, b in blocks:
        if accumulate:
            o[:, r0:r1] += np.matmul(b, x[:, c0:c1, :])
        else:
            np.matmul(b, x[:, c0:c1, :], out=o[:, r0:r1, :])


def _blocks_right(blocks, x2, o2, m, accumulate):
    """o2 (=|+=) x2 @ B^T by row blocks of B; x2, o2 2-D (columns along the contracted axis)."""
    if not accumulate:
        for r0, r1 in _uncovered(blocks, m):
            o2[:, r0:r1] = 0
    for r0, r1, c0, c1, b in blocks:
        if accumulate:
            o2[:, r0:r1] += x2[:, c0:c1] @ b.T
        else:
            np.matmul(x2[:, c0:c1], b.T, out=o2[:, r0:r1])


class GaussianBlur:
    """A sampled Gaussian filter of ``sigma_mm`` along each axis of arrays of ``shape`` (taps to 3 sigma,
    rows renormalised at the borders), applied slab by slab along axis 0 so that all three 1-D passes of
    a slab happen in cache: :meth:`rows` gives any range of filtered rows (callers fuse their own work on
    them, see ``solvers.huber_weights``), :meth:`__call__` the whole filtered array.
    """

    # Filtered rows per slab: large enough that the halo re-read along axis 0 stays small.
    SLAB_ROWS = 8

    def __init__(self, shape, spacing_kji, sigma_mm):
        self.shape = tuple(int(v) for v in shape)
        self.mats = []
        self.half = []
        for n, h in zip(self.shape, spacing_kji):
            s = float(sigma_mm) / float(h)
            if n < 2 or not s > 0:
                self.mats.append(None)
                self.half.append(0)
                continue
            half = int(math.ceil(GAUSSIAN_CUTOFF_SIGMAS * s))
            d = np.arange(n)[:, None] - np.arange(n)[None, :]
            w = np.where(np.abs(d) <= half, np.exp(-0.5 * (d / s) ** 2), 0.0)
            self.mats.append(w / w.sum(axis=1, keepdims=True))
            self.half.append(half)
        self._banded = [None if m is None else Banded(m) for m in self.mats]
        self._cast = {}

    def rows(self, x, r0, r1):
        """Filtered rows ``r0:r1`` (along axis 0) of ``x``, a new array of x's dtype."""
        nk = self.shape[0]
        dt = x.dtype
        if self.mats[0] is None:
            a = np.array(x[r0:r1], dtype=dt)
        else:
            a0, a1 = max(0, r0 - self.half[0]), min(nk, r1 + self.half[0])
            key = np.dtype(dt)
            if key not in self._cast:
                self._cast[key] = self.mats[0].astype(dt)
            m = self._cast[key][r0:r1, a0:a1]
            src = np.ascontiguousarray(x[a0:a1]).reshape(a1 - a0, -1)
            a = (m @ src).reshape((r1 - r0,) + self.shape[1:])
        for axis in (1, 2):
            if self._banded[axis] is not None:
                a = self._banded[axis].apply(a, axis)
        return a

    def __call__(self, x, workers=None):
        """The whole filtered array (x's dtype)."""
        out = np.empty(self.shape, dtype=x.dtype)

        def slab(k0, k1):
            out[k0:k1] = self.rows(x, k0, k1)

        row_slabs(workers, self.shape, slab, min_rows=self.SLAB_ROWS)
        return out


def gaussian_blur(x, spacing_kji, sigma_mm, workers=None):
    """``x`` (3-D) filtered by a sampled Gaussian of ``sigma_mm`` along each axis (taps to 3 sigma, rows
    renormalised at the borders); a new array of x's dtype. See :class:`GaussianBlur`."""
    return GaussianBlur(np.shape(x), spacing_kji, sigma_mm)(np.asarray(x), workers)


def _row_blocks(dense, rows):
    """Split a dense matrix into blocks of ``rows`` rows, each with the column range its rows touch."""
    m = dense.shape[0]
    blocks = []
    nz = dense != 0
    for r0 in range(0, m, rows):
        r1 = min(r0 + rows, m)
        cols = np.nonzero(nz[r0:r1].any(axis=0))[0]
        if len(cols) == 0:
            continue
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        blocks.append((r0, r1, c0, c1, np.ascontiguousarray(dense[r0:r1, c0:c1])))
    return blocks


# --------------------------------------------------------------------------------------- geometry helpers
def _stack_frame(stack):
    """Patient-space unit axes (row, column, normal) of a stack after its registration transform, the
    patient position of pixel (0, 0, 0) of slice 0, and each slice origin in that frame, shape (nk, 3)."""
    r = stack.transform[:3, :3]
    axes = np.stack([r @ stack.row_direction, r @ stack.column_direction, r @ stack.normal], axis=1)
    # A rigid registration keeps these orthonormal; re-orthonormalise against round-off (QR keeps signs).
    q, rr = np.linalg.qr(axes)
    q = q * np.sign(np.diag(rr))[None, :]
    p0 = stack.index_to_physical(0.0, 0.0, 0.0)
    origins = stack.index_to_physical(np.arange(stack.shape[0], dtype=float), 0.0, 0.0)
    return q, p0, (origins - p0) @ q


def _grid_axes(grid):
    """Unit vectors of grid array axes 0, 1, 2 (k, j, i) in LPS, as columns."""
    d = grid.direction_matrix
    return np.stack([d[:, 2], d[:, 1], d[:, 0]], axis=1)


def _grid_spacing_kji(grid):
    return np.asarray(grid.spacing_mm, dtype=float)[::-1]


def _spacing_along(grid, direction):
    """Grid sampling distance along a direction: 1 / ||(e . axis_a / h_a)_a||."""
    e = _grid_axes(grid).T @ np.asarray(direction, float)
    return 1.0 / float(np.linalg.norm(e / _grid_spacing_kji(grid)))


def _fov_mm(stack):
    c = stack.corners_mm()
    return float(np.linalg.norm(c.max(axis=0) - c.min(axis=0)))


def _parallel_axis(direction, grid, extent_mm):
    """(grid array axis, sign) when ``direction`` is parallel to a grid axis within the tolerance."""
    cos = _grid_axes(grid).T @ direction
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
    frame, _, slice_uvw = _stack_frame(stack)
    extent = _fov_mm(stack)
    found = []
    for col in (2, 1, 0):  # normal -> k, column -> j, row -> i
        hit = _parallel_axis(frame[:, col], grid, extent)
        if hit is None:
            return None
        found.append(hit[0])
    if len(set(found)) != 3:
        return None
    drift = np.abs(slice_uvw[:, :2]).max() if len(slice_uvw) else 0.0
    if drift > PARALLEL_TOLERANCE_VOXELS * float(np.min(grid.spacing_mm)):
        return None
    return tuple(found)


def _index_box_mask(k, j, i, shape):
    """Points whose continuous stack indices lie inside the sampled box [-0.5, n - 0.5)^3 (half-open, as
    ITK decides "inside" when resampling, so the coverage equals the average fusion's)."""
    nk, nj, ni = shape
    return (k >= -0.5) & (k < nk - 0.5) & (j >= -0.5) & (j < nj - 0.5) & (i >= -0.5) & (i < ni - 0.5)


class Scratch:
    """Reusable work memory: arrays by slot number (:meth:`array`, for the operators' intermediates) and
    a pool of grid-sized arrays handed back and forth (:meth:`take`, :meth:`give`, for the solver's
    vectors).

    A large array freshly allocated is backed by new pages the kernel must fault in and zero on first
    touch, one thread at a time: writing a 46 MB result into fresh memory took 17 ms against 12 ms into a
    reused array, and with two threads 17 against 7 ms. Not for concurrent use of the same slot.
    """

    def __init__(self):
        self._flat = {}
        self._free = []

    def array(self, slot, shape, dtype):
        """A C-contiguous array of ``shape`` and ``dtype`` (uninitialised) in slot ``slot``; the slot's
        memory grows as needed and is reused otherwise (earlier arrays of the slot are overwritten)."""
        n = int(np.prod(shape))
        key = (slot, np.dtype(dtype))
        buf = self._flat.get(key)
        if buf is None or buf.size < n:
            self._flat.pop(key, None)
            buf = np.empty(n, dtype=dtype)
            self._flat[key] = buf
        return buf[:n].reshape(shape)

    def clear(self):
        """Free the memory."""
        self._flat.clear()
        self._free = []

    def take(self, shape, dtype):
        """A grid-sized array (uninitialised) from the arrays given back with :meth:`give`, or a new one.

        The solver passes whole volumes around this way (directions, weights), so that an array it is done
        with becomes the next one it needs instead of fresh memory: the number of live arrays (the peak
        memory) stays the same."""
        free = self._free
        for n, a in enumerate(free):
            if a.shape == tuple(shape) and a.dtype == np.dtype(dtype):
                return free.pop(n)
        return np.empty(shape, dtype=dtype)

    def give(self, array):
        """Hand back an array from :meth:`take` (or any C-contiguous one) for reuse; the caller must not
        use it afterwards."""
        if array is not None and array.flags.c_contiguous and array.flags.owndata:
            self._free.append(array)


# ------------------------------------------------------------------------------------------ base class
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
        a new array. ``scratch`` (:class:`Scratch`) lends reusable intermediate arrays."""
        y = self.forward(x, workers=workers)
        if scale != 1.0:
            y *= y.dtype.type(scale)
        if out is None:
            return self.adjoint(y, workers)
        if not accumulate:
            out[...] = 0
        return self.adjoint_add(y, out, workers, scratch)

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
        per = max(1, _CHUNK_NODES // max(nj * ni, 1))
        for k0 in range(0, nk, per):
            k1 = min(nk, k0 + per)
            pts = self.grid.slab_points(k0, k1)
            out[k0:k1] = _index_box_mask(*self.stack.physical_to_index(pts), self.shape)
        return out

    @staticmethod
    def _dtype(x):
        return np.float64 if np.asarray(x).dtype == np.float64 else np.float32

    def describe(self):
        """A small dict for logs and ``info``."""
        return {"path": self.path, "psf": self.psf, "valid_samples": int(np.count_nonzero(self.valid))}


# ------------------------------------------------------------------------------------- separable path
class SeparableOperator(StackOperator):
    """Tensor product of three 1-D banded PSF matrices, one per grid axis (see module docstring)."""

    path = "separable"

    def __init__(self, stack, grid, psf="gaussian", axes=None):
        super().__init__(stack, grid, psf)
        axes = separable_axes(stack, grid) if axes is None else axes
        if axes is None:
            raise InputError(f"'{stack.description}' is not aligned with the grid; it needs the general path")
        self.axes = tuple(axes)  # grid array axis of stack axes k, j, i
        sig_i, sig_j, sig_n = psf_sigma_mm(stack, psf)
        widths_mm = (sig_n, sig_j, sig_i)
        kinds = (psf, "gaussian", "gaussian")
        h = _grid_spacing_kji(grid)
        nk, nj, ni = self.shape
        # Sample centres along each grid axis, in grid index units, taken through the stack's middle
        # (errors from the tolerated misalignment are then at most half the tolerance).
        kc, jc, ic = (nk - 1) / 2.0, (nj - 1) / 2.0, (ni - 1) / 2.0
        lines = (
            stack.index_to_physical(np.arange(nk, dtype=float), jc, ic),
            stack.index_to_physical(kc, np.arange(nj, dtype=float), ic),
            stack.index_to_physical(kc, jc, np.arange(ni, dtype=float)),
        )
        self.mats, self.ranges = [], []
        for s in range(3):
            g = self.axes[s]
            pos = np.stack(grid.physical_to_index(lines[s]), axis=-1)[:, g]
            inside = np.nonzero((pos >= -0.5) & (pos <= grid.shape[g] - 0.5))[0]
            lo, hi = (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)
            self.ranges.append((lo, hi))
            self.mats.append(Banded.from_psf(pos[lo:hi], grid.shape[g], kinds[s], widths_mm[s] / h[g]))
        # Apply the most reducing axis first (smallest intermediate arrays), undo in reverse.
        ratios = [(hi - lo) / max(grid.shape[self.axes[s]], 1) for s, (lo, hi) in enumerate(self.ranges)]
        self.order = sorted(range(3), key=lambda s: ratios[s])
        self.empty = any(hi <= lo for lo, hi in self.ranges)
        # A^T A = tensor product of the per-axis Gram matrices M^T M. Axes the stack samples more
        # coarsely than the grid (through-plane) are cheaper as M then M^T (the array shrinks in between);
        # the others as their Gram matrix, applied to the shrunken array.
        self._reduce = [s for s in self.order if ratios[s] < _REDUCE_RATIO]
        self._grams = {s: self.mats[s].gram() for s in self.order if s not in self._reduce}

    @property
    def crop(self):
        return tuple(slice(lo, hi) for lo, hi in self.ranges)

    @property
    def valid(self):
        m = np.zeros(self.shape, dtype=bool)
        m[self.crop] = True
        return m

    def forward_cropped(self, x, workers=None):
        """Simulated samples inside the valid box only, stack axis order."""
        a = np.asarray(x, dtype=self._dtype(x))
        for s in self.order:
            a = self.mats[s].apply(a, self.axes[s], workers=workers)
        return np.transpose(a, self.axes)

    def adjoint_cropped(self, yc, workers=None):
        """Transpose of :meth:`forward_cropped`."""
        inv = [0, 0, 0]
        for s, g in enumerate(self.axes):
            inv[g] = s
        a = np.transpose(np.asarray(yc, dtype=self._dtype(yc)), inv)
        for s in reversed(self.order):
            a = self.mats[s].apply(a, self.axes[s], transpose=True, workers=workers)
        return a

    def forward(self, x, workers=None):
        dt = self._dtype(x)
        y = np.zeros(self.shape, dtype=dt)
        if not self.empty:
            y[self.crop] = self.forward_cropped(x, workers)
        return y

    def adjoint(self, y, workers=None):
        if self.empty:
            return np.zeros(self.grid_shape, dtype=self._dtype(y))
        return self.adjoint_cropped(np.asarray(y)[self.crop], workers)

    def adjoint_add(self, y, out, workers=None, scratch=None):
        if self.empty:
            return out
        dt = out.dtype.type
        inv = [0, 0, 0]
        for s, g in enumerate(self.axes):
            inv[g] = s
        a = np.transpose(np.asarray(np.asarray(y)[self.crop], dtype=dt), inv)
        steps = list(reversed(self.order))
        for n, s in enumerate(steps):
            mat = self.mats[s]
            if n == len(steps) - 1:
                mat.apply(a, self.axes[s], transpose=True, out=out, accumulate=True, workers=workers)
                break
            target = None
            if scratch is not None:
                shape = list(a.shape)
                shape[self.axes[s]] = mat.shape[1]
                target = scratch.array(n % 2, shape, dt)
            a = mat.apply(a, self.axes[s], transpose=True, out=target, workers=workers)
        return out

    def normal(self, x, out=None, scale=1.0, workers=None, scratch=None, accumulate=True):
        dt = self._dtype(x)
        if self.empty:
            if out is None:
                return np.zeros(self.grid_shape, dtype=dt)
            if not accumulate:
                out[...] = 0
            return out
        steps = [(self.mats[s], s, False) for s in self._reduce]
        steps += [(gram, s, False) for s, gram in self._grams.items()]
        steps += [(self.mats[s], s, True) for s in reversed(self._reduce)]
        a = np.asarray(x, dtype=dt)
        for n, (mat, s, transpose) in enumerate(steps):
            last = n == len(steps) - 1
            if last and scale != 1.0:
                # on the smallest intermediate (after the reducing axes), not on the full result
                a = a * dt(scale) if a is x else np.multiply(a, dt(scale), out=a)
            if last:
                target = out
            elif scratch is not None:
                shape = list(a.shape)
                shape[self.axes[s]] = mat.shape[1] if transpose else mat.shape[0]
                target = scratch.array(n % 2, shape, dt)  # ping-pong between two work arrays
            else:
                target = None
            a = mat.apply(a, self.axes[s], transpose, out=target, accumulate=last and out is not None and accumulate,
                          workers=workers)
        return a

    def adjoint_ones(self, out=None, scale=1.0, workers=None):
        if out is None:
            out = np.zeros(self.grid_shape, dtype=np.float32)
        if self.empty:
            return out
        # A^T 1 is the outer product of the column sums of the three 1-D matrices.
        cols = [None, None, None]
        for s in range(3):
            cols[self.axes[s]] = self.mats[s].dense().sum(axis=0)
        cols[0] = cols[0] * scale
        plane = (cols[1][:, None] * cols[2][None, :]).astype(np.float32)
        col0 = cols[0].astype(np.float32)

        def slab(k0, k1):
            out[k0:k1] += col0[k0:k1, None, None] * plane[None]

        row_slabs(workers, out.shape, slab)
        return out

    def coverage(self):
        masks = []
        for s in range(3):
            g = self.axes[s]
            idx = np.arange(self.grid_shape[g], dtype=float)
            # Grid line through the grid centre along axis g; only the stack index s matters.
            centre = [(n - 1) / 2.0 for n in self.grid_shape]
            pts = [idx if a == g else np.full_like(idx, centre[a]) for a in range(3)]
            kji = self.stack.physical_to_index(self.grid.index_to_physical(*pts))
            n = self.shape[s]
            masks.append((kji[s] >= -0.5) & (kji[s] < n - 0.5))
        out = np.ones(self.grid_shape, dtype=bool)
        for s in range(3):
            shape = [1, 1, 1]
            shape[self.axes[s]] = -1
            out &= masks[s].reshape(shape)
        return out


# ----------------------------------------------------------------------------------------- general path
class _Lattice:
    """A regular lattice in the stack frame: node (r, q, p) of axes (w, v, u) sits at
    ``p0 + (u0 + p hu) e_u + (v0 + q hv) e_v + (w0 + r hw) e_w`` (patient mm)."""

    def __init__(self, p0, frame, starts, steps, sizes):
        self.p0 = p0
        self.frame = frame  # columns e_u, e_v, e_w
        self.starts = np.asarray(starts, float)  # (u0, v0, w0)
        self.steps = np.asarray(steps, float)  # (hu, hv, hw); negative allowed (shared axis flip)
        self.sizes = tuple(int(v) for v in sizes)  # (nu, nv, nw)

    @property
    def shape(self):
        """Array shape, canonical order (w, v, u)."""
        return self.sizes[2], self.sizes[1], self.sizes[0]

    def index_affine(self, grid):
        """(g0, D): grid continuous indices (k, j, i) of node (r, q, p) = g0 + D @ (r, q, p)."""
        inv = np.linalg.inv(grid.index_to_lps_affine)
        lin = inv[:3, :3] @ (self.frame * self.steps[None, :])  # columns: per-step along u, v, w in (i, j, k)
        g0 = inv[:3, :3] @ (self.p0 + self.frame @ self.starts) + inv[:3, 3]
        # to (k, j, i) rows and (w, v, u) columns
        lin = lin[::-1, ::-1]
        return g0[::-1].copy(), lin.copy()


def _axis_nodes(lo, hi, step):
    """Integer node range [a, b] with a*step <= lo and b*step >= hi (step > 0)."""
    return int(math.floor(lo / step)), int(math.ceil(hi / step))


class GeneralOperator(StackOperator):
    """Interpolation onto a stack-aligned lattice, then 1-D PSF/sampling matrices (module docstring)."""

    path = "general"

    def __init__(self, stack, grid, psf="gaussian", shared_axis="auto"):
        super().__init__(stack, grid, psf)
        frame, p0, slice_uvw = _stack_frame(stack)
        sig_i, sig_j, sig_n = psf_sigma_mm(stack, psf)
        di, dj = stack.pixel_spacing_mm
        nk, nj, ni = self.shape
        reach = [
            GAUSSIAN_CUTOFF_SIGMAS * sig_i,
            GAUSSIAN_CUTOFF_SIGMAS * sig_j,
            GAUSSIAN_CUTOFF_SIGMAS * sig_n if psf == "gaussian" else 0.5 * sig_n,
        ]
        # Extent of the grid box (voxel edges) in the stack frame, to clip the lattice.
        gk, gj, gi = self.grid_shape
        cs = np.array(np.meshgrid([-0.5, gk - 0.5], [-0.5, gj - 0.5], [-0.5, gi - 0.5], indexing="ij"))
        corners = grid.index_to_physical(cs[0].ravel(), cs[1].ravel(), cs[2].ravel())
        grid_uvw = (corners - p0) @ frame
        # Sample coordinates in the frame: u = du_k + i di, v = dv_k + j dj, w = w_k.
        du, dv, w_k = slice_uvw[:, 0], slice_uvw[:, 1], slice_uvw[:, 2]
        samp_lo = np.array([du.min(), dv.min(), w_k.min()])
        samp_hi = np.array([du.max() + (ni - 1) * di, dv.max() + (nj - 1) * dj, w_k.max()])
        # Lattice spacing: no coarser than the grid along that direction (every voxel reaches the
        # lattice), in-plane an integer fraction of the pixel spacing, through-plane ~ sigma.
        g_along = [_spacing_along(grid, frame[:, a]) for a in range(3)]
        steps = []
        for a, pix in ((0, di), (1, dj)):
            steps.append(pix / math.ceil(pix / (1.25 * g_along[a]) - 1e-9))
        sig_w = sig_n if psf == "gaussian" else sig_n / 3.0
        steps.append(min(g_along[2], max(sig_w, 0.5 * g_along[2])))
        steps = self._lattice_steps(steps, frame)
        # Shared axis: a stack axis parallel to a grid axis takes that axis's grid nodes as lattice nodes.
        self.shared = None
        if shared_axis == "auto":
            extent = _fov_mm(stack)
            for a in (0, 1, 2):
                hit = _parallel_axis(frame[:, a], grid, extent)
                if hit is not None:
                    self.shared = (a, hit[0], hit[1])
                    break
        elif shared_axis is not None:
            raise ValueError("shared_axis must be 'auto' or None")
        starts, sizes = [], []
        for a in range(3):
            if self.shared is not None and self.shared[0] == a:
                _, g, sign = self.shared
                # Node p along a is grid node p along g: coordinate c(p) = c0 + sign * h_g * p.
                c0 = float((grid.index_to_physical(0.0, 0.0, 0.0) - p0) @ frame[:, a])
                steps[a] = sign * float(_grid_spacing_kji(grid)[g])
                starts.append(c0)
                sizes.append(self.grid_shape[g])
                continue
            lo = max(samp_lo[a] - reach[a], grid_uvw[:, a].min()) - abs(steps[a])
            hi = min(samp_hi[a] + reach[a], grid_uvw[:, a].max()) + abs(steps[a])
            if hi < lo:
                hi = lo
            n0, n1 = _axis_nodes(lo, hi, steps[a])
            starts.append(n0 * steps[a])
            sizes.append(n1 - n0 + 1)
        self.lattice = self._adjust_lattice(_Lattice(p0, frame, starts, steps, sizes))
        # Valid samples: pixel centre inside the grid box.
        valid = np.zeros(self.shape, dtype=bool)
        jj, ii = np.meshgrid(np.arange(nj, dtype=float), np.arange(ni, dtype=float), indexing="ij")
        for k in range(nk):
            pts = stack.index_to_physical(float(k), jj, ii)
            g = np.stack(grid.physical_to_index(pts), axis=0)
            valid[k] = np.all((g >= -0.5) & (g <= np.asarray(self.grid_shape)[:, None, None] - 0.5), axis=0)
        self._valid = valid
        # 1-D matrices in lattice index units. Through-plane (w): one matrix for all columns.
        st, sz = self.lattice.starts, self.lattice.sizes
        sp = self.lattice.steps
        self.m_w = Banded.from_psf((w_k - st[2]) / sp[2], sz[2], psf, sig_n / abs(sp[2]))
        # In-plane: one matrix per slice when slices drift (shear), else one for all.
        self.m_v = self._inplane(dv, np.arange(nj) * dj, st[1], sp[1], sz[1], sig_j)
        self.m_u = self._inplane(du, np.arange(ni) * di, st[0], sp[0], sz[0], sig_i)
        self._interp = self._make_interp()
        # Normalisation: each valid sample's weights over the valid lattice nodes sum to 1.
        self._w_cache = {}
        mass = self._raw_forward(np.ones(self.grid_shape, dtype=np.float32))
        ok = valid & (mass > 1e-6)
        self._valid = ok
        self._scale = np.where(ok, 1.0 / np.where(ok, mass, 1.0), 0.0).astype(np.float32)
        self._scale64 = None

    def _lattice_steps(self, steps, frame):
        """Lattice node spacing (mm) along the frame axes u, v, w; subclasses choose other lattices."""
        return steps

    def _adjust_lattice(self, lattice):
        """Hook for subclasses that need the lattice moved (it only has to cover the samples' PSF support)."""
        return lattice

    def _make_interp(self):
        """The grid -> lattice interpolation (protocol of :class:`_SharedAxisInterp`)."""
        if self.shared:
            return _SharedAxisInterp(self.lattice, self.grid, self.shared)
        return _TrilinearInterp(self.lattice, self.grid)

    def coverage(self):
        if not self.stack.is_regular or self.shape[0] < 2:
            return super().coverage()
        # Regular (possibly sheared) stack: one affine maps grid indices to stack indices.
        to_stack = np.linalg.inv(self.stack.ijk_to_lps_affine()) @ self.grid.index_to_lps_affine
        out = np.zeros(self.grid_shape, dtype=bool)
        nk, nj, ni = self.grid_shape
        jj, ii = np.meshgrid(np.arange(nj, dtype=np.float32), np.arange(ni, dtype=np.float32), indexing="ij")
        n_stack = (self.shape[2], self.shape[1], self.shape[0])  # along stack i, j, k
        for k in range(nk):
            inside = np.ones((nj, ni), dtype=bool)
            for row in range(3):
                m = to_stack[row].astype(np.float32)
                c = m[0] * ii + m[1] * jj + (m[2] * k + m[3])
                inside &= (c >= -0.5) & (c < n_stack[row] - 0.5)
            out[k] = inside
        return out

    def _inplane(self, drift, pix, start, step, n, sigma):
        if np.ptp(drift) <= 1e-6 * abs(step):
            return Banded.from_psf((drift[0] + pix - start) / step, n, "gaussian", sigma / abs(step))
        return [Banded.from_psf((d + pix - start) / step, n, "gaussian", sigma / abs(step)) for d in drift]

    @property
    def valid(self):
        return self._valid

    def describe(self):
        d = super().describe()
        d["lattice_shape"] = [int(v) for v in self.lattice.shape]
        d["interpolation"] = "bilinear, shared axis" if self.shared else "trilinear"
        d["sheared"] = isinstance(self.m_v, list) or isinstance(self.m_u, list)
        return d

    def _scale_for(self, dt):
        if dt == np.float64:
            if self._scale64 is None:
                self._scale64 = self._scale.astype(np.float64)
            return self._scale64
        return self._scale

    # lattice (w, v, u) <-> stack (k, j, i)
    def _lattice_to_slices(self, z1, workers=None):
        """z1: (nk, nv, nu) -> (nk, nj, ni): in-plane PSF + sampling, per slice when sheared."""
        nk = z1.shape[0]
        if not isinstance(self.m_v, list) and not isinstance(self.m_u, list):
            a = self.m_v.apply(z1, 1, workers=workers)
            return self.m_u.apply(a, 2, workers=workers)
        out = np.empty((nk,) + self.shape[1:], dtype=z1.dtype)

        def slices(k0, k1):
            for k in range(k0, k1):
                mv = self.m_v[k] if isinstance(self.m_v, list) else self.m_v
                mu = self.m_u[k] if isinstance(self.m_u, list) else self.m_u
                out[k : k + 1] = mu.apply(mv.apply(z1[k : k + 1], 1), 2)

        workers_or_serial(workers).ranges(slices, nk)
        return out

    def _slices_to_lattice(self, y, workers=None):
        nk = y.shape[0]
        if not isinstance(self.m_v, list) and not isinstance(self.m_u, list):
            a = self.m_u.apply(y, 2, transpose=True, workers=workers)
            return self.m_v.apply(a, 1, transpose=True, workers=workers)
        out = np.empty((nk, self.lattice.shape[1], self.lattice.shape[2]), dtype=y.dtype)

        def slices(k0, k1):
            for k in range(k0, k1):
                mv = self.m_v[k] if isinstance(self.m_v, list) else self.m_v
                mu = self.m_u[k] if isinstance(self.m_u, list) else self.m_u
                out[k : k + 1] = mv.apply(mu.apply(y[k : k + 1], 2, transpose=True), 1, transpose=True)

        workers_or_serial(workers).ranges(slices, nk)
        return out

    def _raw_forward(self, x, workers=None):
        dt = x.dtype
        nw, nv, nu = self.lattice.shape
        z1 = np.zeros((self.shape[0], nv, nu), dtype=dt)
        name = self._interp.name
        for ci, chunk in self._interp.forward_chunks(x, workers):
            r0, r1 = self._interp.ranges[ci]
            if name == "w":
                nz = chunk.shape[0]
                cols = self._w_dense(dt)[:, r0:r1]
                z1 += (cols @ np.ascontiguousarray(chunk).reshape(nz, -1)).reshape(z1.shape)
            else:
                z1[_canonical_index(name, r0, r1)] = self.m_w.apply(chunk, 0, workers=workers)
        return self._lattice_to_slices(z1, workers)

    def _w_dense(self, dt):
        key = np.dtype(dt)
        if key not in self._w_cache:
            self._w_cache[key] = self.m_w.dense().astype(dt)
        return self._w_cache[key]

    def _raw_adjoint(self, y, workers=None, out=None):
        dt = y.dtype
        z1 = self._slices_to_lattice(y, workers)
        name = self._interp.name
        nk = z1.shape[0]

        def chunks():
            for ci, (r0, r1) in enumerate(self._interp.ranges):
                if name == "w":
                    cols = self._w_dense(dt)[:, r0:r1]
                    yield ci, (cols.T @ z1.reshape(nk, -1)).reshape((r1 - r0,) + z1.shape[1:])
                else:
                    yield ci, self.m_w.apply(z1[_canonical_index(name, r0, r1)], 0, transpose=True, workers=workers)

        return self._interp.adjoint_chunks(chunks(), dt, workers, out)

    def forward(self, x, workers=None):
        x = np.asarray(x, dtype=self._dtype(x))
        y = self._raw_forward(x, workers)
        y *= self._scale_for(x.dtype)
        return y

    def adjoint(self, y, workers=None):
        dt = self._dtype(y)
        y = np.asarray(y, dtype=dt) * self._scale_for(dt)
        return self._raw_adjoint(y, workers)

    def adjoint_add(self, y, out, workers=None, scratch=None):
        dt = out.dtype.type
        y = np.asarray(y, dtype=dt) * self._scale_for(np.dtype(dt))
        if not out.flags.c_contiguous:
            out += self._raw_adjoint(y, workers)
            return out
        return self._raw_adjoint(y, workers, out)



def _canonical_index(name, r0, r1):
    """Index of lattice chunk [r0, r1) along axis ``name`` of an array in canonical (w, v, u) order."""
    sl = slice(r0, r1)
    return {"w": (sl,), "v": (slice(None), sl), "u": (slice(None), slice(None), sl)}[name]


class _SharedAxisInterp:
    """Bilinear interpolation in the plane orthogonal to a shared axis, vectorised along it.

    Lattice axis ``a`` (0=u, 1=v, 2=w) uses the nodes of grid array axis ``g``; the other two lattice axes
    are interpolated bilinearly from the other two grid axes, with the same weights for every node along
    ``g``: each tap gathers whole rows of the grid seen as (plane nodes, shared axis). The transpose
    gathers the same rows back, sorted by target plane node, and sums them per target
    (``np.add.reduceat``).

    Protocol shared with :class:`_TrilinearInterp`: ``name`` (lattice axis the chunks split: "w", "v"
    or "u"), ``ranges`` (node ranges of the chunks), ``forward_chunks(x, workers)`` yielding ``(chunk
    number, lattice chunk in canonical (w, v, u) order)``, ``adjoint_chunks(pairs, dtype, workers)`` -> grid
    array.
    """

    def __init__(self, lattice, grid, shared):
        self.grid_shape = tuple(int(v) for v in grid.shape)
        a, g, _ = shared
        self.a, self.g = a, g
        g0, lin = lattice.index_affine(grid)  # rows k, j, i; columns w, v, u
        self.plane_g = [x for x in range(3) if x != g]  # grid array axes of the plane
        self.lat_axes = [x for x in (2, 1, 0) if x != a]  # lattice axes of the plane, canonical order
        cols = [2 - x for x in self.lat_axes]  # column of ``lin`` for lattice axis x
        n_lat = [lattice.sizes[x] for x in self.lat_axes]
        # Chunk along the plane axis that is not w (w chunks would need column slices of M_w).
        self.chunk_pos = 1 if self.lat_axes[0] == 2 else 0
        self.name = {2: "w", 1: "v", 0: "u"}[self.lat_axes[self.chunk_pos]]
        q0, q1 = np.meshgrid(np.arange(n_lat[0], dtype=float), np.arange(n_lat[1], dtype=float), indexing="ij")
        # The plane coordinates do not depend on the node along the shared axis (within tolerance);
        # take the middle one.
        base = g0 + lin[:, 2 - a] * 0.5 * (lattice.sizes[a] - 1)
        shape = [self.grid_shape[x] for x in self.plane_g]
        valid = np.ones(q0.shape, dtype=bool)
        idx, wts = [], []
        for x, n in zip(self.plane_g, shape):
            c = base[x] + lin[x, cols[0]] * q0 + lin[x, cols[1]] * q1
            valid &= (c >= -0.5) & (c <= n - 0.5)
            c = np.clip(c, 0.0, n - 1.0)
            f0 = np.clip(np.floor(c), 0, max(n - 2, 0))
            idx.append((f0.astype(np.int64), np.minimum(f0 + 1, n - 1).astype(np.int64)))
            wts.append((1.0 - (c - f0), c - f0))
        taps_i, taps_w = [], []
        for s0 in (0, 1):
            for s1 in (0, 1):
                taps_i.append(idx[0][s0] * shape[1] + idx[1][s1])
                taps_w.append(wts[0][s0] * wts[1][s1] * valid)
        self.idx = np.stack(taps_i, axis=-1)  # (n_lat0, n_lat1, 4): plane-flat grid node of each tap
        self.wts = np.stack(taps_w, axis=-1)
        n_ride = self.grid_shape[g]
        per = max(1, _CHUNK_NODES // max(n_ride * n_lat[1 - self.chunk_pos], 1))
        n_c = n_lat[self.chunk_pos]
        self.ranges = [(s, min(s + per, n_c)) for s in range(0, n_c, per)]
        # Transpose structure per chunk, as "layers": the pairs (source lattice node, target grid plane
        # node, weight) sorted by target and split by their rank among the target's pairs, so that
        # within a layer every target appears once and a fancy-indexed ``+=`` is exact.
        self.layers = []
        for r0, r1 in self.ranges:
            ii = self.idx[self._sel(r0, r1)].reshape(-1)
            ww = self.wts[self._sel(r0, r1)].reshape(-1)
            src = np.repeat(np.arange(ii.size // 4), 4)
            keep = ww != 0
            ii, ww, src = ii[keep], ww[keep], src[keep]
            order = np.argsort(ii, kind="stable")
            ii, ww, src = ii[order], ww[order], src[order]
            layers = []
            if ii.size:
                first = np.concatenate([[True], ii[1:] != ii[:-1]])
                heads = np.nonzero(first)[0]
                rank = np.arange(ii.size) - np.repeat(heads, np.diff(np.append(heads, ii.size)))
                for c in range(int(rank.max()) + 1):
                    sel = rank == c
                    layers.append((ii[sel], src[sel], ww[sel]))
            self.layers.append(layers)

    def _sel(self, r0, r1):
        return (slice(r0, r1), slice(None)) if self.chunk_pos == 0 else (slice(None), slice(r0, r1))

    def _perm(self):
        names = [self.lat_axes[0], self.lat_axes[1], self.a]  # axes of (plane0, plane1, ride) arrays
        return names

    def forward_chunks(self, x, workers=None):
        n_ride = self.grid_shape[self.g]
        workers = workers_or_serial(workers)
        x2 = np.ascontiguousarray(np.moveaxis(x, self.g, -1)).reshape(-1, n_ride)
        names = self._perm()
        to_canon = [names.index(x) for x in (2, 1, 0)]
        for ci, (r0, r1) in enumerate(self.ranges):
            ii = self.idx[self._sel(r0, r1)]
            ww = self.wts[self._sel(r0, r1)].astype(x.dtype)
            shape = ii.shape[:2]
            flat_i, flat_w = ii.reshape(-1, 4), ww.reshape(-1, 4)
            z = np.zeros((flat_i.shape[0], n_ride), dtype=x.dtype)

            def rows(lo, hi, z=z, flat_i=flat_i, flat_w=flat_w):
                buf = np.empty((hi - lo, n_ride), dtype=z.dtype)
                for t in range(4):
                    np.take(x2, flat_i[lo:hi, t], axis=0, out=buf)
                    buf *= flat_w[lo:hi, t, None]
                    z[lo:hi] += buf

            workers.ranges(rows, flat_i.shape[0], 256)
            yield ci, np.transpose(z.reshape(shape + (n_ride,)), to_canon)

    def adjoint_chunks(self, pairs, dt, workers=None, out=None):
        # serial: the fancy-indexed sums hold the GIL (two threads measured no faster)
        n_ride = self.grid_shape[self.g]
        shape = [self.grid_shape[self.plane_g[0]], self.grid_shape[self.plane_g[1]], n_ride]
        x2 = np.zeros((shape[0] * shape[1], n_ride), dtype=dt)
        names = self._perm()
        from_canon = [(2, 1, 0).index(x) for x in names]
        for ci, zc in pairs:
            if not self.layers[ci]:
                continue
            z = np.ascontiguousarray(np.transpose(zc, from_canon)).reshape(-1, n_ride)
            for targets, src, ww in self.layers[ci]:
                contrib = np.take(z, src, axis=0)
                contrib *= ww.astype(dt)[:, None]
                x2[targets] += contrib
                del contrib
        moved = np.moveaxis(x2.reshape(shape), -1, self.g)
        if out is None:
            return np.ascontiguousarray(moved)
        out += moved  # added in place: no grid-sized copy
        return out


class _TrilinearInterp:
    """Trilinear interpolation of the grid at every lattice node, computed on the fly per chunk of
    lattice planes (no stored weights); the transpose scatters each corner's contributions with
    ``np.add.at``. Same protocol as :class:`_SharedAxisInterp`."""

    def __init__(self, lattice, grid):
        self.shape = lattice.shape  # canonical (w, v, u)
        self.grid_shape = tuple(int(v) for v in grid.shape)
        self.g0, self.lin = lattice.index_affine(grid)  # rows k, j, i; columns w, v, u
        # Chunk along the lattice axis most aligned with grid axis k, so that a chunk touches few grid
        # slices (compact flat index range).
        cos_k = np.abs(self.lin[0]) / np.maximum(np.linalg.norm(self.lin, axis=0), 1e-12)
        self.axis = int(np.argmax(cos_k))
        self.name = "wvu"[self.axis]
        n_axis = self.shape[self.axis]
        per_plane = int(np.prod(self.shape)) // max(n_axis, 1)
        per = max(1, _CHUNK_NODES // max(per_plane, 1))
        self.ranges = [(s, min(s + per, n_axis)) for s in range(0, n_axis, per)]

    def _stencil(self, r0, r1):
        """Chunk shape, flat index of the lower corner of every node's cell and the per-axis weights.

        Coordinates are float32 (1e-4 voxel at 1000 voxels: far below the model's accuracy); forward and
        adjoint use this same function, so they stay exact transposes.
        """
        ar = [np.arange(n, dtype=np.float32) for n in self.shape]
        ar[self.axis] = ar[self.axis][r0:r1]
        shape = tuple(len(a) for a in ar)
        grids = np.meshgrid(*ar, indexing="ij", sparse=True)
        valid = None
        base = None
        fracs = []
        strides = (self.grid_shape[1] * self.grid_shape[2], self.grid_shape[2], 1)
        for row, n in enumerate(self.grid_shape):
            c = np.float32(self.g0[row]) + np.float32(self.lin[row, 0]) * grids[0]
            c = c + np.float32(self.lin[row, 1]) * grids[1]
            c = c + np.float32(self.lin[row, 2]) * grids[2]  # full chunk shape from here
            inside = (c >= -0.5) & (c <= n - 0.5)
            valid = inside if valid is None else (valid & inside)
            np.clip(c, 0.0, n - 1.0, out=c)
            f0 = c.astype(np.int64)  # c >= 0: truncation is floor
            np.minimum(f0, max(n - 2, 0), out=f0)
            c -= f0
            fracs.append(c)
            f0 *= strides[row]
            base = f0 if base is None else (base + f0 if base.shape != f0.shape else np.add(base, f0, out=base))
        fk, fj, fi = fracs
        # validity folded into the k weights
        wk = (np.subtract(1.0, fk, dtype=np.float32) * valid, fk * valid)
        return shape, base.reshape(-1), wk, fj, fi

    def _corners(self, wk, fj, fi):
        """(flat offset, weight) of the 8 corners, the weights as float32 arrays."""
        nj, ni = self.grid_shape[1], self.grid_shape[2]
        dk = nj * ni if self.grid_shape[0] > 1 else 0
        dj = ni if nj > 1 else 0
        di = 1 if ni > 1 else 0
        wj = (1.0 - fj, fj)
        wi = (1.0 - fi, fi)
        for a in (0, 1):
            for b in (0, 1):
                wkj = wk[a] * wj[b]
                for c in (0, 1):
                    yield a * dk + b * dj + c * di, (wkj * wi[c]).reshape(-1)

    def _sub_ranges(self, r0, r1, workers):
        """The chunk's planes ``r0:r1`` split between the workers (each computes its own stencil)."""
        return [(r0 + a, r0 + b) for a, b in split(r1 - r0, workers.n_threads)]

    def _forward_part(self, xf, a, b, dtype):
        shape, base, wk, fj, fi = self._stencil(a, b)
        z = np.zeros(base.size, dtype=dtype)
        buf = np.empty(base.size, dtype=dtype)
        idx = np.empty_like(base)
        for off, w in self._corners(wk, fj, fi):
            np.add(base, off, out=idx)
            np.take(xf, idx, out=buf)
            buf *= w
            z += buf
        return z.reshape(shape)

    def forward_chunks(self, x, workers=None):
        xf = np.ascontiguousarray(x).reshape(-1)
        workers = workers_or_serial(workers)
        for ci, (r0, r1) in enumerate(self.ranges):
            parts = workers.map(lambda ab: self._forward_part(xf, ab[0], ab[1], x.dtype),
                                self._sub_ranges(r0, r1, workers))
            yield ci, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.axis)

    def adjoint_chunks(self, pairs, dt, workers=None, out=None):
        """The transpose; added into ``out`` (grid-shaped, C-contiguous, ``dt``) when given."""
        result = np.zeros(self.grid_shape, dtype=dt) if out is None else out
        out = result.reshape(-1)  # a view: the scatter writes into ``result``
        workers = workers_or_serial(workers)
        # The scatter is ``np.add.at`` per corner (numpy >= 1.25 runs it as a fast loop: 14x faster here than
        # the earlier np.bincount over concatenated corners). It holds the GIL and the threads' pieces may
        # overlap in ``out``, so the adds take turns; the stencils and products around them run in parallel.
        lock = threading.Lock()

        def part(zc, r0, a, b):
            shape, base, wk, fj, fi = self._stencil(a, b)
            sel = [slice(None)] * 3
            sel[self.axis] = slice(a - r0, b - r0)
            zf = np.ascontiguousarray(zc[tuple(sel)], dtype=dt).reshape(-1)
            idx = np.empty_like(base)
            for off, w in self._corners(wk, fj, fi):
                contrib = np.multiply(w, zf, dtype=dt)
                np.add(base, off, out=idx)
                with lock:
                    np.add.at(out, idx, contrib)

        for ci, zc in pairs:
            r0, r1 = self.ranges[ci]
            workers.map(lambda ab, zc=zc, r0=r0: part(zc, r0, ab[0], ab[1]), self._sub_ranges(r0, r1, workers))
        return result


# ----------------------------------------------------------------------------------------------- factory
def make_operator(stack, grid, psf="gaussian", path="auto"):
    """The forward model of ``stack`` on ``grid``.

    Parameters
    ----------
    stack : Stack
        With its registration ``transform`` (scanner -> patient) applied.
    grid : Grid
    psf : {"gaussian", "box"}
        Through-plane slice profile (in-plane is always Gaussian, FWHM 1.2 x pixel spacing).
    path : {"auto", "separable", "shear", "general"}
        ``auto`` takes the separable path when :func:`separable_axes` allows it, else the shear path
        (:mod:`.shear_operator`) for a stack within ``SHEAR_MAX_DEG`` of the grid axes, else the general one.

    Returns
    -------
    StackOperator
    """
    if psf not in ("gaussian", "box"):
        raise InputError(f"unknown PSF '{psf}' (use gaussian or box)")
    if path not in ("auto", "separable", "shear", "general"):
        raise InputError(f"unknown operator path '{path}' (use auto, separable, shear or general)")
    axes = separable_axes(stack, grid) if path in ("auto", "separable") else None
    if path == "separable" and axes is None:
        raise InputError(f"'{stack.description}' is not aligned with the grid axes; use the general path")
    if axes is not None:
        return SeparableOperator(stack, grid, psf, axes)
    if path in ("auto", "shear"):
        from .shear_operator import ShearOperator, shear_path_applies

        if shear_path_applies(stack, grid):
            return ShearOperator(stack, grid, psf)
        if path == "shear":
            raise InputError(f"'{stack.description}' is rotated too far from the grid axes for the shear path")
    return GeneralOperator(stack, grid, psf)
