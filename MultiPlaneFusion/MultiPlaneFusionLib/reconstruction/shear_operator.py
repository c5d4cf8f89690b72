"""Forward model of stacks slightly rotated against the grid: three 1-D shears, then the banded PSF.

A stack whose axes are close to the grid axes (registration leaves 0.02-5 degrees; oblique MR planned a few
degrees off) is modelled on a lattice that is the grid itself, rotated onto the stack frame: same node spacing
as the grid along each axis. The map from lattice indices to grid indices is then a signed permutation times a
matrix ``N`` close to the identity (a rotation for an isotropic grid), and ``N`` factors exactly into three
shears, ``N = S_a S_b S_c``, each of which moves nodes along ONE grid axis by an amount linear in the other two
coordinates (Toffoli and Quick's three-shear rotation in 3-D; solved numerically here, any axis order that
factors is accepted, the one with the smallest shears kept). Each shear is a 1-D resampling of whole grid lines
by a per-line constant sub-voxel shift, with a 6-tap Lanczos-3 kernel (windowed sinc, normalised; interpolating),
so the lattice holds the grid's image at the rotated nodes far more faithfully than trilinear interpolation,
and its exact transpose is the same line shifts backwards (a gather, no scatter). The PSF and sampling along
the lattice axes are the general path's 1-D banded matrices (through-plane along the slice normal, in-plane
per slice for gantry-tilted series), so sheared + rotated stacks are covered too.

At zero rotation every shift is an integer and the model is the separable path's, node for node. See
:func:`shear_factors` for which stacks qualify (``make_operator`` decides by angle).
"""

import itertools
import math

import numpy as np

from ..transforms import stack_frame
from .general_operator import GeneralOperator, LatticeInterpolation
from .parallel import run_shared
from .stack_operator import grid_axes, grid_spacing_kji

# Largest rotation (degrees, from the nearest signed axis permutation) that make_operator sends down the shear
# path: the shears grow the intermediate boxes by about tan(angle) x the grid size per pass, so beyond this the
# memory and time exceed the trilinear path's (measured on the real gantry-tilted series, see the README).
# shear_factors refuses larger angles.
SHEAR_MAX_DEG = 12.0
# Interpolation kernel of the shears: Lanczos-3 (6 taps), each line's weights normalised to sum 1 (still
# interpolating: an integer shift copies). Keys' cubic (4 taps) left 13 % more model residual than the
# aligned path at 0.5 degree, where the skull sits half a node off; see bench_rotated.py and the README.
_TAPS = (-2, -1, 0, 1, 2, 3)


def _lanczos3(x):
    x = np.asarray(x, float)
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


def _shear(axis, coef):
    m = np.eye(3)
    for b in range(3):
        if b != axis:
            m[axis, b] = coef[b]
    return m


def _factor(n, order):
    """Coefficients (one row of 3 per pass, own entry 0) with ``S(order[0]) S(order[1]) ... = n``, or None."""
    free = [(s, b) for s, a in enumerate(order) for b in range(3) if b != a]

    def build(v):
        c = np.zeros((len(order), 3))
        for (s, b), val in zip(free, v):
            c[s, b] = val
        m = np.eye(3)
        for s, a in enumerate(order):
            m = m @ _shear(a, c[s])
        return c, m

    v = np.zeros(len(free))
    for _ in range(60):
        _, m = build(v)
        r = (m - n).ravel()
        if np.max(np.abs(r)) < 1e-14:
            break
        jac = np.empty((9, len(free)))
        for p in range(len(free)):
            dv = v.copy()
            dv[p] += 1e-7
            jac[:, p] = (build(dv)[1] - m).ravel() / 1e-7
        v = v - np.linalg.lstsq(jac, r, rcond=None)[0]
    c, m = build(v)
    if not np.allclose(m, n, atol=1e-11, rtol=0):
        return None
    return c


