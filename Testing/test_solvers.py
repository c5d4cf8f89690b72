"""Solvers on small problems with known answers: the penalty against its explicit matrix, CG against a
direct solve, Huber IRLS against its objective and the residual it carries between reweightings."""

import numpy as np
import pytest

from MultiPlaneFusionLib.reconstruction.penalty import (
    difference_penalty,
    gradient_magnitude,
    huber_weights,
    hybrid_split,
    penalty_diagonal,
)
from MultiPlaneFusionLib.reconstruction.solvers import (
    NormalEquations,
    conjugate_gradient,
    penalty_weight,
    solve_huber,
    solve_tikhonov,
)

SHAPE = (4, 5, 6)
SPACING = (2.0, 1.0, 0.5)


def _dense_penalty(shape, spacing, weights=None):
    """L_w = sum_a D_a^T diag(w) D_a / h_a^2 as an explicit matrix (forward differences, Neumann)."""
    n = int(np.prod(shape))
    idx = np.arange(n).reshape(shape)
    w = np.ones(shape) if weights is None else weights
    m = np.zeros((n, n))
    for a, h in enumerate(spacing):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(0, shape[a] - 1), slice(1, shape[a])
        for p, q, wv in zip(idx[tuple(lo)].ravel(), idx[tuple(hi)].ravel(), w[tuple(lo)].ravel()):
            c = wv / h**2
            m[p, p] += c
            m[q, q] += c
            m[p, q] -= c
            m[q, p] -= c
    return m


class _Mask:
    """A data term ``A = diag(mask)`` (samples some voxels): A^T A x = mask * x."""

    def __init__(self, mask):
        self.mask = mask

    def normal(self, x, out=None, scale=1.0, workers=None, scratch=None, accumulate=True):
        t = x * self.mask * scale
        if out is None:
            return t
        if accumulate:
            out += t
        else:
            out[...] = t
        return out


@pytest.mark.parametrize("weighted", [False, True])
def test_difference_penalty_is_the_explicit_matrix(weighted):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE)
    w = rng.uniform(0.1, 1.0, SHAPE) if weighted else None
    m = _dense_penalty(SHAPE, SPACING, w)
    got = difference_penalty(x, SPACING, w, scale=0.7)
    np.testing.assert_allclose(got.ravel(), 0.7 * m @ x.ravel(), rtol=1e-10, atol=1e-10)
    diag = penalty_diagonal(SHAPE, SPACING, w, dtype=np.float64, scale=0.7)
    np.testing.assert_allclose(diag.ravel(), 0.7 * np.diag(m), rtol=1e-12)


def test_gradient_magnitude_and_huber_weights():
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij")
    x = 3.0 * i * SPACING[2]  # 3 per mm along i only
    g = gradient_magnitude(x, SPACING)
    assert np.allclose(g[:, :, :-1], 3.0) and np.allclose(g[:, :, -1], 0.0)
    w = huber_weights(x, SPACING, 0.3)
    assert np.allclose(w[:, :, :-1], 0.1) and np.allclose(w[:, :, -1], 1.0)
    # the hybrid's floor: floor + (1 - floor) min(1, delta / |grad|), with and without the edge blur
    w = huber_weights(x, SPACING, 0.3, floor=0.25)
    assert np.allclose(w[:, :, :-1], 0.325) and np.allclose(w[:, :, -1], 1.0)
    assert np.allclose(huber_weights(x, SPACING, 0.3, edge_scale_mm=0.4, floor=1.0), 1.0)
    with pytest.raises(ValueError):
        huber_weights(x, SPACING, 0.3, floor=1.5)


def test_hybrid_split_and_penalty_weight():
    assert hybrid_split(0.07, 0.28) == pytest.approx((0.35, 0.2))
    assert penalty_weight("hybrid", 0.07, 0.28) == pytest.approx((0.35, 0.2))
    assert penalty_weight("tikhonov", 0.07, 0.28) == (0.07, 0.0)
    assert penalty_weight("huber", 0.5, 0.28) == (0.5, 0.0)
    assert hybrid_split(0.0, 0.0) == (0.0, 1.0)


def _system(alpha, seed=1):
    rng = np.random.default_rng(seed)
    mask = (rng.uniform(size=SHAPE) < 0.6).astype(float)
    y = rng.standard_normal(SHAPE) * mask
    system = NormalEquations([_Mask(mask)], [1.0], alpha, SPACING, mask.copy())
    return system, mask, y


def test_cg_and_tikhonov_match_a_direct_solve():
    system, mask, y = _system(0.3)
    h = np.diag(mask.ravel()) + 0.3 * _dense_penalty(SHAPE, SPACING)
    exact = np.linalg.solve(h, y.ravel()).reshape(SHAPE)
    x = np.zeros(SHAPE)
    info = conjugate_gradient(system, y, x, system.preconditioner(), max_iterations=500, tolerance=1e-12)
    assert info["relative_residual"] <= 1e-12
    np.testing.assert_allclose(x, exact, atol=1e-9)
    x2 = np.zeros(SHAPE)
    solve_tikhonov(system, y.copy(), x2, max_iterations=500, tolerance=1e-12, overwrite=True)
    np.testing.assert_allclose(x2, exact, atol=1e-9)


