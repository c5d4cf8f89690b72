"""The shear path for stacks rotated against the grid: the factorisation, the model's accuracy against the
analytic simulator (no inverse crime) and its agreement with the separable path at zero rotation.

Exact adjoints of the shear path on every geometry are tested with the other paths in test_operators.py.
"""

from dataclasses import replace

import numpy as np
import pytest

from MultiPlaneFusionLib.reconstruction.general_operator import GeneralOperator
from MultiPlaneFusionLib.reconstruction.operators import make_operator
from MultiPlaneFusionLib.reconstruction.shear_operator import ShearOperator, ShearStage, shear_factors
from MultiPlaneFusionLib.reconstruction.skew_operator import SkewOperator
from MultiPlaneFusionLib.registration import rigid_matrix
from MultiPlaneFusionLib.simulation import phantom_bounds_mm, phantom_grid, phantom_truth, simulate_stack
from MultiPlaneFusionLib.transforms import rotation_matrix

SCALE = 0.4


@pytest.mark.parametrize("axis, deg", [((1, 2, 3), 5.0), ((1, 0, 0), 0.3), ((0.2, -1, 0.1), 11.0)])
def test_rotations_factor_into_four_shears(axis, deg):
    r = rotation_matrix(axis, deg)
    perm = np.eye(3)[[1, 0, 2]] * np.array([1, -1, 1])[:, None]
    perm, order, coef = shear_factors(r @ perm)
    m = np.eye(3)
    for a, c in zip(order, coef):
        s = np.eye(3)
        s[a] += c
        m = m @ s
    np.testing.assert_allclose(m @ perm, r @ (np.eye(3)[[1, 0, 2]] * np.array([1, -1, 1])[:, None]), atol=1e-10)
    assert len(set(order)) == 3 and all(c[a] == 0 for a, c in zip(order, coef))


@pytest.fixture(scope="module")
def phantom():
    grid = phantom_grid(1.0, SCALE)
    lo, hi = phantom_bounds_mm(SCALE)
    return grid, phantom_truth(grid, SCALE).astype(np.float32), (np.asarray(lo) + np.asarray(hi)) / 2.0


def _residual(op, stack, x):
    r = (op.forward(x) - stack.pixels)[op.valid]
    return float(np.sqrt(np.mean(r * r)))


# The simulator's in-plane kernel (simulation.acquisition): the operators are compared with a model that
# matches the data, so that the residual measures the operators, not a model width (the reconstruction's
# default width is narrower since 2026-12-03).
SIMULATED_KERNEL_FWHM_PX = 1.2


def _rotated(deg, axis, centre):
    motion = rigid_matrix(np.asarray(axis, float) / np.linalg.norm(axis) * deg, (0.0, 0.0, 0.0), centre)
    stack = simulate_stack("coronal", thickness_mm=4.0, pixel_spacing_mm=0.8, scale=SCALE, noise_hu=0.0,
                           motion=motion)
    # registered: the transform puts it back
    return replace(stack.with_transform(np.linalg.inv(motion)), in_plane_fwhm_factor=SIMULATED_KERNEL_FWHM_PX)


def test_model_residual_of_rotated_stacks_stays_near_the_aligned_one(phantom):
    """Noise-free coronal series of the analytic phantom acquired from the head rotated by 0.5-5 degrees: the
    residual ||y - A x_true|| of the shear path, of the skew path and of the path make_operator picks stays
    within 10 % of the unrotated stack's (separable path), at each angle, and below the trilinear path's."""
    grid, x, centre = phantom
    base = _residual(make_operator(_rotated(0.0, (1, 0, 0), centre), grid), _rotated(0.0, (1, 0, 0), centre), x)
    # Small angles in steps (below 0.3 degree the residual of this phantom is 10-16 % above the aligned one's
    # on every path; not understood yet, see the README).
    small = [(deg, (1, 0.6, 0.3)) for deg in (0.5, 0.75, 1.0)]
    for deg, axis in small + [(2.0, (0, 0, 1)), (5.0, (1, 0.6, 0.3)), (5.0, (1, 0, 0))]:
        stack = _rotated(deg, axis, centre)
        auto = make_operator(stack, grid)
        assert auto.path == "skew"  # with its pre-shear when the plain skew path drifts too far
        r_tri = _residual(GeneralOperator(stack, grid, shared_axis=None), stack, x)
        for op in (auto, ShearOperator(stack, grid), SkewOperator(stack, grid)):
            r = _residual(op, stack, x)
            assert r <= 1.10 * base, (deg, axis, op.path, r, base)
            assert r < r_tri, (deg, axis, op.path, r, r_tri)


def test_zero_rotation_reproduces_the_separable_model(phantom):
    grid, x, centre = phantom
    stack = _rotated(0.0, (1, 0, 0), centre)
    sep = make_operator(stack, grid)
    assert sep.path == "separable"
    shear = ShearOperator(stack, grid)
    v = sep.valid & shear.valid
    assert v.sum() > 0.95 * sep.valid.sum()
    a, b = sep.forward(x), shear.forward(x)
    # identical away from the grid's border (where the cubic taps run out and the rows are renormalised)
    assert np.sqrt(np.mean((a[v] - b[v]) ** 2)) < 0.5


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shear", [(0.0, 0.0), (0.04, 0.0), (0.0, 0.09), (0.2, -0.15)])
def test_a_stage_by_slabs_gives_the_line_gathers_numbers(axis, shear):
    """ShearStage by 2-D slabs (banded products when no shear runs along the slab) equals the line-gather
    implementation, its transpose is exact, and the transpose adds into a given array."""
    coef = np.zeros(3)
    others = [b for b in range(3) if b != axis]
    coef[others] = shear
    rng = np.random.default_rng(axis)
    boxes = ((np.array([0, 0, 0]), (44, 40, 46), np.array([-2, 1, -3]), (47, 38, 49)),
             (np.array([1, -2, 0]), (44, 40, 46), np.array([0, 0, 0]), (41, 43, 45)))
    for lo_in, shape_in, lo_out, shape_out in boxes:
        args = (axis, coef, -1.3, lo_in, np.array(shape_in), lo_out, np.array(shape_out))
        slabs, lines = ShearStage(*args, method="slabs"), ShearStage(*args, method="lines")
        x = rng.standard_normal(shape_in)
        y = rng.standard_normal(shape_out)
        fx = slabs.forward(x)
        np.testing.assert_allclose(fx, lines.forward(x), rtol=0, atol=1e-12)
        aty = slabs.adjoint(y)
        np.testing.assert_allclose(aty, lines.adjoint(y), rtol=0, atol=1e-12)
        assert abs(np.vdot(fx, y) - np.vdot(x, aty)) <= 1e-12 * abs(np.vdot(fx, y))
        for stage in (slabs, lines):
            out = np.ones(shape_in)
            assert stage.adjoint(y, out=out) is out
            np.testing.assert_allclose(out, 1.0 + aty, rtol=0, atol=1e-12)
