"""The general path: stacks no faster path models (strongly oblique planes, tilts beyond the skew path's pre-shear).

The grid is interpolated onto a lattice aligned with the stack frame (row, column, normal); the PSF and the
sampling are then 1-D banded matrices along the lattice axes: through-plane along the slice normal, in-plane
per slice when the slices drift (shear). The interpolation is bilinear per plane when one stack axis is
parallel to a grid axis (the lattice shares that axis's nodes), trilinear otherwise; both are
:class:`LatticeInterpolation` objects, and :mod:`.shear_operator` supplies a third. Contract and conventions:
:mod:`.stack_operator`.
"""

import math
import threading

import numpy as np

from ..sampling.psf import GAUSSIAN_CUTOFF_SIGMAS, psf_sigma_mm
from ..transforms import apply
from .banded import Banded, apply_in_plane
from .parallel import split, workers_or_serial
from .stack_operator import (
    CHUNK_NODES,
    NormalisedOperator,
    affine_coverage,
    field_of_view_mm,
    grid_spacing_kji,
    parallel_axis,
    spacing_along,
    stack_placement,
)


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
        g0 = apply(inv, self.p0 + self.frame @ self.starts)
        # to (k, j, i) rows and (w, v, u) columns
        lin = lin[::-1, ::-1]
        return g0[::-1].copy(), lin.copy()


def _axis_nodes(lo, hi, step):
    """Integer node range [a, b] with a*step <= lo and b*step >= hi (step > 0)."""
    return int(math.floor(lo / step)), int(math.ceil(hi / step))