def test_cg_uses_a_given_residual_and_returns_it():
    system, mask, y = _system(0.3)
    x = np.random.default_rng(2).standard_normal(SHAPE)
    r = y - system(x)
    x_a, x_b = x.copy(), x.copy()
    conjugate_gradient(system, y, x_a, system.preconditioner(), max_iterations=5, tolerance=1e-14)
    info = conjugate_gradient(system, y, x_b, system.preconditioner(), max_iterations=5, tolerance=1e-14,
                              residual=r.copy(), keep_residual=True)
    np.testing.assert_allclose(x_b, x_a, atol=1e-12)
    np.testing.assert_allclose(info["residual"], y - system(x_b), atol=1e-10)


def _huber_objective(x, mask, y, alpha, delta):
    g = gradient_magnitude(x, SPACING)
    rho = np.where(g <= delta, g * g, 2 * delta * g - delta * delta)
    return float(np.sum(mask * (x - y) ** 2) + alpha * rho.sum())


def test_huber_lowers_its_objective_and_carries_the_exact_residual(monkeypatch):
    # a step edge with noise: the Huber penalty keeps the edge, the objective decreases
    rng = np.random.default_rng(3)
    truth = np.where(np.arange(SHAPE[2]) < 3, 0.0, 1.0)[None, None, :] * np.ones(SHAPE)
    mask = (rng.uniform(size=SHAPE) < 0.7).astype(float)
    y = (truth + 0.05 * rng.standard_normal(SHAPE)) * mask
    alpha, delta = 0.2, 0.05
    system = NormalEquations([_Mask(mask)], [1.0], alpha, SPACING, mask.copy())
    x = y.copy()
    start = _huber_objective(x, mask, y, alpha, delta)

    seen = []
    real_cg = conjugate_gradient

    precond_errors = []

    def spy(apply_h, b, x, *args, **kw):
        given = kw.get("residual")
        if given is not None:  # the carried residual must be b - H x with the NEW weights
            seen.append(float(np.abs(given - (y - apply_h(x))).max()))
        # the (updated) preconditioner must be that of the current weights
        want = 1.0 / np.maximum(mask + penalty_diagonal(SHAPE, SPACING, apply_h.weights, np.float64, scale=2 * alpha),
                                1e-12)
        precond_errors.append(float(np.abs(args[0] / want - 1.0).max()))
        return real_cg(apply_h, b, x, *args, **kw)

    import MultiPlaneFusionLib.reconstruction.solvers as solvers

    monkeypatch.setattr(solvers, "conjugate_gradient", spy)
    info = solve_huber(system, y.copy(), x, delta, outer_iterations=4, max_iterations=40, tolerance=1e-10)
    assert info["outer_iterations"] == 4 and 0 < info["iterations"] <= 40
    assert len(seen) == 3 and max(seen) < 1e-10
    assert len(precond_errors) == 4 and max(precond_errors) < 1e-6
    assert _huber_objective(x, mask, y, alpha, delta) < start
    # the edge survives: the two sides stay apart by most of the step
    assert x[:, :, 4:].mean() - x[:, :, :2].mean() > 0.8


def _hybrid_objective(x, mask, y, alpha, huber_alpha, delta):
    g = gradient_magnitude(x, SPACING)
    rho = np.where(g <= delta, g * g, 2 * delta * g - delta * delta)
    return float(np.sum(mask * (x - y) ** 2) + alpha * np.sum(g * g) + huber_alpha * rho.sum())


def test_hybrid_minimises_its_own_objective():
    # Tikhonov at alpha plus Huber at huber_alpha, solved as one reweighted penalty with a floor: its
    # objective ends below those of the pure Tikhonov and pure Huber solutions (which minimise other
    # objectives), and with huber_alpha 0 it is the Tikhonov solution
    rng = np.random.default_rng(4)
    truth = np.where(np.arange(SHAPE[2]) < 3, 0.0, 1.0)[None, None, :] * np.ones(SHAPE)
    mask = (rng.uniform(size=SHAPE) < 0.7).astype(float)
    y = (truth + 0.05 * rng.standard_normal(SHAPE)) * mask
    a_t, a_h, delta = 0.05, 0.3, 0.05

    def solve(regularizer, alpha, huber_alpha=0.0):
        weight, floor = penalty_weight(regularizer, alpha, huber_alpha)
        system = NormalEquations([_Mask(mask)], [1.0], weight, SPACING, mask.copy())
        x = y.copy()
        if regularizer == "tikhonov":
            solve_tikhonov(system, y.copy(), x, max_iterations=500, tolerance=1e-12, overwrite=True)
        else:
            solve_huber(system, y.copy(), x, delta, outer_iterations=60, max_iterations=3000, tolerance=1e-12,
                        solution_tolerance=1e-9, floor=floor)
        return x

    hybrid = solve("hybrid", a_t, a_h)
    mine = _hybrid_objective(hybrid, mask, y, a_t, a_h, delta)
    for other in (solve("tikhonov", a_t), solve("tikhonov", a_t + a_h), solve("huber", a_h), solve("huber", a_t + a_h)):
        assert mine < _hybrid_objective(other, mask, y, a_t, a_h, delta)
    np.testing.assert_allclose(solve("hybrid", a_t, 0.0), solve("tikhonov", a_t), atol=1e-7)


