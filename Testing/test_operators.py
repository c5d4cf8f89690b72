"""Stack operators of the super-resolution engine: exact adjoints on every path, PSF rows, path choice,
separable/general consistency, coverage.

All cases are small synthetic geometries (a 20 x 22 x 24 grid); the dot-product test runs in float64:
|<A x, y> - <x, A^T y>| <= 1e-5 |<A x, y>|.
"""

import math

import numpy as np
import pytest

from MultiPlaneFusionLib.errors import InputError
from MultiPlaneFusionLib.grid import Grid
from MultiPlaneFusionLib.reconstruction.general_operator import GeneralOperator
from MultiPlaneFusionLib.reconstruction.operators import make_operator
from MultiPlaneFusionLib.reconstruction.separable_operator import SeparableOperator
from MultiPlaneFusionLib.reconstruction.shear_operator import ShearOperator, shear_path_applies
from MultiPlaneFusionLib.reconstruction.skew_operator import SkewOperator
from MultiPlaneFusionLib.reconstruction.stack_operator import StackOperator, separable_axes
from MultiPlaneFusionLib.sampling.psf import FWHM_PER_SIGMA, psf_rows
from MultiPlaneFusionLib.stack import Stack, stack_from_affine

GRID = Grid(shape=(20, 22, 24), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0))


def _rotation(axis, deg):
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = np.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _stack(row, col, step, origin, shape, pixel=(1.1, 1.1), thickness=None, seed=0):
    a = np.eye(4)
    a[:3, 0] = np.asarray(row, float) * pixel[0]
    a[:3, 1] = np.asarray(col, float) * pixel[1]
    a[:3, 2] = step
    a[:3, 3] = origin
    pixels = np.random.default_rng(seed).random(shape)
    return stack_from_affine(pixels, a, thickness_mm=thickness)


def _cases():
    cases = {}
    cases["axial"] = _stack((1, 0, 0), (0, 1, 0), (0, 0, 4), (-1, -1, 1), (5, 22, 24))
    # coronal stored with flipped row and column: a permutation plus flips of the grid axes
    cases["coronal_flipped"] = _stack((-1, 0, 0), (0, 0, 1), (0, -3.5, 0), (24, 25, -1), (7, 21, 23), (1.05, 0.9))
    cases["sagittal"] = _stack((0, 1, 0), (0, 0, -1), (3, 0, 0), (1, -1, 21), (8, 23, 20))
    base = cases["axial"]
    origins = base.slice_origins_mm.copy()
    origins[2:] += [0.0, 0.0, 3.0]  # one gap of 7 mm among 4 mm steps
    cases["irregular_gaps"] = Stack(np.random.default_rng(1).random((5, 22, 24)), origins, (1, 0, 0), (0, 1, 0),
                                    (1.1, 1.1), 4.0)
    r = _rotation((1, 2, 3), 25)
    cases["oblique"] = _stack(r[:, 0], r[:, 1], r[:, 2] * 3, (2, 2, 2), (6, 20, 20))
    t = np.radians(17)
    # gantry tilt: image planes rotated about x, slice origins stepping along the table (z): sheared
    cases["tilted_sheared"] = _stack((1, 0, 0), (0, np.cos(t), np.sin(t)), (0, 0, 2.5), (0, -2, 0), (8, 22, 24))
    m = np.eye(4)
    m[:3, :3] = _rotation((0.3, -0.2, 1), 4)
    m[:3, 3] = (0.5, -0.3, 0.2)
    cases["registration_rotation"] = base.with_transform(m)
    r = _rotation((0, 0, 1), 30)
    cases["inplane_rotated"] = _stack(r[:, 0], r[:, 1], (0, 0, 3), (3, -5, 1), (6, 24, 24))
    return cases


CASES = _cases()
EXPECTED_PATH = {
    "axial": "separable",
    "coronal_flipped": "separable",
    "sagittal": "separable",
    "irregular_gaps": "separable",
    "oblique": "skew",
    "tilted_sheared": "skew",
    "registration_rotation": "skew",
    "inplane_rotated": "skew",
}


def _operators(stack, psf):
    """Every path the stack can take: auto, general (shared-axis where possible), general trilinear, shear and
    skew (built for every stack here, also beyond the drift make_operator accepts: its adjoint is exact anyway)."""
    ops = {"auto": make_operator(stack, GRID, psf)}
    ops["general"] = GeneralOperator(stack, GRID, psf)
    ops["trilinear"] = GeneralOperator(stack, GRID, psf, shared_axis=None)
    if shear_path_applies(stack, GRID):
        ops["shear"] = ShearOperator(stack, GRID, psf)
    ops["skew"] = SkewOperator(stack, GRID, psf)
    return ops


