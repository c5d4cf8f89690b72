"""The thread pool and the threaded kernels: pieces cover everything once, results equal the serial ones."""

import numpy as np
import pytest

from MultiPlaneFusionLib.errors import InputError
from MultiPlaneFusionLib.reconstruction.banded import Banded
from MultiPlaneFusionLib.reconstruction.options import SrrOptions
from MultiPlaneFusionLib.reconstruction.parallel import Workers, flat_pieces, row_slabs, split
from MultiPlaneFusionLib.reconstruction.penalty import difference_penalty, gradient_magnitude, penalty_diagonal
from MultiPlaneFusionLib.reconstruction.smoothing import GaussianBlur
from MultiPlaneFusionLib.reconstruction.solvers import NormalEquations, conjugate_gradient, dot

SHAPE = (23, 17, 29)
SPACING = (1.3, 0.9, 0.7)


def gaussian_blur(x, spacing_kji, sigma_mm, workers=None):
    return GaussianBlur(np.shape(x), spacing_kji, sigma_mm)(np.asarray(x), workers)


@pytest.mark.parametrize("n,parts", [(0, 3), (1, 4), (10, 3), (7, 7), (100, 8)])
def test_split_covers_the_range_once(n, parts):
    ranges = split(n, parts)
    covered = [v for lo, hi in ranges for v in range(lo, hi)]
    assert covered == list(range(n))
    assert all(hi > lo for lo, hi in ranges) and len(ranges) <= max(1, parts)


def test_pieces_and_slabs_visit_every_element_once():
    with Workers(3) as workers:
        seen = np.zeros(1_000_003, dtype=np.int32)

        def mark(s0, s1):
            seen[s0:s1] += 1
            return s1 - s0

        assert sum(flat_pieces(workers, seen.size, mark)) == seen.size
        assert (seen == 1).all()
        rows = np.zeros(700, dtype=np.int32)

        def mark_rows(k0, k1):
            rows[k0:k1] += 1

        row_slabs(workers, (700, 30, 40), mark_rows)
        assert (rows == 1).all()


def test_worker_exceptions_reach_the_caller():
    def boom(item):
        if item == 2:
            raise ValueError("piece 2 failed")
        return item

    with Workers(2) as workers:
        with pytest.raises(ValueError, match="piece 2"):
            workers.map(boom, range(4))
        assert workers.map(lambda v: v * v, range(5)) == [0, 1, 4, 9, 16]