def _nearest_signed_permutation(lin):
    """(P, angle_deg): the signed permutation nearest the columns of ``lin`` and the rotation angle left."""
    p = np.zeros((3, 3))
    used = set()
    for col in np.argsort(-np.max(np.abs(lin), axis=0)):
        rows = [r for r in np.argsort(-np.abs(lin[:, col])) if r not in used]
        r = rows[0]
        used.add(r)
        p[r, col] = 1.0 if lin[r, col] > 0 else -1.0
    u = lin / np.linalg.norm(lin, axis=0)[None, :]
    r = u @ p.T
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1.0) / 2.0))))
    return p, angle


def rotation_off_grid_deg(stack, grid):
    """Angle (degrees) between the stack frame (row, column, normal after its transform) and the nearest
    signed permutation of the grid axes."""
    lin = grid_axes(grid).T @ stack_frame(stack)[:, ::-1]  # rows k, j, i; columns normal, column, row
    return _nearest_signed_permutation(lin)[1]


def shear_factors(lin):
    """Three-shear factorisation of the lattice -> grid index map ``lin`` (rows k, j, i; columns w, v, u).

    Returns ``(perm, order, coef)`` with ``lin = N @ perm``, ``N = S(order[0], coef[0]) ... S(order[3], coef[3])``
    and ``S(a, c) = I + e_a c``, or None when the rotation exceeds ``SHEAR_MAX_DEG`` or does not factor."""
    perm, angle = _nearest_signed_permutation(lin)
    if angle > SHEAR_MAX_DEG:
        return None
    n = lin @ perm.T
    best = None
    # Three row shears cannot make a general rotation (the last row of their product keeps a 1 on the
    # diagonal); four, with the first axis repeated last, can.
    # Every axis must have a pass of its own (it carries that axis's translation).
    orders = [o for o in itertools.product(range(3), repeat=4)
              if all(o[i] != o[i + 1] for i in range(3)) and len(set(o)) == 3]
    for order in orders:
        c = _factor(n, order)
        if c is not None and (best is None or np.abs(c).max() < np.abs(best[1]).max()):
            best = (order, c)
    if best is None:
        return None
    return perm, best[0], best[1]