class GeneralOperator(NormalisedOperator):
    """Interpolation onto a stack-aligned lattice, then 1-D PSF/sampling matrices (module docstring)."""

    path = "general"

    def __init__(self, stack, grid, psf="gaussian", shared_axis="auto"):
        super().__init__(stack, grid, psf)
        frame, p0, slice_uvw = stack_placement(stack)
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
        g_along = [spacing_along(grid, frame[:, a]) for a in range(3)]
        steps = []
        for a, pix in ((0, di), (1, dj)):
            steps.append(pix / math.ceil(pix / (1.25 * g_along[a]) - 1e-9))
        sig_w = sig_n if psf == "gaussian" else sig_n / 3.0
        steps.append(min(g_along[2], max(sig_w, 0.5 * g_along[2])))
        steps = self._lattice_steps(steps, frame)
        # Shared axis: a stack axis parallel to a grid axis takes that axis's grid nodes as lattice nodes.
        self.shared = None
        if shared_axis == "auto":
            extent = field_of_view_mm(stack)
            for a in (0, 1, 2):
                hit = parallel_axis(frame[:, a], grid, extent)
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
                steps[a] = sign * float(grid_spacing_kji(grid)[g])
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
        # 1-D matrices in lattice index units. Through-plane (w): one matrix for all columns.
        st, sz = self.lattice.starts, self.lattice.sizes
        sp = self.lattice.steps
        self.m_w = Banded.from_psf((w_k - st[2]) / sp[2], sz[2], psf, sig_n / abs(sp[2]))
        # In-plane: one matrix per slice when slices drift (shear), else one for all.
        self.m_v = self._inplane(dv, np.arange(nj) * dj, start=st[1], step=sp[1], n=sz[1], sigma=sig_j)
        self.m_u = self._inplane(du, np.arange(ni) * di, start=st[0], step=sp[0], n=sz[0], sigma=sig_i)
        self._interp = self._make_interp()
        # Normalisation: each valid sample's weights over the valid lattice nodes sum to 1.
        self._w_cache = {}
        self._normalise(valid)

    def _lattice_steps(self, steps, frame):
        """Lattice node spacing (mm) along the frame axes u, v, w; subclasses choose other lattices."""
        return steps

    def _adjust_lattice(self, lattice):
        """Hook for subclasses that need the lattice moved (it only has to cover the samples' PSF support)."""
        return lattice

    def _make_interp(self):
        """The grid -> lattice interpolation (a :class:`LatticeInterpolation`)."""
        if self.shared:
            return _SharedAxisInterp(self.lattice, self.grid, self.shared)
        return _TrilinearInterp(self.lattice, self.grid)

    def coverage(self):
        fast = affine_coverage(self.stack, self.grid)
        return super().coverage() if fast is None else fast

    def _inplane(self, drift, pix, *, start, step, n, sigma):
        if np.ptp(drift) <= 1e-6 * abs(step):
            return Banded.from_psf((drift[0] + pix - start) / step, n, "gaussian", sigma / abs(step))
        return [Banded.from_psf((d + pix - start) / step, n, "gaussian", sigma / abs(step)) for d in drift]

    def describe(self):
        d = super().describe()
        d["lattice_shape"] = [int(v) for v in self.lattice.shape]
        d["interpolation"] = "bilinear, shared axis" if self.shared else "trilinear"
        d["sheared"] = isinstance(self.m_v, list) or isinstance(self.m_u, list)
        return d

    # lattice (w, v, u) <-> stack (k, j, i): in-plane PSF + sampling, per slice when sheared
    def _lattice_to_slices(self, z1, workers=None):
        return apply_in_plane(self.m_v, self.m_u, z1, workers)

    def _slices_to_lattice(self, y, workers=None):
        return apply_in_plane(self.m_v, self.m_u, y, workers, transpose=True)

    def _raw_forward(self, x, workers=None):
        dt = x.dtype
        nw, nv, nu = self.lattice.shape
        z1 = np.zeros((self.shape[0], nv, nu), dtype=dt)
        interp = self._interp
        # Chunks split along w: each is a block of columns of M_w, applied as one dense product.
        through_plane = interp.chunk_axis == 0
        for ci, chunk in interp.forward_chunks(x, workers):
            if through_plane:
                r0, r1 = interp.ranges[ci]
                nz = chunk.shape[0]
                cols = self._w_dense(dt)[:, r0:r1]
                z1 += (cols @ np.ascontiguousarray(chunk).reshape(nz, -1)).reshape(z1.shape)
            else:
                z1[interp.chunk_index(ci)] = self.m_w.apply(chunk, 0, workers=workers)
        return self._lattice_to_slices(z1, workers)

    def _w_dense(self, dt):
        key = np.dtype(dt)
        if key not in self._w_cache:
            self._w_cache[key] = self.m_w.dense().astype(dt)
        return self._w_cache[key]

    def _raw_adjoint(self, y, workers=None, out=None):
        dt = y.dtype
        z1 = self._slices_to_lattice(y, workers)
        interp = self._interp
        through_plane = interp.chunk_axis == 0
        nk = z1.shape[0]

        def chunks():
            for ci, (r0, r1) in enumerate(interp.ranges):
                if through_plane:
                    cols = self._w_dense(dt)[:, r0:r1]
                    yield ci, (cols.T @ z1.reshape(nk, -1)).reshape((r1 - r0,) + z1.shape[1:])
                else:
                    yield ci, self.m_w.apply(z1[interp.chunk_index(ci)], 0, transpose=True, workers=workers)

        return interp.adjoint_chunks(chunks(), dt, workers=workers, out=out)


class LatticeInterpolation:
    """Grid -> lattice interpolation, chunk by chunk along one lattice axis: what :class:`GeneralOperator`
    needs of one.

    ``chunk_axis``: the axis of the canonical (w, v, u) lattice array the chunks split (0 = w, through-plane;
    1 = v; 2 = u); ``ranges``: the node ranges [r0, r1) of the chunks along it. :meth:`forward_chunks` yields
    ``(chunk number, lattice chunk in canonical order)``; :meth:`adjoint_chunks` is its transpose.
    """

    chunk_axis = 0
    ranges = ()

    def chunk_index(self, ci):
        """Index of chunk ``ci`` in a canonical (w, v, u) lattice-shaped array."""
        r0, r1 = self.ranges[ci]
        return (slice(None),) * self.chunk_axis + (slice(r0, r1),)

    def forward_chunks(self, x, workers=None):
        """Lattice chunks interpolated from grid volume ``x``: yields ``(chunk number, chunk)``."""
        raise NotImplementedError

    def adjoint_chunks(self, pairs, dt, workers=None, out=None):
        """The transpose of :meth:`forward_chunks` for ``(chunk number, chunk)`` pairs: a grid array of dtype
        ``dt``, added into ``out`` (grid-shaped, C-contiguous) when given."""
        raise NotImplementedError


