"""Solvers for regularised least squares on the reconstruction grid.

The problem is ``min_x sum_k c_k ||A_k x - y_k||^2 + alpha R(x)`` with R a first-order penalty on the
forward differences ``D_a x / h_a`` (a = k, j, i; h_a the grid spacing in mm):

- Tikhonov (TK1): ``R(x) = sum_v sum_a (D_a x)_v^2 / h_a^2``; the normal equations
  ``(sum_k c_k A_k^T A_k + alpha L) x = sum_k c_k A_k^T y_k`` (L = sum_a D_a^T D_a / h_a^2, Neumann
  boundary) are solved by preconditioned conjugate gradients (:func:`conjugate_gradient`);
- Huber on the gradient magnitude (edge-preserving): ``R(x) = sum_v rho_delta(|grad x|_v)``, with
  rho(g) = g^2 for g <= delta, 2 delta g - delta^2 beyond; minimised by iteratively reweighted least
  squares (half-quadratic): each outer step solves the TK1 system with per-voxel weights
  ``w_v = min(1, delta / |grad x|_v)`` by a few warm-started CG iterations (:func:`solve_huber`).

Arrays are float32 on the grid; inner products are accumulated in float64 chunk by chunk.
"""

import contextlib
import ctypes
import logging
import os
import sys

import numpy as np

from .operators import gaussian_blur

LOGGER = logging.getLogger("MultiPlaneFusionLib")

# OpenBLAS thread-count entry points under the names its builds export (plain, 64-bit-integer, and the
# scipy-openblas build numpy wheels ship).
_OPENBLAS_API = [
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
]


def _loaded_openblas():
    """(get, set) function pairs of the OpenBLAS libraries loaded in this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return []
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(" ")[-1]
                if "openblas" in os.path.basename(path).lower():
                    paths.add(path)
    except OSError:
        return []
    found = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _OPENBLAS_API:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                found.append((getattr(lib, get_name), getattr(lib, set_name)))
                break
    return found


@contextlib.contextmanager
def blas_threads(n):
    """Run the block with OpenBLAS limited to ``n`` threads (best effort; a no-op elsewhere).

    The operators issue thousands of small matrix products per solve; OpenBLAS's threads synchronise on
    each, which on a busy machine made them 5x slower than one thread (measured by bench_srr.py).
    """
    pairs = []
    try:
        for get, set_ in _loaded_openblas():
            old = int(get())
            set_(int(n))
            pairs.append((set_, old))
    except Exception:  # noqa: BLE001 - never fail a reconstruction over a thread setting
        LOGGER.debug("could not limit BLAS threads", exc_info=True)
    try:
        yield
    finally:
        for set_, old in pairs:
            with contextlib.suppress(Exception):
                set_(old)

_DOT_CHUNK = 1 << 18


def dot(a, b):
    """Inner product of two equally shaped arrays: BLAS per chunk, chunks summed in float64 (float32
    accumulation over a whole 10^7-voxel volume would lose digits CG needs)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for s in range(0, fa.size, _DOT_CHUNK):
        total += float(np.dot(fa[s : s + _DOT_CHUNK], fb[s : s + _DOT_CHUNK]))
    return total


_SLAB_VOXELS = 1 << 18


def _edge_terms(d, w, c):
    """d * w * c in place (w may be None); returns d."""
    d *= c
    if w is not None:
        d *= w
    return d


