"""The skew path: a stack whose slices are tilted slightly against the grid, reduced through-plane FIRST.

The separable path is fast because it integrates the slice profile along the grid axis nearest the slice
normal first, which shrinks the array 3-5x before anything else runs. This path keeps that order for a stack
that is rotated (registration leaves 0.02-3 degrees; oblique MR planes):

1. **Through-plane, along the grid axis t nearest the normal.** Each slice is a plane ``g_t = c_s + s . (g_a,
   g_b)`` in grid index coordinates (the same slopes for every slice). Along each grid line (fixed ``g_a,
   g_b``) the slice profile is integrated against the grid's interpolation basis at the exact plane
   position, with the profile's width measured along that axis (the thickness / cos(tilt)). Lines are grouped
   by their shift ``s . (g_a, g_b)`` rounded to 1/``SHIFT_STEPS`` of a node (at most 1/64 node off); each group
   is one matrix product. No interpolation happens through-plane, and the result holds one value per slice
   and grid line: a (slices, n_a, n_b) array, as small as the separable path's.
2. **In-plane, on that small array.** A pixel ``(i, j)`` of slice s sits at ``(g_a, g_b) = o_s + L (i, j)``.
   ``L`` factors into two shears and a scale (``L = S_b S_a diag(p, q)``); the two shears are 1-D Lanczos-3
   resamplings (:mod:`.shear_operator`'s stages, exact transposes), the scale and the per-slice offsets go into
   the in-plane PSF matrices (:mod:`.banded`), one per slice when the slices drift in-plane.

The one approximation is step 1's direction: the profile is integrated along grid axis t instead of along
the normal, so the PSF is sheared instead of rotated; its in-plane drift is (profile's standard deviation) x
tan(tilt), the same along every line. :func:`skew_drift_voxels` measures it; :mod:`.operators` takes this path
only while it stays below ``SKEW_MAX_DRIFT_VOXELS`` of a grid voxel (chosen with ``benchmarks/bench_moved.py``,
figures in the README), and pre-shears the grid beyond. A rotation about the slice normal alone (any angle up
to 45 degrees) has no drift.

**Pre-shear (gantry tilts, oblique planes).** A series tilted 10-30 degrees drifts far too much
for that. With ``pre_shear`` the grid is first resampled once along the grid axis that carries most of the
tilt (a 1-D Lanczos-3 shear of whole lines, exact transpose), ``x'(.., g_s - delta g_t, ..) = x``, so that the
lines of ``x'`` along t run along the normal; the steps above then work on ``x'`` and the drift left is the
tilt's component along the third axis (registration leaves a few tenths of a degree there). A plane tilted
about both in-plane grid axes (oblique MR planning) takes a second such shear along the other axis
(``pre_shear=2``), after which the lines run exactly along the normal (no drift). Each stage shifts whole planes
of constant g_t, so it runs as one banded matrix product per plane. :mod:`.operators` takes it whenever the drift
without it exceeds the limit, up to ``PRE_SHEAR_MAX_DEG`` (before the shear path: on moved real anatomy the
two-axis pre-shear fitted the truth 0.05-0.17 dB better than the shear path at 5-10 degrees, in 0.7x its time).

Samples are normalised over the model's mass (``A 1 = 1``), as on the general path. Contract:
:mod:`.stack_operator`.
"""

import math
from typing import NamedTuple, Tuple

import numpy as np

from ..sampling.psf import GAUSSIAN_CUTOFF_SIGMAS, psf_rows, psf_sigma_mm
from .banded import Banded, apply_in_plane
from .parallel import run_shared
from .shear_operator import ShearStage
from .stack_operator import NormalisedOperator, affine_coverage, grid_axes, stack_placement

