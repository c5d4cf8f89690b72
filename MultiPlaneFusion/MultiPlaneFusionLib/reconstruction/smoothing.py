"""Gaussian smoothing of volumes, as the Huber edge test needs it (:func:`.penalty.huber_weights`)."""

import math

import numpy as np

from ..sampling.psf import GAUSSIAN_CUTOFF_SIGMAS
from .banded import Banded
from .parallel import row_slabs


class GaussianBlur:
    """A sampled Gaussian filter of ``sigma_mm`` along each axis of arrays of ``shape`` (taps to 3 sigma,
    rows renormalised at the borders), applied slab by slab along axis 0 so that all three 1-D passes of
    a slab happen in cache: :meth:`rows` gives any range of filtered rows (callers fuse their own work on
    them, see ``penalty.huber_weights``), :meth:`__call__` the whole filtered array.
    """

    # Filtered rows per slab: large enough that the halo re-read along axis 0 stays small.
    SLAB_ROWS = 8
    # Along axes 1 and 2 a kernel of at most this many taps either side runs as shifted adds (a few passes
    # in cache) instead of blocked matrix products, which multiply 64-wide blocks mostly by zeros.
    STENCIL_MAX_HALF = 4

    def __init__(self, shape, spacing_kji, sigma_mm):
        self.shape = tuple(int(v) for v in shape)
        self.mats = []
        self.half = []
        # short kernels along axes 1 and 2: the taps and 1 / (each row's sum of the taps inside the array),
        # the same rows as the dense matrix
        self._stencil = [None] * 3
        for axis, (n, h) in enumerate(zip(self.shape, spacing_kji)):
            s = float(sigma_mm) / float(h)
            if n < 2 or not s > 0:
                self.mats.append(None)
                self.half.append(0)
                continue
            half = int(math.ceil(GAUSSIAN_CUTOFF_SIGMAS * s))
            d = np.arange(n)[:, None] - np.arange(n)[None, :]
            w = np.where(np.abs(d) <= half, np.exp(-0.5 * (d / s) ** 2), 0.0)
            row_sums = w.sum(axis=1)
            self.mats.append(w / row_sums[:, None])
            self.half.append(half)
            if axis > 0 and half <= self.STENCIL_MAX_HALF:
                taps = np.exp(-0.5 * (np.arange(-half, half + 1) / s) ** 2)
                self._stencil[axis] = (taps, 1.0 / row_sums)
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
            if self._stencil[axis] is not None:
                a = self._shifted_adds(a, axis)
            elif self._banded[axis] is not None:
                a = self._banded[axis].apply(a, axis)
        return a

    def _shifted_adds(self, a, axis):
        """The short kernel along ``axis`` of ``a`` as shifted adds, renormalised at the borders (equal to
        the dense rows of ``self.mats[axis]``)."""
        taps, inv_norm = self._stencil[axis]
        dt = a.dtype.type
        half = (len(taps) - 1) // 2
        n = a.shape[axis]
        out = a * dt(taps[half])
        for t in range(1, min(half, n - 1) + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, n - t), slice(t, n)
            lo, hi = tuple(lo), tuple(hi)
            w = dt(taps[half + t])  # symmetric kernel: the same tap either side
            out[lo] += w * a[hi]
            out[hi] += w * a[lo]
        shape = [1, 1, 1]
        shape[axis] = n
        out *= inv_norm.astype(a.dtype).reshape(shape)
        return out

    def __call__(self, x, workers=None):
        """The whole filtered array (x's dtype)."""
        out = np.empty(self.shape, dtype=x.dtype)

        def slab(k0, k1):
            out[k0:k1] = self.rows(x, k0, k1)

        row_slabs(workers, self.shape, slab, min_rows=self.SLAB_ROWS)
        return out


__all__ = ["GaussianBlur"]