def difference_penalty(x, spacing_kji, weights=None, out=None, scale=1.0):
    """``out += scale * L_w x`` with ``L_w = sum_a D_a^T diag(w) D_a / h_a^2`` (Neumann boundary).

    Computed slab by slab along axis 0 (cache-sized temporaries).

    Parameters
    ----------
    x : ndarray, shape (nk, nj, ni)
    spacing_kji : (float, float, float)
        Grid spacing along the array axes, mm.
    weights : ndarray, shape x.shape, optional
        Weight of the forward differences starting at each voxel (Huber IRLS); 1 if None.
    out : ndarray, optional
        Accumulator (zeros allocated when None).
    scale : float
        Multiplies the penalty (alpha).
    """
    if out is None:
        out = np.zeros_like(x)
    nk, nj, ni = x.shape
    dt = x.dtype.type
    c = [dt(scale / (h * h)) for h in spacing_kji]
    per = max(1, _SLAB_VOXELS // max(nj * ni, 1))
    for k0 in range(0, nk, per):
        k1 = min(nk, k0 + per)
        xs = x[k0:k1]
        os_ = out[k0:k1]
        ws = None if weights is None else weights[k0:k1]
        # axis 0: differences (x[k+1] - x[k]) for k in [k0, k1) that exist, and the one entering from k0-1
        if nk > 1:
            top = min(k1, nk - 1)
            if top > k0:
                d = np.subtract(x[k0 + 1 : top + 1], x[k0:top])
                _edge_terms(d, None if weights is None else weights[k0:top], c[0])
                os_[: top - k0] -= d
                out[k0 + 1 : top + 1] += d
        # axes 1 and 2 inside the slab
        if nj > 1:
            d = np.subtract(xs[:, 1:], xs[:, :-1])
            _edge_terms(d, None if ws is None else ws[:, :-1], c[1])
            os_[:, :-1] -= d
            os_[:, 1:] += d
        if ni > 1:
            d = np.subtract(xs[:, :, 1:], xs[:, :, :-1])
            _edge_terms(d, None if ws is None else ws[:, :, :-1], c[2])
            os_[:, :, :-1] -= d
            os_[:, :, 1:] += d
    return out


def penalty_diagonal(shape, spacing_kji, weights=None, dtype=np.float32, out=None, scale=1.0):
    """``out += scale * diag(L_w)`` (for the Jacobi preconditioner); zeros allocated when ``out`` is None."""
    diag = np.zeros(shape, dtype=dtype) if out is None else out
    for a, h in enumerate(spacing_kji):
        n = shape[a]
        if n < 2:
            continue
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(0, n - 1), slice(1, n)
        c = diag.dtype.type(scale / (h * h))
        if weights is None:
            diag[tuple(lo)] += c
            diag[tuple(hi)] += c
        else:
            w = weights[tuple(lo)] * c
            diag[tuple(lo)] += w
            diag[tuple(hi)] += w
            del w
    return diag


def gradient_magnitude(x, spacing_kji):
    """|grad x| from forward differences (0 across the far boundary), same shape as x.

    Slab by slab along axis 0, so the temporaries stay cache-sized."""
    nk, nj, ni = x.shape
    g = np.empty_like(x)
    c = [x.dtype.type(1.0 / (h * h)) for h in spacing_kji]
    per = max(1, _SLAB_VOXELS // max(nj * ni, 1))
    for k0 in range(0, nk, per):
        k1 = min(nk, k0 + per)
        gs = g[k0:k1]
        gs[...] = 0
        xs = x[k0:k1]
        top = min(k1, nk - 1)
        if top > k0:
            d = np.subtract(x[k0 + 1 : top + 1], x[k0:top])
            np.multiply(d, d, out=d)
            d *= c[0]
            gs[: top - k0] += d
        if nj > 1:
            d = np.subtract(xs[:, 1:], xs[:, :-1])
            np.multiply(d, d, out=d)
            d *= c[1]
            gs[:, :-1] += d
        if ni > 1:
            d = np.subtract(xs[:, :, 1:], xs[:, :, :-1])
            np.multiply(d, d, out=d)
            d *= c[2]
            gs[:, :, :-1] += d
        np.sqrt(gs, out=gs)
    return g


def huber_weights(x, spacing_kji, delta, edge_scale_mm=0.0):
    """IRLS weights ``min(1, delta / |grad x|)`` of the Huber penalty, float32, shape x.shape.

    ``edge_scale_mm > 0`` measures the gradient on ``x`` blurred by a Gaussian of that sigma (the
    "regularised" edge indicator of Catte et al.): noise on a fine grid then no longer passes for edges,
    and the edge test means the same whatever the grid spacing.
    """
    if edge_scale_mm and edge_scale_mm > 0:
        g = gradient_magnitude(gaussian_blur(x, spacing_kji, edge_scale_mm), spacing_kji)
    else:
        g = gradient_magnitude(x, spacing_kji)
    np.maximum(g, np.float32(delta), out=g)
    np.divide(np.float32(delta), g, out=g)
    return g


def _slabs(n, per=_DOT_CHUNK):
    return [(s, min(n, s + per)) for s in range(0, n, per)]


def conjugate_gradient(
    apply_h, b, x, precond_inv=None, max_iterations=20, tolerance=1e-3, b_norm=None, report=None,
    overwrite_b=False, residual=None, keep_residual=False,
):
    """Preconditioned conjugate gradients for ``H x = b`` (H symmetric positive definite), in place.

    The vector updates are fused and run chunk by chunk (cache-sized), so an iteration costs one
    ``apply_h`` plus about ten streaming passes over the volume; memory: x, r, p and H p.

    Parameters
    ----------
    apply_h : callable
        ``apply_h(p) -> H p`` (a new array).
    b : ndarray
        Right-hand side; not modified.
    x : ndarray
        Initial guess, overwritten by the solution.
    precond_inv : ndarray, optional
        Inverse diagonal preconditioner (Jacobi), same shape as x.
    max_iterations : int
    tolerance : float
        Stop when ``||b - H x|| <= tolerance * ||b||`` (relative residual).
    b_norm : float, optional
        ``||b||`` if already known.
    report : callable, optional
        ``report(iteration, relative_residual)`` after every iteration (progress, cancellation).
    overwrite_b : bool
        Use the memory of ``b`` for the residual (b is destroyed; one grid copy less).
    residual : ndarray, optional
        ``b - H x`` when the caller already has it (its memory is used and overwritten): saves the
        ``apply_h`` that computing it costs.
    keep_residual : bool
        Return the final residual as ``info["residual"]`` (for a caller that changes H slightly and
        continues, see :func:`solve_huber`).

    Returns
    -------
    dict
        ``iterations``, ``relative_residual`` (final), ``initial_relative_residual``, ``history``.
    """
    if b_norm is None:
        b_norm = np.sqrt(dot(b, b))
    b_norm = max(b_norm, 1e-30)
    if residual is not None:
        r = residual
    elif overwrite_b:
        r = b
        t = apply_h(x)
        r -= t
        del t
    else:
        r = apply_h(x)
        np.subtract(b, r, out=r)
    rr = dot(r, r)
    rel0 = np.sqrt(rr) / b_norm
    history = [float(rel0)]
    info = {"iterations": 0, "relative_residual": float(rel0), "initial_relative_residual": float(rel0),
            "history": history}
    if keep_residual:
        info["residual"] = r
    if rel0 <= tolerance or max_iterations <= 0:
        return info
    fx, fr = x.reshape(-1), r.reshape(-1)
    fm = None if precond_inv is None else precond_inv.reshape(-1)
    slabs = _slabs(fx.size)
    p = r * precond_inv if precond_inv is not None else r.copy()
    fp = p.reshape(-1)
    rz = dot(r, p)
    dt = x.dtype.type
    it = 0
    rel = rel0
    while it < max_iterations:
        q = apply_h(p)
        fq = q.reshape(-1)
        pq = dot(p, q)
        if not pq > 0:  # H lost definiteness numerically: stop with what we have
            break
        step = dt(rz / pq)
        rr = 0.0
        rz_new = 0.0
        for s0, s1 in slabs:
            xs, rs, ps, qs = fx[s0:s1], fr[s0:s1], fp[s0:s1], fq[s0:s1]
            qs *= step
            rs -= qs
            np.multiply(ps, step, out=qs)  # q is scratch from here on
            xs += qs
            rr += float(np.dot(rs, rs))
            if fm is not None:
                np.multiply(rs, fm[s0:s1], out=qs)
                rz_new += float(np.dot(rs, qs))
        if fm is None:
            rz_new = rr
        it += 1
        rel = np.sqrt(rr) / b_norm
        history.append(float(rel))
        if report is not None:
            report(it, float(rel))
        if rel <= tolerance or it >= max_iterations:
            break
        beta = dt(rz_new / rz)
        for s0, s1 in slabs:
            ps, qs = fp[s0:s1], fq[s0:s1]
            ps *= beta
            if fm is not None:
                np.multiply(fr[s0:s1], fm[s0:s1], out=qs)
                ps += qs
            else:
                ps += fr[s0:s1]
        rz = rz_new
        del q, fq
    info.update(iterations=it, relative_residual=float(rel))
    return info


class NormalEquations:
    """``H x = sum_k c_k A_k^T A_k x + alpha L_w x`` and its Jacobi preconditioner.

    Parameters
    ----------
    operators : list of StackOperator
    data_weights : list of float
        c_k per operator.
    alpha : float
    spacing_kji : (float, float, float)
    data_row_sums : ndarray
        ``sum_k c_k A_k^T 1`` (absolute row sums of the data term, all entries are non-negative).
    """

    def __init__(self, operators, data_weights, alpha, spacing_kji, data_row_sums):
        self.operators = operators
        self.data_weights = [float(c) for c in data_weights]
        self.alpha = float(alpha)
        self.spacing = tuple(float(h) for h in spacing_kji)
        self.data_row_sums = data_row_sums
        self.weights = None  # Huber IRLS weights (None: Tikhonov)

    def __call__(self, x):
        out = None
        for op, c in zip(self.operators, self.data_weights):
            t = op.normal(x)
            if t.dtype != x.dtype:
                t = t.astype(x.dtype)
            if out is None:
                out = t
                out *= np.float32(c)
            else:
                t *= np.float32(c)
                out += t
            del t
        if out is None:
            out = np.zeros_like(x)
        if self.alpha > 0:
            difference_penalty(x, self.spacing, self.weights, out=out, scale=self.alpha)
        return out

    def preconditioner(self, consume=False):
        """Inverse of the absolute row sums of H (data: c A^T 1; penalty: 2 x its diagonal).

        ``consume=True`` computes it in the memory of ``data_row_sums`` (one grid copy less; the system
        cannot make another preconditioner afterwards)."""
        if consume:
            d, self.data_row_sums = self.data_row_sums, None
        else:
            d = self.data_row_sums.copy()
        penalty_diagonal(d.shape, self.spacing, self.weights, out=d, scale=2.0 * self.alpha)
        np.maximum(d, np.float32(1e-12), out=d)
        return np.divide(np.float32(1.0), d, out=d)


def solve_tikhonov(system, b, x, max_iterations=20, tolerance=1e-3, report=None, overwrite=False):
    """TK1: preconditioned CG on the normal equations, warm-started from ``x`` (overwritten).

    ``overwrite=True`` reuses the memory of ``b`` and of the system's row sums (two grid copies less).
    """
    system.weights = None
    info = conjugate_gradient(system, b, x, system.preconditioner(consume=overwrite), max_iterations, tolerance,
                              report=report, overwrite_b=overwrite)
    LOGGER.info(
        "SRR (TK1, alpha %.4g): %d CG iterations, relative residual %.3g -> %.3g",
        system.alpha, info["iterations"], info["initial_relative_residual"], info["relative_residual"],
    )
    return info


def solve_huber(system, b, x, delta, outer_iterations=3, max_iterations=9, tolerance=1e-3, report=None,
                edge_scale_mm=0.0):
    """Huber-on-gradient by IRLS: ``outer_iterations`` reweightings, CG inside (in total at most
    ``max_iterations`` CG iterations, split evenly). ``x`` (the warm start) is overwritten.

    The first outer step uses the weights of the warm start, so edges present in the initial estimate
    are preserved from the beginning. Between reweightings only the penalty part of H changes, so the
    residual is carried over and corrected by ``alpha (L_old - L_new) x`` (two penalty applications
    instead of a full ``H x``: the data terms are most of an iteration's cost), and so is the Jacobi
    preconditioner. ``b`` and the system's row sums are overwritten.
    """
    outer_iterations = max(1, int(outer_iterations))
    inner = max(1, int(np.ceil(max_iterations / outer_iterations)))
    total = 0
    infos = []
    residual = None
    precond = None
    b_norm = np.sqrt(dot(b, b))
    a2 = 2.0 * system.alpha
    for o in range(outer_iterations):
        if precond is None:
            system.weights = huber_weights(x, system.spacing, delta, edge_scale_mm)
            # In the row sums' memory: later steps update it for the new weights instead of keeping the
            # row sums (one grid copy less at the peak).
            precond = system.preconditioner(consume=True)
        else:
            # Only the penalty part of H changes: take the old weights' share out of the residual and of
            # the preconditioner's diagonal, free them, then put the new weights' share in.
            d = np.divide(np.float32(1.0), precond, out=precond)
            if system.alpha > 0:
                difference_penalty(x, system.spacing, system.weights, out=residual, scale=system.alpha)
                penalty_diagonal(d.shape, system.spacing, system.weights, out=d, scale=-a2)
            system.weights = None
            system.weights = huber_weights(x, system.spacing, delta, edge_scale_mm)
            if system.alpha > 0:
                difference_penalty(x, system.spacing, system.weights, out=residual, scale=-system.alpha)
                penalty_diagonal(d.shape, system.spacing, system.weights, out=d, scale=a2)
            np.maximum(d, np.float32(1e-12), out=d)
            precond = np.divide(np.float32(1.0), d, out=d)

        def inner_report(it, rel, _done=total):
            if report is not None:
                report(_done + it, rel)

        # The first step computes the residual in b's memory (b is not needed after it: later steps carry the
        # residual), one grid copy less at the peak.
        info = conjugate_gradient(system, b, x, precond, inner, tolerance, b_norm=b_norm,
                                  report=inner_report, overwrite_b=residual is None, residual=residual,
                                  keep_residual=o + 1 < outer_iterations)
        residual = info.pop("residual", None)
        total += info["iterations"]
        infos.append(info)
        LOGGER.info(
            "SRR (Huber, alpha %.4g, delta %.4g) outer %d/%d: %d CG iterations, relative residual %.3g",
            system.alpha, delta, o + 1, outer_iterations, info["iterations"], info["relative_residual"],
        )
    system.weights = None
    return {
        "iterations": total,
        "outer_iterations": outer_iterations,
        "relative_residual": infos[-1]["relative_residual"],
        "initial_relative_residual": infos[0]["initial_relative_residual"],
        "history": [h for i in infos for h in i["history"]],
    }
