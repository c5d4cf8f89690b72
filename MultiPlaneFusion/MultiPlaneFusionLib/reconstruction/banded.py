"""Banded matrices applied along one axis of a 3-D array: the kernel of every stack operator.

A 1-D PSF/sampling matrix has rows with contiguous support (a few taps around each sample). :class:`Banded`
holds it dense (it is small: samples x nodes of one axis) and applies it along any axis of a volume by
blocked matrix products: the rows are grouped into blocks, each block multiplies only the columns its rows
touch, so a product costs about rows x (block + taps) instead of rows x n, in a few BLAS calls. The products
split over threads (``workers``, :mod:`.parallel`) in disjoint output pieces and can write into given arrays.
"""

import numpy as np

from ..sampling.psf import psf_rows
from .parallel import workers_or_serial

# Rows of a banded matrix grouped per BLAS call, by the array axis it contracts (measured on the phantom's
# operators): along axis 0 the product runs over whole planes and stays efficient with few rows, so small
# blocks waste the fewest multiplications by zero; along axis 1 (a batch of products) a few more; along the
# contiguous axis 2 the product writes strided columns and needs wide blocks, and an expanding matrix (a
# transposed sampling matrix, n_out >= 2 n_in) is fastest as one dense product.
_BLOCK_ROWS_BY_AXIS = (4, 8, 64)


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


def apply_in_plane(m1, m2, g, workers=None, transpose=False):
    """``(slices, n1', n2') -> (slices, n1, n2)``: ``m1`` along axis 1, then ``m2`` along axis 2 (with
    ``transpose``: the transpose, ``m2^T`` then ``m1^T``). Either may be a list of one Banded per slice
    (slices that drift in-plane)."""
    if not isinstance(m1, list) and not isinstance(m2, list):
        if transpose:
            return m1.apply(m2.apply(g, 2, transpose=True, workers=workers), 1, transpose=True, workers=workers)
        return m2.apply(m1.apply(g, 1, workers=workers), 2, workers=workers)
    side = 1 if transpose else 0
    n1 = (m1[0] if isinstance(m1, list) else m1).shape[side]
    n2 = (m2[0] if isinstance(m2, list) else m2).shape[side]
    out = np.empty((g.shape[0], n1, n2), dtype=g.dtype)

    def slices(k0, k1):
        for k in range(k0, k1):
            a = m1[k] if isinstance(m1, list) else m1
            b = m2[k] if isinstance(m2, list) else m2
            if transpose:
                out[k : k + 1] = a.apply(b.apply(g[k : k + 1], 2, transpose=True), 1, transpose=True)
            else:
                out[k : k + 1] = b.apply(a.apply(g[k : k + 1], 1), 2)

    workers_or_serial(workers).ranges(slices, g.shape[0])
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