def test_irls_log_names_the_prior_and_its_shares(caplog):
    # the hybrid is logged by its Tikhonov and Huber shares, plain Huber by its weight
    mask = np.ones(SHAPE)
    y = np.random.default_rng(1).standard_normal(SHAPE)
    cases = (("hybrid", 0.05, 0.2, "hybrid: Tikhonov 0.05 + Huber 0.2 at threshold 0.025"),
             ("huber", 0.5, 0.0, "Huber, alpha 0.5, delta 0.025"))
    for regularizer, alpha, huber_alpha, expected in cases:
        weight, floor = penalty_weight(regularizer, alpha, huber_alpha)
        system = NormalEquations([_Mask(mask)], [1.0], weight, SPACING, mask.copy())
        caplog.clear()
        with caplog.at_level("INFO", logger="MultiPlaneFusionLib"):
            solve_huber(system, y.copy(), y.copy(), 0.025, outer_iterations=1, max_iterations=2, floor=floor)
        assert expected in caplog.text


def test_edge_scale_keeps_noise_from_passing_for_edges():
    # fine grid (0.25 mm), unit step along i plus noise whose voxel-to-voxel gradients exceed delta
    spacing = (0.25, 0.25, 0.25)
    rng = np.random.default_rng(4)
    step = np.where(np.arange(40) < 20, 0.0, 1.0)[None, None, :] * np.ones((16, 16, 40))
    x = (step + 0.02 * rng.standard_normal(step.shape)).astype(np.float32)
    delta = 0.05
    plain = huber_weights(x, spacing, delta)
    scaled = huber_weights(x, spacing, delta, edge_scale_mm=0.5)
    flat = (slice(4, 12), slice(4, 12), slice(3, 12))
    edge = (slice(4, 12), slice(4, 12), 19)
    assert np.median(plain[flat]) < 0.6  # noise counted as edges
    assert np.median(scaled[flat]) > 0.95  # smoothed quadratically, as it should be
    assert scaled[edge].max() < 0.2  # the real edge is still an edge


def test_gaussian_blur_keeps_constants_and_has_the_requested_width():
    from MultiPlaneFusionLib.reconstruction.smoothing import GaussianBlur

    def gaussian_blur(x, spacing_kji, sigma_mm):
        return GaussianBlur(np.shape(x), spacing_kji, sigma_mm)(np.asarray(x))

    spacing = (0.5, 1.0, 0.25)
    ones = np.ones((9, 10, 11), np.float32)
    np.testing.assert_allclose(gaussian_blur(ones, spacing, 0.7), 1.0, rtol=1e-6)
    x = np.zeros((81, 81, 81))  # impulse far from the borders (there rows are renormalised)
    x[40, 40, 40] = 1.0
    y = gaussian_blur(x, spacing, 1.5)
    assert abs(y.sum() - 1.0) < 1e-9
    for axis, h in enumerate(spacing):
        prof = y.sum(axis=tuple(a for a in range(3) if a != axis))
        pos = (np.arange(81) - 40) * h
        std = np.sqrt((prof * pos**2).sum())
        assert abs(std - 1.5) < 0.02, (axis, std)


@pytest.mark.parametrize("sigma_mm", [0.35, 0.9, 3.0])
def test_gaussian_blur_equals_its_dense_rows(sigma_mm):
    # the short-kernel path (shifted adds) and the matrix path give the dense, border-renormalised rows
    from MultiPlaneFusionLib.reconstruction.smoothing import GaussianBlur

    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 9, 12)).astype(np.float32)
    spacing = (1.0, 0.9, 0.45)
    blur = GaussianBlur(x.shape, spacing, sigma_mm)
    want = np.einsum("ka,jb,ic,abc->kji", *blur.mats, x.astype(np.float64))
    np.testing.assert_allclose(blur(x), want, rtol=1e-5, atol=1e-5)
    used = [s is not None for s in blur._stencil[1:]]
    assert used == [h <= GaussianBlur.STENCIL_MAX_HALF for h in blur.half[1:]]