# Through-plane shifts of the grid lines are rounded to this fraction of a node (position error <= 1/64 node).
SHIFT_STEPS = 32
# Largest in-plane drift of the sheared profile (its standard deviation x tan(tilt), in grid voxels) the
# operators accept on this path before they pre-shear the grid: on moved real anatomy (bench_moved.py, README)
# a drift of 0.035 voxel already cost 0.15 dB against the pre-sheared path, 0.1 voxel 0.44 dB.
SKEW_MAX_DRIFT_VOXELS = 0.02
# Largest tilt of the normal from the nearest grid axis (degrees) that the pre-shear takes on (CT gantries tilt at
# most about 30 degrees); its box grows by tan(tilt) x the grid's size along the tilt.
PRE_SHEAR_MAX_DEG = 30.0
# Dense per-group through-plane matrices are kept while they take less than this; beyond, built per use.
_CACHE_BYTES = 24 << 20


def _grid_index_map(grid):
    """(A, b): continuous grid indices (k, j, i) of an LPS point p are ``A @ p + b``."""
    inv = np.linalg.inv(grid.index_to_lps_affine)
    return inv[:3, :3][::-1].copy(), inv[:3, 3][::-1].copy()


def _through_axis(normal, grid):
    """(grid array axis nearest the normal, |cos| of the angle between them)."""
    cos = np.abs(grid_axes(grid).T @ normal)
    t = int(np.argmax(cos))
    return t, float(cos[t])


def _profile_sd_mm(stack, psf):
    """Standard deviation of the through-plane profile, mm (Gaussian sigma, or box width / sqrt(12))."""
    w = psf_sigma_mm(stack, psf)[2]
    return w if psf == "gaussian" else w / math.sqrt(12.0)


class _Tilt(NamedTuple):
    """Where the skew path integrates: through axis ``t`` (the other two ``a``, ``b``), the pre-shear's axes
    (none without one) and their slopes ``deltas`` (index units along each per node along t), the mm along the
    normal per node of the integration direction (``along``), and tan of the angle left between it and the
    normal."""

    t: int
    a: int
    b: int
    axes: Tuple[int, ...]
    deltas: Tuple[float, ...]
    along: float
    tan: float


def _tilt(stack, grid, pre_shear):
    """:class:`_Tilt` of ``stack`` on ``grid``. ``pre_shear`` (while the tilt is within ``PRE_SHEAR_MAX_DEG``): 1
    (or True) shears along the in-plane grid axis carrying most of the tilt, 2 along both."""
    normal = stack_placement(stack)[0][:, 2]
    t, cos = _through_axis(normal, grid)
    a_ax, b_ax = [g for g in range(3) if g != t]
    amat, _ = _grid_index_map(grid)
    d_idx = amat @ normal  # index displacement per mm along the normal
    step = np.zeros(3)
    step[t] = 1.0
    axes = ()
    if pre_shear and math.degrees(math.acos(min(1.0, cos))) <= PRE_SHEAR_MAX_DEG:
        main = a_ax if abs(d_idx[a_ax]) >= abs(d_idx[b_ax]) else b_ax
        axes = (main,) if int(pre_shear) == 1 else (main, b_ax if main == a_ax else a_ax)
    deltas = tuple(float(d_idx[ax] / d_idx[t]) for ax in axes)
    for ax, d in zip(axes, deltas):
        step[ax] = d
    r = np.linalg.inv(amat) @ step  # physical direction of one node along t after the pre-shear
    along = float(r @ normal)
    tan = float(np.linalg.norm(r - along * normal)) / max(abs(along), 1e-12)
    return _Tilt(t, a_ax, b_ax, axes, deltas, abs(along), tan)


def _pre_shear_boxes(tilt, grid_shape):
    """The pre-shear's stages ``(axis, coef, lo_in, shape_in, lo_out, shape_out)`` (each shifts whole planes of
    constant g_t along its axis, its box grown to hold them), the map ``g' = tmat @ g - lo`` to the sheared index
    coordinates and the sheared array's shape."""
    gshape = tuple(int(v) for v in grid_shape)
    t = tilt.t
    tmat, lo = np.eye(3), np.zeros(3)
    lo_in = np.zeros(3, dtype=np.int64)
    stages = []
    for axis, delta in zip(tilt.axes, tilt.deltas):
        tmat[axis, t] = -delta
        ends = [-delta * v for v in (-0.5, gshape[t] - 0.5)]
        lo_s = math.floor(min(ends) - 0.5) - 3
        hi_s = math.ceil(max(ends) + gshape[axis] - 0.5) + 3
        lo[axis] = lo_s
        shape_out = np.array(gshape)
        shape_out[axis] = hi_s - lo_s + 1
        coef = np.zeros(3)
        coef[t] = delta
        lo_out = lo_in.copy()
        lo_out[axis] = lo_s
        stages.append((axis, coef, lo_in, np.array(gshape), lo_out, shape_out))
        gshape = tuple(int(v) for v in shape_out)
        lo_in = lo_out
    return stages, tmat, lo, gshape


