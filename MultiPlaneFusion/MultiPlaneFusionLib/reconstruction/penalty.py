"""The first-order penalty on the grid, ``R(x) = sum_v sum_a w_v (D_a x)_v^2 / h_a^2``, and the Huber weights.

Forward differences ``D_a`` along the array axes a = k, j, i (h_a the grid spacing in mm, Neumann boundary):
:func:`difference_penalty` applies the weighted operator ``L_w = sum_a D_a^T W D_a / h_a^2`` (optionally with
the inner product the conjugate gradients need, in the same pass), :func:`penalty_diagonal` its diagonal (the
Jacobi preconditioner's share), :func:`gradient_magnitude` and :func:`huber_weights` the weights
``w_v = min(1, delta / |grad x|_v)`` of the Huber IRLS (with a floor for the hybrid prior, see
:func:`hybrid_split`). Everything runs slab by slab along axis 0, in cache, split between the workers
(:mod:`.parallel`). Used by :mod:`.solvers`.
"""

import numpy as np

from .parallel import row_slabs as _row_slabs
from .smoothing import GaussianBlur


class _PenaltyCoefficients:
    """``c_a = scale / h_a^2`` per axis; weights are multiplied by ``c_ref`` (axis 2's) once per slab and an
    axis whose ``c`` differs (anisotropic grid) by ``ratio[a]`` as well."""

    def __init__(self, spacing_kji, scale, dtype):
        self.dt = np.dtype(dtype).type
        self.c = [float(scale) / (h * h) for h in spacing_kji]
        self.c_ref = self.c[2]
        self.ratio = [None if ck == self.c_ref else self.dt(ck / self.c_ref) for ck in self.c]

    def weigh(self, d, w, axis):
        """``d * c_axis * w`` in place (``w`` already scaled by ``c_ref``, or None for unit weights)."""
        if w is None:
            d *= self.dt(self.c[axis])
        else:
            d *= w
            if self.ratio[axis] is not None:
                d *= self.ratio[axis]
        return d


def _penalty_rows(x, wc, k0, k1, out, coef):
    """``out[k0:k1] += L_w x`` rows (scale folded into ``coef``); ``wc``: the weights of rows
    ``max(k0 - 1, 0)..k1-1`` times ``coef.c_ref``, or None. Writes only rows k0..k1-1."""
    nk, nj, ni = x.shape
    lo = max(k0 - 1, 0)
    xs = x[k0:k1]
    os_ = out[k0:k1]
    if nk > 1:
        # differences d_k = x[k+1] - x[k] for k in [lo, hi): those touching rows k0..k1-1
        hi = min(k1, nk - 1)
        if hi > lo:
            d = coef.weigh(np.subtract(x[lo + 1 : hi + 1], x[lo:hi]), None if wc is None else wc[: hi - lo], 0)
            n_own = min(k1, hi) - k0  # rows k (k0 <= k < hi) lose d_k
            if n_own > 0:
                os_[:n_own] -= d[k0 - lo : k0 - lo + n_own]
            a, b = max(k0 - 1, lo), min(k1 - 1, hi)  # rows k + 1 (inside the slab) gain d_k
            if b > a:
                out[a + 1 : b + 1] += d[a - lo : b - lo]
    wo = None if wc is None else wc[k0 - lo :]
    if nj > 1:
        d = coef.weigh(np.subtract(xs[:, 1:], xs[:, :-1]), None if wo is None else wo[:, :-1], 1)
        os_[:, :-1] -= d
        os_[:, 1:] += d
    if ni > 1:
        d = coef.weigh(np.subtract(xs[:, :, 1:], xs[:, :, :-1]), None if wo is None else wo[:, :, :-1], 2)
        os_[:, :, :-1] -= d
        os_[:, :, 1:] += d


def _diagonal_rows(wc, k0, k1, nk, out_rows, coef):
    """``out_rows += diag(L_w)`` of rows k0..k1-1 (``wc`` as for :func:`_penalty_rows`)."""
    lo = max(k0 - 1, 0)
    wo = wc[k0 - lo :]
    if nk > 1:
        r0 = 1.0 if coef.ratio[0] is None else coef.ratio[0]
        n_own = max(0, min(k1, nk - 1) - k0)  # rows with a difference to k + 1
        if n_own:
            out_rows[:n_own] += wo[:n_own] * coef.dt(r0)
        a = max(k0, 1)  # rows a..k1-1 have a difference from k - 1, weighted by w[k - 1]
        if k1 > a:
            out_rows[a - k0 :] += wc[a - 1 - lo : k1 - 1 - lo] * coef.dt(r0)
    for axis in (1, 2):
        if wo.shape[axis] > 1:
            sl_lo = [slice(None)] * 3
            sl_hi = [slice(None)] * 3
            sl_lo[axis], sl_hi[axis] = slice(0, -1), slice(1, None)
            t = wo[tuple(sl_lo)]
            if coef.ratio[axis] is not None:
                t = t * coef.ratio[axis]
            out_rows[tuple(sl_lo)] += t
            out_rows[tuple(sl_hi)] += t