@pytest.mark.parametrize("psf", ["gaussian", "box"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_dot_product_every_path(name, psf):
    stack = CASES[name]
    rng = np.random.default_rng(42)
    for label, op in _operators(stack, psf).items():
        x = rng.standard_normal(GRID.shape)
        y = rng.standard_normal(stack.shape)
        ax = op.forward(x)
        aty = op.adjoint(y)
        assert ax.dtype == np.float64 and ax.shape == stack.shape
        assert aty.shape == GRID.shape
        lhs, rhs = float(np.vdot(ax, y)), float(np.vdot(x, aty))
        assert abs(lhs - rhs) <= 1e-5 * abs(lhs), (name, label, lhs, rhs)
        # normal() is adjoint(forward()) without the stack-shaped round trip
        np.testing.assert_allclose(op.normal(x), op.adjoint(op.forward(x)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CASES))
def test_path_choice_and_unit_rows(name):
    stack = CASES[name]
    op = make_operator(stack, GRID)
    assert op.path == EXPECTED_PATH[name]
    assert (separable_axes(stack, GRID) is not None) == (op.path == "separable")
    # rows sum to one: a constant volume is reproduced on every valid sample, zeros elsewhere
    ones = op.forward(np.full(GRID.shape, 3.0))
    assert op.valid.any()
    np.testing.assert_allclose(ones[op.valid], 3.0, rtol=2e-6)
    assert np.all(ones[~op.valid] == 0)
    # float32 in, float32 out
    assert op.forward(np.zeros(GRID.shape, np.float32)).dtype == np.float32
    assert op.adjoint(np.zeros(stack.shape, np.float32)).dtype == np.float32
    # A^T 1 (fast route) matches the adjoint of the valid mask
    np.testing.assert_allclose(op.adjoint_ones(), op.adjoint(op.valid.astype(np.float32)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_coverage_matches_geometry(name):
    stack = CASES[name]
    op = make_operator(stack, GRID)
    fast = op.coverage()
    generic = StackOperator.coverage(op)  # voxel by voxel through Stack.physical_to_index
    assert fast.dtype == bool and fast.shape == GRID.shape
    assert np.array_equal(fast, generic)
    assert fast.any()


def _smooth_volume():
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in GRID.shape], indexing="ij")
    return np.sin(k / 3.0) + np.cos(j / 2.5) * np.sin(i / 4.0) + 0.02 * (k - 10) ** 2


@pytest.mark.parametrize("name", ["axial", "coronal_flipped", "sagittal", "irregular_gaps"])
def test_separable_and_general_agree(name):
    """An axis-aligned stack forced through the general path simulates nearly the same slices."""
    stack = CASES[name]
    x = _smooth_volume()
    sep = make_operator(stack, GRID)
    assert isinstance(sep, SeparableOperator)
    ref = sep.forward(x)
    for op in (GeneralOperator(stack, GRID), GeneralOperator(stack, GRID, shared_axis=None),
               ShearOperator(stack, GRID), SkewOperator(stack, GRID)):
        y = op.forward(x)
        v = sep.valid & op.valid
        assert v.sum() > 0.8 * sep.valid.sum()
        rms = np.sqrt(np.mean((y[v] - ref[v]) ** 2)) / np.std(x)
        assert rms < 0.02, (name, rms)


def _row_moments(start, w):
    nodes = start[:, None] + np.arange(w.shape[1])[None, :]
    mean = (w * nodes).sum(axis=1)
    return mean, (w * (nodes - mean[:, None]) ** 2).sum(axis=1)


def test_psf_rows_normalised_with_the_requested_width():
    n = 60
    sigma = 2.0
    pos = np.array([10.0, 29.3, 30.5, 47.75])
    start, w = psf_rows(pos, n, "gaussian", sigma)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
    mean, var = _row_moments(start, w)
    np.testing.assert_allclose(mean, pos, atol=1e-9)
    # Cubic basis (the default): the row has the PSF's own variance wherever the sample falls between the
    # nodes (Keys' kernel reproduces quadratics), here the Gaussian's truncated at 3 sigma.
    truncated = 1.0 - 6.0 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2))
    np.testing.assert_allclose(var, truncated * sigma**2, rtol=1e-6)
    # box of width 4: variance 16/12 exactly, support within half the width plus the kernel's 2 nodes
    start, w = psf_rows(pos, n, "box", 4.0)
    mean, var = _row_moments(start, w)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(var, 16.0 / 12.0, rtol=1e-9)
    nodes = start[0] + np.arange(w.shape[1])
    assert np.all(w[0][np.abs(nodes - pos[0]) >= 4.0] == 0)
    # a point sample is the cubic interpolant: the node itself on a node, Keys' weights half-way
    start, w = psf_rows(np.array([20.0, 20.5]), n, "box", 1e-9)
    nodes = start[:, None] + np.arange(w.shape[1])[None, :]
    np.testing.assert_allclose(w[0][nodes[0] == 20], 1.0, atol=1e-6)
    np.testing.assert_allclose([w[1][nodes[1] == v][0] for v in (19, 20, 21, 22)],
                               [-1 / 16, 9 / 16, 9 / 16, -1 / 16], atol=1e-6)
    # samples outside [-0.5, n-0.5] are not modelled
    for basis in ("cubic", "linear"):
        _, w = psf_rows(np.array([-0.6, -0.4, n - 0.4, n - 0.6]), n, "gaussian", 1.0, basis=basis)
        assert w[0].sum() == 0 and w[2].sum() == 0
        assert w[1].sum() == pytest.approx(1.0) and w[3].sum() == pytest.approx(1.0)