def pre_shear_voxels(stack, grid, pre_shear):
    """Voxels of the pre-shear's sheared arrays (all stages: they are alive together at the peak), 0 without."""
    stages = _pre_shear_boxes(_tilt(stack, grid, pre_shear), grid.shape)[0]
    return int(sum(int(np.prod(st[5])) for st in stages))


def skew_drift_voxels(stack, grid, psf="gaussian", pre_shear=False):
    """In-plane drift (grid voxels) of the skew path's sheared profile: its standard deviation x tan(angle
    between the integration direction and the normal: the nearest grid axis, or with ``pre_shear`` that axis
    sheared towards the normal along one other axis), over the smallest grid spacing."""
    tan = _tilt(stack, grid, pre_shear).tan
    return _profile_sd_mm(stack, psf) * tan / float(np.min(grid.spacing_mm))


def skew_path_applies(stack, grid, psf="gaussian", pre_shear=False):
    """True when :class:`SkewOperator` models ``stack`` within ``SKEW_MAX_DRIFT_VOXELS`` (module docstring)."""
    return skew_drift_voxels(stack, grid, psf, pre_shear) <= SKEW_MAX_DRIFT_VOXELS


def _factor_inplane(lmat):
    """``(swap, p, q, s1, tau)`` with ``L' = [[1, 0], [s1, 1]] @ [[1, tau], [0, 1]] @ diag(p, q)``, where ``L'`` is
    ``lmat`` (columns: pixel i, pixel j) or, when ``swap``, ``lmat`` with its columns exchanged (j, i)."""
    swap = abs(lmat[0, 0] * lmat[1, 1]) < abs(lmat[0, 1] * lmat[1, 0])
    m = lmat[:, ::-1] if swap else lmat
    p = float(m[0, 0])
    s1 = float(m[1, 0]) / p
    q = float(m[1, 1] - s1 * m[0, 1])
    tau = float(m[0, 1]) / q
    return swap, p, q, s1, tau