def difference_penalty(x, spacing_kji, weights=None, out=None, scale=1.0, workers=None, dot_with=None):
    """``out += scale * L_w x`` with ``L_w = sum_a D_a^T diag(w) D_a / h_a^2`` (Neumann boundary).

    Computed slab by slab along axis 0 (cache-sized temporaries); each slab writes only its own rows (the
    difference across a slab boundary is computed by both neighbours), so slabs run on ``workers``.

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
    workers : parallel.Workers, optional
    dot_with : ndarray, shape x.shape, optional
        Also compute ``<dot_with, out>`` of the final ``out``, slab by slab while it is in cache (CG's
        ``<p, H p>``, saving a pass over two volumes); then ``(out, dot)`` is returned.

    Returns
    -------
    out, or (out, float) with ``dot_with``
    """
    if out is None:
        out = np.zeros_like(x)
    coef = _PenaltyCoefficients(spacing_kji, scale, x.dtype)

    def slab(k0, k1):
        lo = max(k0 - 1, 0)
        # weights of rows lo..k1-1 (the axis-0 differences need row lo), scaled once
        wc = None if weights is None else np.multiply(weights[lo:k1], coef.dt(coef.c_ref))
        _penalty_rows(x, wc, k0, k1, out, coef)
        if dot_with is not None:
            return float(np.dot(dot_with[k0:k1].reshape(-1), out[k0:k1].reshape(-1)))
        return 0.0

    total = sum(_row_slabs(workers, x.shape, slab))
    return (out, total) if dot_with is not None else out


def penalty_diagonal(shape, spacing_kji, weights=None, dtype=np.float32, out=None, scale=1.0, workers=None):
    """``out += scale * diag(L_w)`` (for the Jacobi preconditioner); zeros allocated when ``out`` is None.

    ``diag(L_w)_v = sum_a (w_v + w_{v - e_a}) / h_a^2`` over the differences that exist."""
    diag = np.zeros(shape, dtype=dtype) if out is None else out
    nk, nj, ni = shape
    coef = _PenaltyCoefficients(spacing_kji, scale, diag.dtype)

    def slab(k0, k1):
        if weights is not None:
            lo = max(k0 - 1, 0)
            _diagonal_rows(np.multiply(weights[lo:k1], coef.dt(coef.c_ref)), k0, k1, nk, diag[k0:k1], coef)
            return
        ds = diag[k0:k1]
        c = coef.c
        if nk > 1:
            ds[: max(0, min(k1, nk - 1) - k0)] += coef.dt(c[0])  # rows with a difference to k + 1
            ds[max(0, 1 - k0) :] += coef.dt(c[0])  # rows with a difference from k - 1
        for a, n in ((1, nj), (2, ni)):
            if n > 1:
                lo_ = [slice(None)] * 3
                hi_ = [slice(None)] * 3
                lo_[a], hi_[a] = slice(0, n - 1), slice(1, n)
                ds[tuple(lo_)] += coef.dt(c[a])
                ds[tuple(hi_)] += coef.dt(c[a])

    _row_slabs(workers, shape, slab)
    return diag


def _gradient_rows(src, n_own, c, delta, out, floor=0.0):
    """``out`` (``n_own`` rows) = |grad| of rows ``0:n_own`` of ``src`` (forward differences, 0 across
    the far boundary); row ``n_own`` of ``src``, when present, is the next row for the axis-0 difference.
    With ``delta``: the Huber weights ``floor + (1 - floor) min(1, delta / |grad|)`` instead."""
    out[...] = 0
    top = min(n_own, src.shape[0] - 1)
    if top > 0:
        d = np.subtract(src[1 : top + 1], src[:top])
        np.multiply(d, d, out=d)
        d *= c[0]
        out[:top] += d
    own = src[:n_own]
    if own.shape[1] > 1:
        d = np.subtract(own[:, 1:], own[:, :-1])
        np.multiply(d, d, out=d)
        d *= c[1]
        out[:, :-1] += d
    if own.shape[2] > 1:
        d = np.subtract(own[:, :, 1:], own[:, :, :-1])
        np.multiply(d, d, out=d)
        d *= c[2]
        out[:, :, :-1] += d
    np.sqrt(out, out=out)
    if delta is not None:
        np.maximum(out, out.dtype.type(delta), out=out)
        np.divide(out.dtype.type(delta * (1.0 - floor)), out, out=out)
        if floor:
            out += out.dtype.type(floor)