def _banded(n_out, n_in, taps, seed):
    rng = np.random.default_rng(seed)
    d = np.zeros((n_out, n_in))
    for r in range(n_out):
        c = int(r * n_in / n_out)
        lo, hi = max(0, c - taps // 2), min(n_in, c + taps // 2 + 1)
        d[r, lo:hi] = rng.uniform(0.1, 1.0, hi - lo)
    d[n_out // 3] = 0.0  # an empty row: the output there must be 0, not left uninitialised
    return d


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("n_out", [7, 61])
def test_banded_apply_matches_dense_serial_and_threaded(axis, n_out):
    rng = np.random.default_rng(axis + n_out)
    shape = list(SHAPE)
    n_in = shape[axis]
    dense = _banded(n_out, n_in, 5, axis)
    m = Banded(dense)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    want = np.moveaxis(np.tensordot(dense, x.astype(np.float64), axes=([1], [axis])), 0, axis)
    serial = m.apply(x, axis)
    with Workers(3) as workers:
        threaded = m.apply(x, axis, workers=workers)
        acc = np.ones_like(serial)
        m.apply(x, axis, out=acc, accumulate=True, workers=workers)
        # the transpose, written into a given array
        y = rng.standard_normal(serial.shape).astype(np.float32)
        back = np.full(SHAPE, np.nan, dtype=np.float32)
        m.apply(y, axis, transpose=True, out=back, workers=workers)
    np.testing.assert_allclose(serial, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(threaded, serial, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acc, serial + 1.0, rtol=1e-5, atol=1e-5)
    want_back = np.moveaxis(np.tensordot(dense.T, y.astype(np.float64), axes=([1], [axis])), 0, axis)
    np.testing.assert_allclose(back, want_back, rtol=1e-5, atol=1e-5)


def test_banded_apply_rejects_a_wrong_output():
    m = Banded(_banded(5, SHAPE[0], 3, 0))
    with pytest.raises(ValueError):
        m.apply(np.zeros(SHAPE, np.float32), 0, out=np.zeros(SHAPE, np.float32))


def test_solver_kernels_threaded_equal_serial():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    w = rng.uniform(0.05, 1.0, SHAPE).astype(np.float32)
    with Workers(3) as workers:
        for weights in (None, w):
            np.testing.assert_allclose(
                difference_penalty(x, SPACING, weights, scale=0.3, workers=workers),
                difference_penalty(x, SPACING, weights, scale=0.3), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(
                penalty_diagonal(SHAPE, SPACING, weights, scale=0.3, workers=workers),
                penalty_diagonal(SHAPE, SPACING, weights, scale=0.3), rtol=1e-6)
        np.testing.assert_allclose(gradient_magnitude(x, SPACING, workers, 0.1),
                                   gradient_magnitude(x, SPACING, None, 0.1), rtol=1e-6)
        np.testing.assert_allclose(gaussian_blur(x, SPACING, 0.8, workers), gaussian_blur(x, SPACING, 0.8), rtol=1e-6,
                                   atol=1e-6)
        assert dot(x, w, workers) == pytest.approx(float(np.dot(x.ravel().astype(np.float64), w.ravel())), rel=1e-6)


class _Diag:
    def __init__(self, d):
        self.d = d

    def normal(self, x, out=None, scale=1.0, workers=None, scratch=None, accumulate=True):
        t = x * self.d * np.float32(scale)
        if out is None:
            return t
        if accumulate:
            out += t
        else:
            out[...] = t
        return out


def test_cg_threaded_equals_serial():
    rng = np.random.default_rng(6)
    d = rng.uniform(0.2, 1.0, SHAPE).astype(np.float32)
    b = rng.standard_normal(SHAPE).astype(np.float32)
    results = []
    for n in (1, 3):
        with Workers(n) as workers:
            system = NormalEquations([_Diag(d)], [1.0], 0.2, SPACING, d.copy(), workers)
            x = np.zeros(SHAPE, np.float32)
            info = conjugate_gradient(system, b, x, system.preconditioner(), 8, 1e-9, workers=workers)
            results.append((x, info["relative_residual"]))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-3)


def test_threads_option_is_checked():
    with pytest.raises(InputError, match="threads"):
        SrrOptions(threads=0).validate()
    SrrOptions(threads=2).validate()


def test_apply_with_dot_and_reused_output():
    rng = np.random.default_rng(8)
    d = rng.uniform(0.2, 1.0, SHAPE).astype(np.float32)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    w = rng.uniform(0.1, 1.0, SHAPE).astype(np.float32)
    with Workers(2) as workers:
        system = NormalEquations([_Diag(d), _Diag(d[::-1].copy())], [0.5, 2.0], 0.3, SPACING, d.copy(), workers)
        system.weights = w
        want = system(x)
        buf = np.full(SHAPE, np.nan, np.float32)
        got, pq = system.apply_with_dot(x, out=buf)
    assert got is buf
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(want, x * d * 0.5 + x * d[::-1] * 2.0
                               + difference_penalty(x.astype(np.float64), SPACING, w, scale=0.3), rtol=1e-4, atol=1e-4)
    assert pq == pytest.approx(float(np.dot(x.ravel().astype(np.float64), want.ravel())), rel=1e-5)


def test_separable_normal_with_scratch_matches_plain():
    from MultiPlaneFusionLib.reconstruction.operators import make_operator
    from MultiPlaneFusionLib.reconstruction.workspace import Scratch
    from MultiPlaneFusionLib.simulation import phantom_grid, simulate_orthogonal_stacks

    stacks = simulate_orthogonal_stacks(thickness_mm=4.0, pixel_spacing_mm=2.0, scale=0.3, noise_hu=0.0, seed=1)
    grid = phantom_grid(2.0, 0.3)
    x = np.random.default_rng(9).standard_normal(grid.shape).astype(np.float32)
    scratch = Scratch()
    with Workers(2) as workers:
        for s in stacks:
            op = make_operator(s, grid)
            assert op.path == "separable"
            want = op.adjoint(op.forward(x)) * np.float32(0.7)
            out = np.full(grid.shape, np.nan, np.float32)
            op.normal(x, out=out, scale=0.7, workers=workers, scratch=scratch, accumulate=False)
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
            op.normal(x, out=out, scale=0.7, workers=workers, scratch=scratch)  # accumulates
            np.testing.assert_allclose(out, 2 * want, rtol=1e-4, atol=1e-5)
            y = np.random.default_rng(10).standard_normal(s.shape).astype(np.float32)
            acc = np.ones(grid.shape, np.float32)
            op.adjoint_add(y, acc, workers, scratch)
            np.testing.assert_allclose(acc, 1.0 + op.adjoint(y), rtol=1e-4, atol=1e-5)


def test_nested_map_runs_inline_instead_of_deadlocking():
    with Workers(2) as workers:
        def outer(v):
            return sum(workers.map(lambda u: u * v, range(4)))

        assert workers.map(outer, [1, 2, 3]) == [6, 12, 18]