class SkewOperator(NormalisedOperator):
    """Through-plane along the grid axis nearest the normal at the slices' exact positions, then two in-plane
    Lanczos shears and the in-plane PSF on the reduced array (module docstring). ``workers`` (:class:`.parallel.
    Workers`) share the build's one pass over the grid (the normalisation)."""

    path = "skew"

    def __init__(self, stack, grid, psf="gaussian", pre_shear=False, workers=None):
        super().__init__(stack, grid, psf)
        frame, p0, slice_uvw = stack_placement(stack)
        amat, bvec = _grid_index_map(grid)
        sig_i, sig_j, sig_n = psf_sigma_mm(stack, psf)
        di, dj = stack.pixel_spacing_mm
        nk, nj, ni = self.shape
        tilt = _tilt(stack, grid, pre_shear)
        t, a_ax, b_ax = tilt.t, tilt.a, tilt.b
        self.t, self.a_ax, self.b_ax = t, a_ax, b_ax
        # Pixel (i, j) of slice s in grid indices: g0[s] + i U + j V.
        g0_grid = (p0 + slice_uvw @ frame.T) @ amat.T + bvec  # (nk, 3)
        u_grid = amat @ frame[:, 0] * di
        v_grid = amat @ frame[:, 1] * dj
        # Pre-shear (gantry tilts, oblique planes): the grid resampled along one in-plane axis (or both, one after
        # the other), x'(.., g_s - delta_s g_t, ..) = x, so that its lines along t run along the normal;
        # everything below is in x' index coordinates (g' = tmat @ g - lo).
        boxes, tmat, lo, gshape = _pre_shear_boxes(tilt, self.grid_shape)
        self._pre = [ShearStage(ax, coef, 0.0, lo_in, shape_in, lo_out, shape_out)
                     for ax, coef, lo_in, shape_in, lo_out, shape_out in boxes]
        self._work_shape = gshape
        self.pre_shear_axes = tuple(tilt.axes)
        g0 = g0_grid @ tmat.T - lo[None, :]
        u_vec, v_vec = tmat @ u_grid, tmat @ v_grid
        n_t, n_a, n_b = gshape[t], gshape[a_ax], gshape[b_ax]
        ab = [a_ax, b_ax]
        lmat = np.array([[u_vec[a_ax], v_vec[a_ax]], [u_vec[b_ax], v_vec[b_ax]]])
        slope = np.array([u_vec[t], v_vec[t]]) @ np.linalg.inv(lmat)  # d g_t / d (g_a, g_b) on a slice plane
        centre_t = g0[:, t] - g0[:, ab] @ slope  # plane of slice s: g_t = centre_t[s] + slope . (g_a, g_b)
        # --- through-plane: lines grouped by their rounded shift
        width_t = sig_n / tilt.along  # the profile's width in nodes along the integration direction
        ga, gb = np.meshgrid(np.arange(n_a), np.arange(n_b), indexing="ij")
        shift = slope[0] * ga + slope[1] * gb
        iq = np.round(shift * SHIFT_STEPS).astype(np.int64).ravel()
        order = np.argsort(iq, kind="stable")
        keys = iq[order]
        cut = np.nonzero(np.diff(keys))[0] + 1
        self._groups = []
        for g, part in enumerate(np.split(order, cut)):
            # part: flat indices into (n_a, n_b) of the lines of this shift, ascending
            self._groups.append((g, part, part // n_b, part % n_b))
        self._runs = _line_runs(self._groups)
        # Slice s of group g sits at centre_t[s] + key_g / SHIFT_STEPS.
        group_keys = keys[np.concatenate([[0], cut])] if keys.size else np.zeros(0, dtype=np.int64)
        self._group_keys, self._centre_t, self._width_t = group_keys, centre_t, width_t
        start, w = _group_rows(centre_t, group_keys, n_t, psf, width_t)
        # Dense matrices are filled from flat indices (row s, column start + tap) and the weights in float32.
        taps = w.shape[2]
        flat = (np.arange(nk)[:, None] * n_t)[None] + start[:, :, None] + np.arange(taps)[None, None, :]
        self._rows = (flat.astype(np.int32 if nk * n_t < 2**31 else np.int64), w, n_t)
        self._cache_ok = len(self._groups) * nk * n_t * 4 <= _CACHE_BYTES
        self._mats = {}
        self.shift_range_nodes = float(np.ptp(shift)) if shift.size else 0.0
        # --- in-plane: (g_a, g_b) = off0[s] + L (i, j) = S_b S_a (diag(p, q) (pi1, pi2) + off[s])
        swap, p, q, s1, tau = _factor_inplane(lmat)
        self.swap = swap
        shears = np.array([[1.0, 0.0], [s1, 1.0]]) @ np.array([[1.0, tau], [0.0, 1.0]])
        off = g0[:, ab] @ np.linalg.inv(shears).T  # (nk, 2) in (rho1, rho2)
        # Slice origins stepping regularly move the in-plane offset linearly with the slice: that drift goes
        # into the shears (rho = rho' + drift * s), so one in-plane matrix per axis serves every slice.
        drift = np.zeros(2)
        sidx = np.arange(nk, dtype=float)
        if nk >= 2:
            drift = np.polyfit(sidx, off, 1)[0]
            if np.abs(off - off[0] - sidx[:, None] * drift[None, :]).max() > 1e-6:
                drift = np.zeros(2)  # irregular steps: per-slice matrices instead
        off = off - sidx[:, None] * drift[None, :]
        n1, n2 = (nj, ni) if swap else (ni, nj)
        sig1, sig2 = (sig_j / dj, sig_i / di) if swap else (sig_i / di, sig_j / dj)
        w1, w2 = sig1 * abs(p), sig2 * abs(q)  # PSF sigma in rho node units
        reach1, reach2 = GAUSSIAN_CUTOFF_SIGMAS * w1 + 2.0, GAUSSIAN_CUTOFF_SIGMAS * w2 + 2.0
        pix1 = np.arange(n1) * p
        pix2 = np.arange(n2) * q
        lo1 = math.floor(off[:, 0].min() + min(pix1.min(), 0.0) - reach1)
        hi1 = math.ceil(off[:, 0].max() + max(pix1.max(), 0.0) + reach1)
        lo2 = math.floor(off[:, 1].min() + min(pix2.min(), 0.0) - reach2)
        hi2 = math.ceil(off[:, 1].max() + max(pix2.max(), 0.0) + reach2)
        # Clip to the part of rho' space that the grid's (a, b) box can reach (plus the shear taps).
        corners = np.array([[x, y] for x in (-1.0, n_a) for y in (-1.0, n_b)]) @ np.linalg.inv(shears).T
        ends = np.array([np.zeros(2), drift * (nk - 1)])
        lo1 = max(lo1, math.floor(corners[:, 0].min() - ends[:, 0].max()) - 4)
        hi1 = min(hi1, math.ceil(corners[:, 0].max() - ends[:, 0].min()) + 4)
        lo2 = max(lo2, math.floor(corners[:, 1].min() - ends[:, 1].max()) - 4)
        hi2 = min(hi2, math.ceil(corners[:, 1].max() - ends[:, 1].min()) + 4)
        hi1, hi2 = max(hi1, lo1), max(hi2, lo2)
        # Stage 1: F1(s, a, beta) = Y(s, a, beta + s1 a + drift2 s), along array axis 2 (b); stage 2:
        # G(s, rho1, rho2) = F1(s, rho1 + tau rho2 + (drift1 + tau drift2) s, rho2), along array axis 1 (a).
        # Arrays are (slice, a-like, b-like).
        lo_f1 = np.array([0, 0, lo2])
        shape_f1 = np.array([nk, n_a, hi2 - lo2 + 1])
        lo_g = np.array([0, lo1, lo2])
        shape_g = np.array([nk, hi1 - lo1 + 1, hi2 - lo2 + 1])
        self._stages = [
            ShearStage(2, np.array([drift[1], s1, 0.0]), 0.0, np.zeros(3, dtype=np.int64), np.array([nk, n_a, n_b]),
                       lo_f1, shape_f1),
            ShearStage(1, np.array([drift[0] + tau * drift[1], 0.0, tau]), 0.0, lo_f1, shape_f1, lo_g, shape_g),
        ]
        self._g_shape = tuple(int(v) for v in shape_g)
        self.m_1 = _per_slice((off[:, 0] - lo1)[:, None] + pix1[None, :], int(shape_g[1]), w1)
        self.m_2 = _per_slice((off[:, 1] - lo2)[:, None] + pix2[None, :], int(shape_g[2]), w2)
        # --- valid samples (pixel centre inside the grid box) and the normalisation
        valid = np.zeros(self.shape, dtype=bool)
        jj, ii = np.meshgrid(np.arange(nj, dtype=float), np.arange(ni, dtype=float), indexing="ij")
        lim = np.asarray(self.grid_shape, float)[:, None, None] - 0.5
        for k in range(nk):
            g = g0_grid[k][:, None, None] + u_grid[:, None, None] * ii + v_grid[:, None, None] * jj
            valid[k] = np.all((g >= -0.5) & (g <= lim), axis=0)
        self._normalise(valid, workers)

    # ------------------------------------------------------------------ through-plane
    def _matrix(self, g, dt):
        """Dense through-plane matrix (slices x n_t) of line group ``g``, in dtype ``dt``."""
        ck = (g, np.dtype(dt))
        mat = self._mats.get(ck)
        if mat is None:
            flat, w, n_t = self._rows
            mat = np.zeros((w.shape[1], n_t), dtype=dt)
            mat.reshape(-1)[flat[g]] = w[g]  # a row's taps fall on distinct columns
            if self._cache_ok:
                self._mats[ck] = mat
        return mat

    def _lines_view(self, x):
        """``x`` as (n_t, n_a, n_b) (a view)."""
        return np.transpose(x, (self.t, self.a_ax, self.b_ax))

    def _reduce(self, x, workers=None):
        """(slices, n_a, n_b): each grid line integrated through each slice's profile."""
        dt = x.dtype
        xv = self._lines_view(x)
        n_a, n_b = xv.shape[1:]
        if self._runs is not None:
            out3 = np.empty((self.shape[0], n_a, n_b), dtype=dt)

            def run_views(groups):
                for key, runs in groups:
                    mat = self._matrix(key, dt)
                    for a, b0, b1 in runs:
                        np.matmul(mat, xv[:, a, b0:b1], out=out3[:, a, b0:b1])

            run_shared(self._runs, run_views, workers)
            return out3
        out = np.empty((self.shape[0], n_a * n_b), dtype=dt)

        def run(groups):
            for key, lines, ia, ib in groups:
                out[:, lines] = self._matrix(key, dt) @ xv[:, ia, ib]

        run_shared(self._groups, run, workers)
        return out.reshape(self.shape[0], n_a, n_b)

    def _expand(self, r, out, workers=None, assign=False):
        """Transpose of :meth:`_reduce`: ``out`` (grid-shaped) += lines from ``r`` (slices, n_a, n_b); with
        ``assign`` the lines are written instead (every line belongs to one group: ``out`` may be uninitialised)."""
        ov = self._lines_view(out)
        dt = out.dtype
        if self._runs is not None:
            r3 = r.reshape(r.shape[0], ov.shape[1], ov.shape[2])

            def run_views(groups):
                for key, runs in groups:
                    mat_t = self._matrix(key, dt).T
                    for a, b0, b1 in runs:
                        if assign:
                            np.matmul(mat_t, r3[:, a, b0:b1], out=ov[:, a, b0:b1])
                        else:
                            ov[:, a, b0:b1] += mat_t @ r3[:, a, b0:b1]

            run_shared(self._runs, run_views, workers)
            return out
        r2 = r.reshape(r.shape[0], -1)

        def run(groups):
            for key, lines, ia, ib in groups:
                if assign:
                    ov[:, ia, ib] = self._matrix(key, dt).T @ r2[:, lines]
                else:
                    ov[:, ia, ib] += self._matrix(key, dt).T @ r2[:, lines]

        run_shared(self._groups, run, workers)
        return out

    # ------------------------------------------------------------------ in-plane
    def _inplane(self, r, workers=None):
        g = r
        for st in self._stages:
            g = st.forward(np.ascontiguousarray(g), workers)
        y = apply_in_plane(self.m_1, self.m_2, np.ascontiguousarray(g), workers)
        return y if self.swap else np.ascontiguousarray(np.transpose(y, (0, 2, 1)))

    def _inplane_t(self, y, workers=None):
        y = y if self.swap else np.transpose(y, (0, 2, 1))
        g = apply_in_plane(self.m_1, self.m_2, np.ascontiguousarray(y), workers, transpose=True)
        for st in reversed(self._stages):
            g = st.adjoint(np.ascontiguousarray(g), workers)
        return g

    # ------------------------------------------------------------------ contract
    def _raw_forward(self, x, workers=None):
        for st in self._pre:
            x = st.forward(x, workers)
        return self._inplane(self._reduce(np.ascontiguousarray(x), workers), workers)

    def _raw_adjoint(self, y, workers=None, out=None):
        r = np.ascontiguousarray(self._inplane_t(y, workers))
        if not self._pre:
            if out is None:
                out = np.zeros(self.grid_shape, dtype=y.dtype)
            return self._expand(r, out, workers)
        back = self._expand(r, np.empty(self._work_shape, dtype=y.dtype), workers, assign=True)
        for st in reversed(self._pre[1:]):
            back = st.adjoint(back, workers)
        back = self._pre[0].adjoint(back, workers, out=out)
        return back if out is not None else np.ascontiguousarray(back)

    def coverage(self):
        fast = affine_coverage(self.stack, self.grid)
        return super().coverage() if fast is None else fast

    @property
    def pre_shear_axis_names(self):
        """The pre-sheared grid axes as letters of (k, j, i) in shearing order ("j", "ji", ...), None without."""
        return "".join("kji"[a] for a in self.pre_shear_axes) or None

    def describe(self):
        d = super().describe()
        d["through_axis"] = "kji"[self.t]
        d["line_groups"] = len(self._groups)
        d["shift_range_nodes"] = round(self.shift_range_nodes, 3)
        d["inplane_shape"] = list(self._g_shape)
        d["per_slice_inplane"] = isinstance(self.m_1, list)
        d["drift_voxels"] = round(skew_drift_voxels(self.stack, self.grid, self.psf, len(self._pre)), 4)
        d["pre_shear_axis"] = self.pre_shear_axis_names
        return d


# Line groups are applied run by run (each run a 2-D strided view: no gather, no scatter) when their runs along
# the b axis are at least this long on average; shorter runs cost more in calls than the copies they save.
_MIN_RUN_LINES = 8


def _line_runs(groups):
    """``[(key, [(a, b0, b1), ...]), ...]``: each group's lines as runs ``b0:b1`` along the b axis of one a row,
    or None when the runs average fewer than ``_MIN_RUN_LINES`` lines."""
    out, n_runs, n_lines = [], 0, 0
    for key, lines, ia, ib in groups:
        cut = np.nonzero((np.diff(ib) != 1) | (np.diff(ia) != 0))[0] + 1
        first = np.concatenate([[0], cut])
        last = np.concatenate([cut - 1, [lines.size - 1]])
        out.append((key, [(int(ia[f]), int(ib[f]), int(ib[e]) + 1) for f, e in zip(first, last)]))
        n_runs += first.size
        n_lines += lines.size
    if n_runs == 0 or n_lines < _MIN_RUN_LINES * n_runs:
        return None
    return out


def _group_rows(centre_t, keys, n_t, psf, width):
    """Through-plane rows of every line group: ``start`` (groups, slices) and ``weights`` (groups, slices, taps)
    of :func:`psf_rows` at ``centre_t[s] + key / SHIFT_STEPS``.

    Rows are computed once per fractional key and moved by the key's whole nodes: away from the lattice ends a
    row at ``c + n`` is the row at ``c`` with its start moved by n. Rows within reach of an end (either the
    row computed or the row moved there) are computed directly.
    """
    nk = centre_t.size
    whole, frac = np.divmod(keys.astype(np.int64), SHIFT_STEPS)
    fracs, which = np.unique(frac, return_inverse=True)
    s0, w0 = psf_rows((centre_t[None, :] + fracs[:, None] / SHIFT_STEPS).ravel(), n_t, psf, width)
    taps = w0.shape[1]
    s0 = s0.reshape(fracs.size, nk)[which]
    w = w0.reshape(fracs.size, nk, taps)[which]
    start = s0 + whole[:, None]

    def inside(st):
        return (st >= 1) & (st + taps <= n_t - 1)

    redo = ~(inside(s0) & inside(start))
    if redo.any():
        g, k = np.nonzero(redo)
        s1, w1 = psf_rows(centre_t[k] + keys[g] / SHIFT_STEPS, n_t, psf, width)
        start[g, k] = s1
        w[g, k] = w1
    return start, w


def _per_slice(positions, n, sigma):
    """One in-plane PSF matrix (n_samples x n) per slice, or a single one when every slice's rows agree."""
    if np.ptp(positions[:, 0]) <= 1e-9:
        return Banded.from_psf(positions[0], n, "gaussian", sigma)
    return [Banded.from_psf(row, n, "gaussian", sigma) for row in positions]


__all__ = ["PRE_SHEAR_MAX_DEG", "SHIFT_STEPS", "SKEW_MAX_DRIFT_VOXELS", "SkewOperator", "pre_shear_voxels",
           "skew_drift_voxels", "skew_path_applies"]