def gradient_magnitude(x, spacing_kji, workers=None, delta=None, out=None, floor=0.0):
    """|grad x| from forward differences (0 across the far boundary), same shape as x (in ``out`` when
    given).

    Slab by slab along axis 0, so the temporaries stay cache-sized. With ``delta``, returns the Huber
    weights ``floor + (1 - floor) min(1, delta / |grad x|)`` instead (same pass)."""
    nk = x.shape[0]
    g = np.empty_like(x) if out is None else out
    c = [x.dtype.type(1.0 / (h * h)) for h in spacing_kji]

    def slab(k0, k1):
        _gradient_rows(x[k0 : min(k1 + 1, nk)], k1 - k0, c, delta, g[k0:k1], floor)

    _row_slabs(workers, x.shape, slab)
    return g


def hybrid_split(alpha, huber_alpha):
    """The hybrid prior ``alpha sum |grad x|^2 + huber_alpha sum huber_delta(|grad x|)`` as one weighted
    penalty: (its weight ``alpha + huber_alpha``, the floor ``alpha / (alpha + huber_alpha)`` of its IRLS
    weights). Where the gradient is below the threshold the weight is the sum, at edges it falls towards
    ``alpha`` alone: flat regions are smoothed hard, edges like first-order Tikhonov at ``alpha``."""
    total = float(alpha) + float(huber_alpha)
    return total, (float(alpha) / total if total > 0 else 1.0)


def huber_weights(x, spacing_kji, delta, edge_scale_mm=0.0, workers=None, out=None, floor=0.0):
    """IRLS weights ``min(1, delta / |grad x|)`` of the Huber penalty, x's dtype, shape x.shape; with
    ``floor`` in [0, 1], ``floor + (1 - floor) min(1, delta / |grad x|)`` (the hybrid prior, see
    :func:`hybrid_split`).

    ``edge_scale_mm > 0`` measures the gradient on ``x`` blurred by a Gaussian of that sigma (the
    "regularised" edge indicator of Catte et al.): noise on a fine grid then no longer passes for edges,
    and the edge test means the same whatever the grid spacing. The blur, the gradient and the weights
    of a slab are computed together in cache (one read of x, one write of the weights). ``out``: an
    array of x's shape and dtype to write them to.
    """
    floor = float(floor)
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"the Huber weights' floor must lie in [0, 1], got {floor}")
    if not (edge_scale_mm and edge_scale_mm > 0):
        return gradient_magnitude(x, spacing_kji, workers=workers, delta=delta, out=out, floor=floor)
    nk = x.shape[0]
    blur = GaussianBlur(x.shape, spacing_kji, edge_scale_mm)
    g = np.empty_like(x) if out is None else out
    c = [x.dtype.type(1.0 / (h * h)) for h in spacing_kji]

    def slab(k0, k1):
        _gradient_rows(blur.rows(x, k0, min(k1 + 1, nk)), k1 - k0, c, delta, g[k0:k1], floor)

    _row_slabs(workers, x.shape, slab, min_rows=GaussianBlur.SLAB_ROWS)
    return g


def reweight_penalty(x, old_weights, new_weights, residual, precond_inv, *, spacing_kji, alpha, workers=None):
    """Keep ``residual = b - H x`` and the Jacobi preconditioner ``precond_inv`` of a system with penalty
    ``alpha L_w`` current, in place, when the weights change from ``old_weights`` to ``new_weights``:
    ``r_new = r_old + alpha L_(w_old - w_new) x`` and ``diag_new = diag_old - 2 alpha diag(L_(w_old - w_new))``,
    slab by slab in one pass."""
    nk = x.shape[0]
    coef = _PenaltyCoefficients(spacing_kji, alpha, x.dtype)
    eps = coef.dt(1e-12)

    def slab(k0, k1):
        lo = max(k0 - 1, 0)
        dwc = np.subtract(old_weights[lo:k1], new_weights[lo:k1])
        dwc *= coef.dt(coef.c_ref)
        _penalty_rows(x, dwc, k0, k1, residual, coef)
        ddiag = np.zeros((k1 - k0,) + x.shape[1:], dtype=x.dtype)
        _diagonal_rows(dwc, k0, k1, nk, ddiag, coef)
        pr = precond_inv[k0:k1]
        d = np.divide(coef.dt(1.0), pr)
        ddiag *= coef.dt(2.0)
        d -= ddiag
        np.maximum(d, eps, out=d)
        np.divide(coef.dt(1.0), d, out=pr)

    _row_slabs(workers, x.shape, slab)


__all__ = ["difference_penalty", "gradient_magnitude", "huber_weights", "hybrid_split", "penalty_diagonal",
           "reweight_penalty"]