class ShearStage:
    """One shear pass: ``out(p) = in(p + e_a (c . p + tau))`` on integer boxes, Lanczos-3 along axis a.

    ``lo_in``/``shape_in`` and ``lo_out``/``shape_out`` are the boxes (absolute integer coordinates) of the
    input and output arrays; output lines whose other coordinates fall outside the input box are zero.

    Two ways to apply it, the same numbers: by 2-D slabs of the arrays as they lie (``method="slabs"``,
    :meth:`_slab_pass`), or by lines gathered per integer shift (``"lines"``: a transposed copy, gathers and
    scatters, but few calls when the shift changes every few lines). ``"auto"`` takes slabs while their runs
    are long enough (``_SLAB_MIN_SAMPLES``)."""

    def __init__(self, axis, coef, tau, lo_in, shape_in, lo_out, shape_out, method="auto"):
        self.axis = axis
        self.shape_in = tuple(int(v) for v in shape_in)
        self.shape_out = tuple(int(v) for v in shape_out)
        others = [b for b in range(3) if b != axis]
        self.others = others
        grids = np.meshgrid(*[lo_out[b] + np.arange(shape_out[b]) for b in others], indexing="ij")
        shift = coef[others[0]] * grids[0] + coef[others[1]] * grids[1] + tau
        base = np.floor(shift)
        frac = (shift - base).ravel()
        # input index along a of tap t for output index i: i + d + t
        d = (base.astype(np.int64) + lo_out[axis] - lo_in[axis]).ravel()
        rin = [grids[x] - lo_in[b] for x, b in enumerate(others)]
        ok = ((rin[0] >= 0) & (rin[0] < shape_in[others[0]]) & (rin[1] >= 0) & (rin[1] < shape_in[others[1]])).ravel()
        line_in = (np.clip(rin[0], 0, shape_in[others[0]] - 1) * shape_in[others[1]]
                   + np.clip(rin[1], 0, shape_in[others[1]] - 1)).ravel()
        self.weights = np.stack([_lanczos3(t - frac) for t in _TAPS], axis=1)  # (lines, taps)
        self.weights /= self.weights.sum(axis=1, keepdims=True)
        # Lines grouped by their integer shift: one gather, one slice product per tap and one store per group.
        self.groups = []
        lines = np.nonzero(ok)[0]
        order = np.argsort(d[lines], kind="stable")
        lines = lines[order]
        if lines.size:
            dv = d[lines]
            cut = np.nonzero(np.diff(dv))[0] + 1
            for part in np.split(np.arange(lines.size), cut):
                sel = lines[part]
                self.groups.append((int(dv[part[0]]), sel, line_in[sel]))
        self._cast = {}
        if method not in ("auto", "slabs", "lines"):
            raise ValueError(f"unknown method '{method}'")
        self._slabs = None
        if method != "lines":
            self._slabs = _slab_plan(axis, others, d, ok, self.shape_in, self.shape_out, lo_in, lo_out,
                                     min_samples=1 if method == "slabs" else _SLAB_MIN_SAMPLES)
        # Lines along the slab's inner axis all alike (no shear along it, as in the skew path's pre-shear): each
        # slab is one banded matrix product (_banded_run).
        self._uniform = self._slabs is not None and float(coef[self._slabs[1]]) == 0.0

    def _w(self, dt):
        key = np.dtype(dt)
        if key not in self._cast:
            self._cast[key] = self.weights.astype(dt)
        return self._cast[key]

    def _lines(self, a, shape):
        """View of ``a`` (box ``shape``) as (lines, n_a), lines in the order of the other axes."""
        return np.ascontiguousarray(np.moveaxis(a, self.axis, -1)).reshape(-1, shape[self.axis])

    def _unlines(self, a2, shape):
        sh = [shape[b] for b in self.others] + [shape[self.axis]]
        return np.moveaxis(a2.reshape(sh), -1, self.axis)

    def forward(self, x, workers=None):
        if self._slabs is not None:
            return self._slab_pass(x, workers, adjoint=False)
        dt = x.dtype
        x2 = self._lines(x, self.shape_in)
        n_in, n_out = self.shape_in[self.axis], self.shape_out[self.axis]
        out2 = np.zeros((int(np.prod(self.shape_out)) // n_out, n_out), dtype=dt)
        w = self._w(dt)

        def run(groups):
            for d, sel, rows in groups:
                g = x2[rows]
                acc = np.zeros((sel.size, n_out), dtype=dt)
                ws = w[sel]
                for t_i, t in enumerate(_TAPS):
                    i0, i1 = max(0, -(d + t)), min(n_out, n_in - d - t)
                    if i1 > i0:
                        acc[:, i0:i1] += ws[:, t_i, None] * g[:, i0 + d + t:i1 + d + t]
                out2[sel] = acc

        run_shared(self.groups, run, workers)
        return self._unlines(out2, self.shape_out)

    def adjoint(self, y, workers=None, out=None):
        """Transpose of :meth:`forward`; added to ``out`` (input-box shaped, C-contiguous, y's dtype) when
        given."""
        if self._slabs is not None:
            return self._slab_pass(y, workers, adjoint=True, out=out)
        if out is not None:
            out += self.adjoint(y, workers)
            return out
        dt = y.dtype
        y2 = self._lines(y, self.shape_out)
        n_in, n_out = self.shape_in[self.axis], self.shape_out[self.axis]
        x2 = np.zeros((int(np.prod(self.shape_in)) // n_in, n_in), dtype=dt)
        w = self._w(dt)

        def run(groups):
            for d, sel, rows in groups:
                g = y2[sel]
                acc = np.zeros((sel.size, n_in), dtype=dt)
                ws = w[sel]
                for t_i, t in enumerate(_TAPS):
                    i0, i1 = max(0, -(d + t)), min(n_out, n_in - d - t)
                    if i1 > i0:
                        acc[:, i0 + d + t:i1 + d + t] += ws[:, t_i, None] * g[:, i0:i1]
                x2[rows] = acc  # rows are distinct input lines

        run_shared(self.groups, run, workers)
        return self._unlines(x2, self.shape_in)

    def _slab_pass(self, a, workers, adjoint, out=None):
        """The stage (or its transpose) by 2-D slabs of the arrays as they lie (no transposed copies, no line
        gathers): per outer index, each run of lines with one integer shift is one strided view, and each tap
        one multiply-add with the lines' weights broadcast along the axis."""
        outer, inner, items, step = self._slabs
        axis = self.axis
        n_in, n_out = self.shape_in[axis], self.shape_out[axis]
        a = np.ascontiguousarray(a)
        dt = a.dtype
        w = self._w(dt)
        shape = self.shape_in if adjoint else self.shape_out
        if out is None:
            res = np.zeros(shape, dtype=dt)
        elif tuple(out.shape) != tuple(shape) or out.dtype != dt or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {dt} array of shape {tuple(shape)}")
        else:
            res = out  # accumulated into: every tap adds
        flip = axis > inner  # the 2-D views come as (inner, axis): transpose them to (axis, inner)

        def view(arr, o, q0, q1):
            idx = [slice(None)] * 3
            idx[outer] = o
            idx[inner] = slice(q0, q1)
            v = arr[tuple(idx)]
            return v.T if flip else v

        def run(part):
            for o_out, o_in, runs in part:
                for q0, q1, qi0, d, l0 in runs:
                    src = view(res if adjoint else a, o_in, qi0, qi0 + q1 - q0)
                    dst = view(a if adjoint else res, o_out, q0, q1)
                    ws = w[l0:l0 + (q1 - q0) * step:step]
                    if self._uniform:
                        _banded_run(src, dst, ws[0], d, n_in, n_out, adjoint)
                        continue
                    for t_i, t in enumerate(_TAPS):
                        s = d + t
                        i0, i1 = max(0, -s), min(n_out, n_in - s)
                        if i1 <= i0:
                            continue
                        if adjoint:
                            src[i0 + s:i1 + s] += dst[i0:i1] * ws[None, :, t_i]
                        else:
                            dst[i0:i1] += src[i0 + s:i1 + s] * ws[None, :, t_i]

        run_shared(items, run, workers)
        return res


# Rows per matrix product when a slab's lines all share one shift (_banded_run): each product then costs
# (rows + 5) / 6 times the multiply-adds needed, in one BLAS call.
_BANDED_ROWS = 32


def _banded_run(src, dst, w, d, n_in, n_out, adjoint):
    """One slab whose lines all share the integer shift ``d`` and the tap weights ``w``: ``dst = T src``
    (``src += T^T dst`` when ``adjoint``), with T the (n_out x n_in) band ``T[i, i + d + t] = w[t]``, applied in
    row blocks of ``_BANDED_ROWS`` as matrix products (2-D views, the axis first)."""
    rows = min(_BANDED_ROWS, n_out)
    band = np.zeros((rows, rows + len(_TAPS) - 1), dtype=dst.dtype)
    r = np.arange(rows)
    for t_i in range(len(_TAPS)):
        band[r, r + t_i] = w[t_i]
    for r0 in range(0, n_out, rows):
        r1 = min(r0 + rows, n_out)
        c0 = r0 + d + _TAPS[0]
        c1 = r1 + d + _TAPS[-1]
        cc0, cc1 = max(c0, 0), min(c1, n_in)
        if cc1 <= cc0:
            continue
        b = band[:r1 - r0, cc0 - c0:cc1 - c0]
        if adjoint:
            src[cc0:cc1] += b.T @ dst[r0:r1]
        else:
            dst[r0:r1] = b @ src[cc0:cc1]


# A stage runs by slabs (ShearStage._slab_pass) when its runs of equal integer shift hold at least this many
# output samples on average: below that the per-call overhead of the many small views outweighs the copies saved.
_SLAB_MIN_SAMPLES = 8192


def _slab_plan(axis, others, d, ok, shape_in, shape_out, lo_in, lo_out, min_samples=_SLAB_MIN_SAMPLES):
    """``(outer, inner, items, step)`` for :meth:`ShearStage._slab_pass`, or None when the runs are too short.

    ``d`` and ``ok`` are per output line (flattened over ``others``); the outer axis is never the contiguous
    one (axis 2) unless the stage runs along it. Each item is ``(o_out, o_in, runs)`` with runs
    ``(q0, q1, qi0, d, l0)``: output inner range, its input start, the integer shift, the first line's index;
    ``step`` is the line index's step along the inner axis."""
    n_o = [int(shape_out[b]) for b in others]
    d2 = d.reshape(n_o)
    ok2 = ok.reshape(n_o)
    choices = [(0, 1), (1, 0)] if axis == 2 else [(b, 2) for b in others if b != 2]
    best = None
    for outer, inner in choices:
        pos = others.index(outer)
        dd = d2 if pos == 0 else d2.T
        oo = ok2 if pos == 0 else ok2.T
        items, n_runs = [], 0
        for o in range(dd.shape[0]):
            q = np.nonzero(oo[o])[0]
            if q.size == 0:
                continue
            # Valid inner indices form one contiguous range (box intersection); split it where d changes.
            cut = np.nonzero(np.diff(dd[o, q]))[0] + 1
            runs = []
            for part in np.split(q, cut):
                q0, q1 = int(part[0]), int(part[-1]) + 1
                line = (o * n_o[1] + q0) if pos == 0 else (q0 * n_o[1] + o)
                runs.append((q0, q1, q0 + int(lo_out[inner] - lo_in[inner]), int(dd[o, q0]), line))
            items.append((o, o + int(lo_out[outer] - lo_in[outer]), runs))
            n_runs += len(runs)
        if n_runs and (best is None or n_runs < best[0]):
            best = (n_runs, outer, inner, items, pos)
    if best is None:
        return None
    n_runs, outer, inner, items, pos = best
    samples = int(np.count_nonzero(ok)) * int(shape_out[axis])
    if samples / n_runs < min_samples:
        return None
    return outer, inner, items, 1 if pos == 0 else n_o[1]


class _ShearInterp(LatticeInterpolation):
    """Grid -> lattice by three shears (one chunk, the whole lattice)."""

    def __init__(self, lattice, grid, factors):
        self.grid_shape = tuple(int(v) for v in grid.shape)
        g0, lin = lattice.index_affine(grid)
        perm, order, coef = factors
        self.perm = perm
        lat_shape = lattice.shape  # (w, v, u)
        # Lattice box in grid-ordered coordinates q' = perm @ q.
        lo3 = np.zeros(3, dtype=np.int64)
        hi3 = np.zeros(3, dtype=np.int64)
        self.view_axes = [0, 0, 0]
        self.flips = []
        for row in range(3):
            col = int(np.nonzero(perm[row])[0][0])
            sign = perm[row, col]
            n = lat_shape[col]
            lo3[row], hi3[row] = (0, n - 1) if sign > 0 else (-(n - 1), 0)
            self.view_axes[col] = row
            if sign < 0:
                self.flips.append(col)
        ns = len(order)
        # Translations along each stage's own axis: g0 = sum_s S_0 .. S_{s-1} tau_s e_{order[s]}.
        e = np.eye(3)
        cols, m = [], np.eye(3)
        for s in range(ns):
            cols.append(m @ e[order[s]])
            m = m @ _shear(order[s], coef[s])
        # One pass per axis carries the offset (the first along it): split over two passes, an integer offset
        # would become two half-node shifts and blur the aligned case.
        first = [order.index(a) for a in range(3)]
        taus = np.zeros(ns)
        taus[first] = np.linalg.solve(np.stack([cols[s] for s in first], axis=1), g0)
        # Boxes from the lattice back to the grid: stage s maps box s+1 (its output) from box s (its input).
        boxes = [None] * ns + [(lo3, hi3)]
        for s in range(ns - 1, -1, -1):
            a = order[s]
            lo, hi = boxes[s + 1]
            corners = np.array(list(itertools.product(*zip(lo, hi))), dtype=float)
            pos = corners[:, a] + corners @ coef[s] + taus[s]
            lo_in, hi_in = lo.copy(), hi.copy()
            lo_in[a] = int(math.floor(pos.min())) + _TAPS[0]
            hi_in[a] = int(math.floor(pos.max())) + _TAPS[-1]
            boxes[s] = (lo_in, hi_in)
        grid_box = (np.zeros(3, dtype=np.int64), np.asarray(self.grid_shape, dtype=np.int64) - 1)
        boxes[0] = grid_box
        self.stages = []
        for s in range(ns):
            lo_in, hi_in = boxes[s]
            lo_out, hi_out = boxes[s + 1]
            self.stages.append(ShearStage(order[s], coef[s], taus[s], lo_in, hi_in - lo_in + 1,
                                      lo_out, hi_out - lo_out + 1))
        self.chunk_axis = 2  # u
        self.ranges = [(0, lat_shape[2])]
        self.box_voxels = [int(np.prod(b[1] - b[0] + 1)) for b in boxes[1:]]

    def _to_lattice(self, v3):
        z = np.transpose(v3, [self.view_axes[c] for c in range(3)])
        for c in self.flips:
            z = np.flip(z, axis=c)
        return z

    def forward_chunks(self, x, workers=None):
        a = x
        for st in self.stages:
            a = st.forward(a, workers)
        yield 0, self._to_lattice(a)

    def adjoint_chunks(self, pairs, dt, workers=None, out=None):
        z = None
        for _, zc in pairs:
            z = np.asarray(zc, dtype=dt)
        for c in self.flips:
            z = np.flip(z, axis=c)
        inv = [0, 0, 0]
        for c in range(3):
            inv[self.view_axes[c]] = c
        a = np.transpose(z, inv)
        for st in reversed(self.stages):
            a = st.adjoint(a, workers)
        if out is None:
            return np.ascontiguousarray(a)
        out += a
        return out


class ShearOperator(GeneralOperator):
    """A slightly rotated (possibly sheared) stack: the grid resampled onto a rotated copy of itself by three
    Lanczos-3 shears, then the general path's 1-D PSF matrices (module docstring)."""

    path = "shear"

    def __init__(self, stack, grid, psf="gaussian"):
        self._factors = None
        super().__init__(stack, grid, psf, shared_axis=None)

    def _lattice_steps(self, steps, frame):
        # Node spacing along each frame axis = the spacing of the grid axis it (nearly) follows.
        h = grid_spacing_kji(self.grid)
        cos = np.abs(grid_axes(self.grid).T @ frame)  # rows grid k, j, i; columns u, v, w
        return [float(h[int(np.argmax(cos[:, a]))]) for a in range(3)]

    def _adjust_lattice(self, lattice):
        # Move the lattice (by under one node, one node added per axis) so that node 0 falls on a grid node:
        # at zero rotation every shift is then an integer and the model is the separable path's.
        g0, lin = lattice.index_affine(self.grid)
        delta = np.linalg.solve(lin, np.round(g0) - g0) - 1.0  # canonical (w, v, u) node units
        starts = lattice.starts + lattice.steps * delta[::-1]
        sizes = [n + 2 for n in lattice.sizes]
        return type(lattice)(lattice.p0, lattice.frame, starts, lattice.steps, sizes)

    def _make_interp(self):
        _, lin = self.lattice.index_affine(self.grid)
        factors = shear_factors(lin)
        if factors is None:
            raise ValueError(f"'{self.stack.description}' is too far from the grid axes for the shear path")
        self._factors = factors
        return _ShearInterp(self.lattice, self.grid, factors)

    def describe(self):
        d = super().describe()
        d["interpolation"] = "Lanczos-3 shears"
        d["shear_boxes_voxels"] = self._interp.box_voxels
        return d


def shear_path_applies(stack, grid):
    """True when :class:`ShearOperator` can model ``stack`` (rotation from the grid axes <= SHEAR_MAX_DEG)."""
    return rotation_off_grid_deg(stack, grid) <= SHEAR_MAX_DEG