class _SharedAxisInterp(LatticeInterpolation):
    """Bilinear interpolation in the plane orthogonal to a shared axis, vectorised along it.

    Lattice axis ``a`` (0=u, 1=v, 2=w) uses the nodes of grid array axis ``g``; the other two lattice axes
    are interpolated bilinearly from the other two grid axes, with the same weights for every node along
    ``g``: each tap gathers whole rows of the grid seen as (plane nodes, shared axis). The transpose
    gathers the same rows back, sorted by target plane node, and sums them per target
    (``np.add.reduceat``).
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
        self.chunk_axis = 2 - self.lat_axes[self.chunk_pos]  # lattice axis x is canonical axis 2 - x
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
        per = max(1, CHUNK_NODES // max(n_ride * n_lat[1 - self.chunk_pos], 1))
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


class _TrilinearInterp(LatticeInterpolation):
    """Trilinear interpolation of the grid at every lattice node, computed on the fly per chunk of
    lattice planes (no stored weights); the transpose scatters each corner's contributions with
    ``np.add.at``."""

    def __init__(self, lattice, grid):
        self.shape = lattice.shape  # canonical (w, v, u)
        self.grid_shape = tuple(int(v) for v in grid.shape)
        self.g0, self.lin = lattice.index_affine(grid)  # rows k, j, i; columns w, v, u
        # Chunk along the lattice axis most aligned with grid axis k, so that a chunk touches few grid
        # slices (compact flat index range).
        cos_k = np.abs(self.lin[0]) / np.maximum(np.linalg.norm(self.lin, axis=0), 1e-12)
        self.chunk_axis = int(np.argmax(cos_k))
        n_axis = self.shape[self.chunk_axis]
        per_plane = int(np.prod(self.shape)) // max(n_axis, 1)
        per = max(1, CHUNK_NODES // max(per_plane, 1))
        self.ranges = [(s, min(s + per, n_axis)) for s in range(0, n_axis, per)]

    def _stencil(self, r0, r1):
        """Chunk shape, flat index of the lower corner of every node's cell and the per-axis weights.

        Coordinates are float32 (1e-4 voxel at 1000 voxels: far below the model's accuracy); forward and
        adjoint use this same function, so they stay exact transposes.
        """
        ar = [np.arange(n, dtype=np.float32) for n in self.shape]
        ar[self.chunk_axis] = ar[self.chunk_axis][r0:r1]
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
            yield ci, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.chunk_axis)

    def adjoint_chunks(self, pairs, dt, workers=None, out=None):
        """The transpose; added into ``out`` (grid-shaped, C-contiguous, ``dt``) when given."""
        result = np.zeros(self.grid_shape, dtype=dt) if out is None else out
        out = result.reshape(-1)  # a view: the scatter writes into ``result``
        workers = workers_or_serial(workers)
        # The scatter is ``np.add.at`` per corner (numpy >= 1.25 runs it as a fast loop, much faster than
        # np.bincount over concatenated corners). It holds the GIL and the threads' pieces may overlap in
        # ``out``, so the adds take turns; the stencils and products around them run in parallel.
        lock = threading.Lock()

        def part(zc, r0, a, b):
            shape, base, wk, fj, fi = self._stencil(a, b)
            sel = [slice(None)] * 3
            sel[self.chunk_axis] = slice(a - r0, b - r0)
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


__all__ = ["GeneralOperator", "LatticeInterpolation"]
