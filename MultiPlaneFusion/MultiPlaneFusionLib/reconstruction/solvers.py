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
- hybrid: ``alpha_T sum |grad x|^2 + alpha_H sum rho_delta(|grad x|)``, the same IRLS on one penalty of
  weight ``alpha_T + alpha_H`` whose weights never fall below ``alpha_T / (alpha_T + alpha_H)``
  (:func:`penalty_weight`, the ``floor`` of :func:`solve_huber`).

Arrays are float32 on the grid; inner products are accumulated in float64 chunk by chunk.
"""

import logging

import numpy as np

from .parallel import flat_pieces as _flat_pieces
from .penalty import difference_penalty, huber_weights, hybrid_split, penalty_diagonal, reweight_penalty
from .workspace import Scratch

LOGGER = logging.getLogger("MultiPlaneFusionLib")


def dot(a, b, workers=None):
    """Inner product of two equally shaped arrays: BLAS per chunk, chunks summed in float64 (float32
    accumulation over a whole 10^7-voxel volume would lose digits CG needs)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return float(sum(_flat_pieces(workers, fa.size, lambda s0, s1: float(np.dot(fa[s0:s1], fb[s0:s1])))))


def conjugate_gradient(
    apply_h, b, x, precond_inv=None, max_iterations=20, tolerance=1e-3, *, b_norm=None, report=None,
    overwrite_b=False, residual=None, keep_residual=False, workers=None, pool=None, solution_tolerance=None,
):
    """Preconditioned conjugate gradients for ``H x = b`` (H symmetric positive definite), in place.

    The vector updates are fused and run chunk by chunk (cache-sized, split between ``workers``), so an
    iteration costs one ``apply_h`` plus about ten streaming passes over the volume; memory: x, r, p and
    H p.

    Parameters
    ----------
    apply_h : callable
        ``apply_h(p) -> H p`` (a new array). If it has ``apply_with_dot(p, out=None) -> (H p, <p, H p>)``
        (as :class:`NormalEquations` does), that is used instead, writing into the previous ``H p``.
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
    workers : parallel.Workers, optional
        Threads for the vector updates.
    pool : workspace.Scratch, optional
        Where the direction and H p arrays come from and go back to when done (reused memory).
    solution_tolerance : float, optional
        Also stop when an iteration changes the solution by at most this fraction of its norm,
        ``||x_new - x_old|| <= solution_tolerance * ||x_new||`` (measured in the update's pass, no extra
        memory pass).

    Returns
    -------
    dict
        ``iterations``, ``relative_residual`` (final), ``initial_relative_residual``, ``history``,
        ``relative_change`` (of the last iteration, or None), ``stopped`` ("residual", "solution",
        "max_iterations" or "breakdown").
    """
    if b_norm is None:
        b_norm = np.sqrt(dot(b, b, workers))
    b_norm = max(b_norm, 1e-30)
    r = _initial_residual(apply_h, b, x, residual=residual, overwrite_b=overwrite_b)
    rr = dot(r, r, workers)
    rel0 = np.sqrt(rr) / b_norm
    history = [float(rel0)]
    info = {"iterations": 0, "relative_residual": float(rel0), "initial_relative_residual": float(rel0),
            "history": history, "relative_change": None, "stopped": "residual"}
    if keep_residual:
        info["residual"] = r
    if rel0 <= tolerance or max_iterations <= 0:
        if rel0 > tolerance:
            info["stopped"] = "max_iterations"
        return info
    fx, fr = x.reshape(-1), r.reshape(-1)
    fm = None if precond_inv is None else precond_inv.reshape(-1)
    p = pool.take(r.shape, r.dtype) if pool is not None else np.empty_like(r)
    if precond_inv is not None:
        np.multiply(r, precond_inv, out=p)
    else:
        p[...] = r
    fp = p.reshape(-1)
    rz = dot(r, p, workers)
    dt = x.dtype.type
    it = 0
    rel = rel0
    with_dot = getattr(apply_h, "apply_with_dot", None)
    watch_x = solution_tolerance is not None and solution_tolerance > 0
    change = None
    stopped = "max_iterations"
    q = pool.take(x.shape, x.dtype) if (pool is not None and with_dot is not None) else None
    while it < max_iterations:
        if with_dot is not None:
            q, pq = with_dot(p, out=q)
        else:
            q = apply_h(p)
            pq = dot(p, q, workers)
        fq = q.reshape(-1)
        if not pq > 0:  # H lost definiteness numerically: stop with what we have
            stopped = "breakdown"
            break
        step = dt(rz / pq)

        def update(s0, s1, fq=fq, step=step):
            # a cache-sized scratch instead of writing into q: q is only read (one write pass less)
            xs, rs, ps, qs = fx[s0:s1], fr[s0:s1], fp[s0:s1], fq[s0:s1]
            t = np.multiply(qs, step)
            rs -= t
            np.multiply(ps, step, out=t)
            xs += t
            rr_part = float(np.dot(rs, rs))
            # squared norms of the step and of the new x, for the solution-change test (in cache)
            dx = (float(np.dot(t, t)), float(np.dot(xs, xs))) if watch_x else (0.0, 0.0)
            if fm is None:
                return rr_part, rr_part, dx
            np.multiply(rs, fm[s0:s1], out=t)
            return rr_part, float(np.dot(rs, t)), dx

        parts = _flat_pieces(workers, fx.size, update)
        rr = sum(v[0] for v in parts)
        rz_new = sum(v[1] for v in parts)
        it += 1
        rel = np.sqrt(rr) / b_norm
        history.append(float(rel))
        if watch_x:
            change = float(np.sqrt(sum(v[2][0] for v in parts) / max(sum(v[2][1] for v in parts), 1e-30)))
        if report is not None:
            report(it, float(rel))
        if rel <= tolerance:
            stopped = "residual"
            break
        if watch_x and change <= solution_tolerance:
            stopped = "solution"
            break
        if it >= max_iterations:
            break
        beta = dt(rz_new / rz)

        if with_dot is None:
            q = None
        del fq

        def direction(s0, s1, beta=beta):
            ps = fp[s0:s1]
            ps *= beta
            if fm is not None:
                ps += np.multiply(fr[s0:s1], fm[s0:s1])
            else:
                ps += fr[s0:s1]

        _flat_pieces(workers, fx.size, direction)
        rz = rz_new
    info.update(iterations=it, relative_residual=float(rel), relative_change=change, stopped=stopped)
    if pool is not None:
        pool.give(p)
        pool.give(q)
    return info


