"""The separable path: a stack whose axes are parallel to the grid axes (after its registration transform).

The forward model is the tensor product of three 1-D banded PSF matrices, one per grid axis, holding the PSF
integrated against the interpolation basis of that axis (``sampling.psf.IMAGE_BASIS``; contract and conventions:
:mod:`.stack_operator`).
"""

import numpy as np

from ..errors import InputError
from ..sampling.psf import psf_sigma_mm
from .banded import Banded
from .parallel import row_slabs
from .stack_operator import StackOperator, grid_spacing_kji, separable_axes

# Separable normal operator: axes whose sample count is below this fraction of the grid nodes are applied
# as M then M^T, the others through their Gram matrix M^T M.
_REDUCE_RATIO = 0.75


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
        h = grid_spacing_kji(grid)
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
                target = scratch.take(shape, dt, slot=n % 2)
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
                target = scratch.take(shape, dt, slot=n % 2)  # ping-pong between two work arrays
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


__all__ = ["SeparableOperator"]