def test_linear_basis_adds_a_position_dependent_blur():
    # Why the cubic basis: with the linear one the row's variance is the PSF's plus the hat's, and for a narrow
    # PSF that extra depends on where the sample falls (none on a node, a quarter node^2 half-way).
    n = 60
    start, w = psf_rows(np.array([10.0, 29.3, 30.5, 47.75]), n, "gaussian", 2.0, basis="linear")
    _, var = _row_moments(start, w)
    # Gaussian convolved with the hat, sampled at the nodes: sigma^2 + 1/6 (hat) + 1/12 (node sampling)
    np.testing.assert_allclose(var, 4.0 + 1 / 6 + 1 / 12, rtol=0.03)
    start, w = psf_rows(np.array([20.0, 20.5]), n, "box", 1e-9, basis="linear")
    _, var = _row_moments(start, w)
    np.testing.assert_allclose(var, [0.0, 0.25], atol=1e-6)
    start, w = psf_rows(np.array([20.0, 20.25, 20.5]), n, "gaussian", 0.9 / FWHM_PER_SIGMA)
    _, var = _row_moments(start, w)
    assert np.ptp(var) < 1e-3 * var.mean()
    with pytest.raises(ValueError, match="basis"):
        psf_rows(np.array([1.0]), n, "box", 2.0, basis="nearest")


def test_gaussian_psf_width_follows_the_convention():
    stack = CASES["axial"]
    op = make_operator(stack, GRID)
    # through-plane matrix rows: FWHM = thickness (4 mm) on a 1 mm grid
    d = op.mats[0].dense()
    row = d[2]
    nodes = np.arange(row.size)
    mean = (row * nodes).sum()
    var = (row * (nodes - mean) ** 2).sum()
    sigma = 4.0 / FWHM_PER_SIGMA
    assert var == pytest.approx(sigma**2, rel=0.05)  # cubic basis: the PSF's own variance


def test_forced_separable_path_refused_for_an_oblique_stack():
    with pytest.raises(InputError):
        make_operator(CASES["oblique"], GRID, path="separable")
    with pytest.raises(InputError):
        make_operator(CASES["axial"], GRID, psf="triangle")


def test_stack_outside_the_grid_gives_no_valid_samples():
    far = _stack((1, 0, 0), (0, 1, 0), (0, 0, 4), (500, 500, 500), (3, 5, 5))
    op = make_operator(far, GRID)
    assert not op.valid.any()
    assert not op.adjoint(np.ones(far.shape)).any()


@pytest.mark.parametrize("name", ["oblique", "tilted_sheared", "registration_rotation", "coronal_flipped"])
def test_threaded_operators_are_the_serial_ones(name):
    """With worker threads every path still has an exact adjoint and gives the serial results."""
    from MultiPlaneFusionLib.reconstruction.parallel import Workers
    from MultiPlaneFusionLib.reconstruction.workspace import Scratch

    stack = CASES[name]
    rng = np.random.default_rng(7)
    with Workers(3) as workers:
        for label, op in _operators(stack, "gaussian").items():
            x = rng.standard_normal(GRID.shape)
            y = rng.standard_normal(stack.shape)
            ax = op.forward(x, workers)
            aty = op.adjoint(y, workers)
            lhs, rhs = float(np.vdot(ax, y)), float(np.vdot(x, aty))
            assert abs(lhs - rhs) <= 1e-5 * abs(lhs), (name, label, lhs, rhs)
            np.testing.assert_allclose(ax, op.forward(x), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(aty, op.adjoint(y), rtol=1e-10, atol=1e-10)
            out = np.zeros(GRID.shape)
            op.normal(x, out=out, scale=0.5, workers=workers, scratch=Scratch(), accumulate=False)
            np.testing.assert_allclose(out, 0.5 * op.adjoint(op.forward(x)), rtol=1e-9, atol=1e-9)
            acc = np.ones(GRID.shape)
            op.adjoint_add(y, acc, workers)
            np.testing.assert_allclose(acc, 1.0 + op.adjoint(y), rtol=1e-9, atol=1e-9)