def _initial_residual(apply_h, b, x, *, residual, overwrite_b):
    """``b - H x``: the given ``residual``, or computed (in the memory of ``b`` when ``overwrite_b``)."""
    if residual is not None:
        return residual
    if overwrite_b:
        b -= apply_h(x)
        return b
    r = apply_h(x)
    np.subtract(b, r, out=r)
    return r


def data_weights(stacks, grid):
    """The data weights c_k of ``stacks`` on ``grid``: each stack's sample volume over the grid voxel's, so that
    every stack weighs the same per unit of volume whatever its resolution (see :mod:`.srr`)."""
    grid_voxel = float(np.prod(grid.spacing_mm))
    return [_sample_volume_mm3(s) / grid_voxel for s in stacks]


def _sample_volume_mm3(stack):
    di, dj = stack.pixel_spacing_mm
    step = stack.slice_step_mm if stack.shape[0] > 1 else stack.thickness_mm
    return di * dj * step


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
    workers : parallel.Workers, optional
        Threads the operators and the penalty split their work between.
    scratch : workspace.Scratch, optional
        Reusable work memory (a new one when None).
    """

    def __init__(self, operators, data_weights, alpha, spacing_kji, data_row_sums, workers=None, scratch=None):
        self.operators = operators
        self.data_weights = [float(c) for c in data_weights]
        self.alpha = float(alpha)
        self.spacing = tuple(float(h) for h in spacing_kji)
        self.data_row_sums = data_row_sums
        self.weights = None  # Huber IRLS weights (None: Tikhonov)
        self.workers = workers
        self.scratch = Scratch() if scratch is None else scratch

    def __call__(self, x, out=None):
        return self.apply_with_dot(x, out, with_dot=False)

    def apply_with_dot(self, x, out=None, with_dot=True):
        """``(H x, <x, H x>)`` (the inner product computed in the penalty's pass while the result is in
        cache); with ``with_dot=False`` just ``H x``. ``out``: memory for the result."""
        if out is None:
            out = np.empty_like(x)
        first = True
        for op, c in zip(self.operators, self.data_weights):
            op.normal(x, out=out, scale=c, workers=self.workers, scratch=self.scratch, accumulate=not first)
            first = False
        if first:
            out[...] = 0
        if self.alpha > 0:
            res = difference_penalty(x, self.spacing, self.weights, out=out, scale=self.alpha, workers=self.workers,
                                     dot_with=x if with_dot else None)
            return res
        return (out, dot(x, out, self.workers)) if with_dot else out

    def preconditioner(self, consume=False):
        """Inverse of the absolute row sums of H (data: c A^T 1; penalty: 2 x its diagonal).

        ``consume=True`` computes it in the memory of ``data_row_sums`` (one grid copy less; the system
        cannot make another preconditioner afterwards)."""
        if consume:
            d, self.data_row_sums = self.data_row_sums, None
        else:
            d = self.data_row_sums.copy()
        penalty_diagonal(d.shape, self.spacing, self.weights, out=d, scale=2.0 * self.alpha, workers=self.workers)
        _invert_diagonal(d, self.workers)
        return d

    def reweight(self, x, new_weights, residual, precond_inv):
        """Switch the penalty weights to ``new_weights`` keeping ``residual = b - H x`` and the Jacobi
        preconditioner ``precond_inv`` current, both in place, in one pass.

        Only the penalty part of H changes and it is linear in the weights:
        ``r_new = r_old + alpha L_(w_old - w_new) x`` and ``diag_new = diag_old - 2 alpha diag(L_(w_old - w_new))``.
        Saves the full ``H x`` a fresh residual costs; slab by slab, everything in cache.
        """
        old = self.weights
        self.weights = new_weights
        if old is None or self.alpha <= 0:
            return
        reweight_penalty(x, old, new_weights, residual, precond_inv, spacing_kji=self.spacing, alpha=self.alpha,
                         workers=self.workers)


def _invert_diagonal(d, workers):
    """``d <- 1 / max(d, 1e-12)`` in place."""
    fd = d.reshape(-1)

    def piece(s0, s1):
        np.maximum(fd[s0:s1], fd.dtype.type(1e-12), out=fd[s0:s1])
        np.divide(fd.dtype.type(1.0), fd[s0:s1], out=fd[s0:s1])

    _flat_pieces(workers, fd.size, piece)


def solve_tikhonov(system, b, x, *, max_iterations=20, tolerance=1e-3, report=None, overwrite=False,
                   solution_tolerance=None):
    """TK1: preconditioned CG on the normal equations, warm-started from ``x`` (overwritten), until the
    relative residual is below ``tolerance`` or an iteration changes x by at most ``solution_tolerance``
    of its norm (converged), at most ``max_iterations``.

    ``overwrite=True`` reuses the memory of ``b`` and of the system's row sums (two grid copies less).
    """
    system.weights = None
    info = conjugate_gradient(system, b, x, system.preconditioner(consume=overwrite), max_iterations=max_iterations,
                              tolerance=tolerance, report=report, overwrite_b=overwrite, workers=system.workers,
                              solution_tolerance=solution_tolerance)
    LOGGER.info(
        "SRR (TK1, alpha %.4g): %d CG iterations, relative residual %.3g -> %.3g",
        system.alpha, info["iterations"], info["initial_relative_residual"], info["relative_residual"],
    )
    return info


def penalty_weight(regularizer, alpha, huber_alpha=0.0):
    """(the system's penalty weight, the floor of the IRLS weights) for a regularizer: ``alpha`` and 0,
    except for "hybrid", whose Tikhonov share ``alpha`` and Huber share ``huber_alpha`` make one weighted
    penalty (``penalty.hybrid_split``)."""
    if regularizer == "hybrid":
        return hybrid_split(alpha, huber_alpha)
    return float(alpha), 0.0


def _prior_label(weight, delta, floor):
    """The edge-preserving prior as the log names it: the hybrid (``floor`` > 0) by its two shares."""
    if floor > 0:
        return (f"hybrid: Tikhonov {weight * floor:.4g} + Huber {weight * (1.0 - floor):.4g} at threshold "
                f"{delta:.4g}")
    return f"Huber, alpha {weight:.4g}, delta {delta:.4g}"


def solve_huber(system, b, x, delta, *, outer_iterations=4, max_iterations=7, tolerance=1e-3, report=None,
                edge_scale_mm=0.0, solution_tolerance=None, floor=0.0):
    """Huber-on-gradient by IRLS: ``outer_iterations`` reweightings, CG inside (in total at most
    ``max_iterations`` CG iterations, split evenly, the earlier steps taking the remainder; at least one per
    reweighting). ``x`` (the warm start) is overwritten.

    The first outer step uses the weights of the warm start, so edges present in the initial estimate
    are preserved from the beginning. Between reweightings only the penalty part of H changes, so the
    residual and the Jacobi preconditioner are carried over and corrected (:meth:`NormalEquations.reweight`):
    the data terms are most of an iteration's cost. ``b`` and the system's row sums are overwritten.

    With ``solution_tolerance`` the iterations run to convergence instead of a fixed split:
    ``outer_iterations`` and ``max_iterations`` become caps, each reweighting's CG runs until an
    iteration changes x by at most that fraction of its norm, and the reweighting stops when a new set
    of weights is met by a single such CG iteration (the fixed point of the IRLS).

    ``floor`` > 0 solves the hybrid prior (``penalty.hybrid_split``): the weights never fall below it, so
    ``system.alpha * floor`` is a first-order Tikhonov share that stays at edges.
    """
    outer_iterations = max(1, int(outer_iterations))
    # split evenly, the earlier reweightings taking the remainder; at least one CG iteration each
    n_cg = max(int(max_iterations), outer_iterations)
    converge = solution_tolerance is not None and solution_tolerance > 0
    inner_counts = [n_cg // outer_iterations + (1 if o < n_cg % outer_iterations else 0)
                    for o in range(outer_iterations)]
    workers = system.workers
    total = 0
    infos = []
    residual = None
    precond = None
    b_norm = np.sqrt(dot(b, b, workers))
    pool = system.scratch  # arrays handed back and forth: see Scratch.take
    for o in range(outer_iterations):
        weights = huber_weights(x, system.spacing, delta, edge_scale_mm=edge_scale_mm, workers=workers,
                                out=pool.take(x.shape, x.dtype), floor=floor)
        if precond is None:
            system.weights = weights
            # In the row sums' memory: later steps update it for the new weights instead of keeping the
            # row sums (one grid copy less at the peak).
            precond = system.preconditioner(consume=True)
        else:
            old = system.weights
            system.reweight(x, weights, residual, precond)
            pool.give(old)  # becomes a CG direction: no fresh memory, no extra copy
            del old
        del weights

        def inner_report(it, rel, _done=total):
            if report is not None:
                report(_done + it, rel)

        # The first step computes the residual in b's memory (b is not needed after it: later steps carry the
        # residual), one grid copy less at the peak.
        budget = max(1, n_cg - total - (outer_iterations - o - 1)) if converge else inner_counts[o]
        info = conjugate_gradient(system, b, x, precond, max_iterations=budget, tolerance=tolerance, b_norm=b_norm,
                                  report=inner_report, overwrite_b=residual is None, residual=residual,
                                  keep_residual=o + 1 < outer_iterations, workers=workers, pool=pool,
                                  solution_tolerance=solution_tolerance if converge else None)
        residual = info.pop("residual", None)
        total += info["iterations"]
        infos.append(info)
        fixed_point = converge and o > 0 and info["iterations"] <= 1 and info["stopped"] in ("solution", "residual")
        LOGGER.info("SRR (%s) outer %d/%d: %d CG iterations, relative residual %.3g",
                    _prior_label(system.alpha, delta, floor), o + 1, outer_iterations, info["iterations"],
                    info["relative_residual"])
        if fixed_point or (converge and total >= n_cg):
            break
    system.weights = None
    pool.clear()
    return {
        "iterations": total,
        "outer_iterations": len(infos),
        "relative_residual": infos[-1]["relative_residual"],
        "relative_change": infos[-1]["relative_change"],
        "stopped": "solution" if (converge and infos[-1]["stopped"] != "max_iterations") else infos[-1]["stopped"],
        "initial_relative_residual": infos[0]["initial_relative_residual"],
        "history": [h for i in infos for h in i["history"]],
    }
