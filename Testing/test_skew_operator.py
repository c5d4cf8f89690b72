"""The skew path for slightly tilted stacks: slices sit where their geometry says (a ramp through the grid comes
back as each pixel centre's position), the aligned case is the separable model, the path is chosen by the
profile's drift, irregular slice gaps keep an exact adjoint, and the fast ways of applying it (line runs, rows
shared per fractional shift) give the plain ways' numbers.

Exact adjoints on the shared geometries are tested with the other paths in test_operators.py, the model residual
against the analytic simulator in test_shear_operator.py.
"""

import numpy as np
import pytest

from MultiPlaneFusionLib.grid import Grid
from MultiPlaneFusionLib.reconstruction import skew_operator
from MultiPlaneFusionLib.reconstruction.operators import make_operator
from MultiPlaneFusionLib.reconstruction.separable_operator import SeparableOperator
from MultiPlaneFusionLib.reconstruction.skew_operator import (
    SHIFT_STEPS,
    SKEW_MAX_DRIFT_VOXELS,
    SkewOperator,
    skew_drift_voxels,
)
from MultiPlaneFusionLib.sampling.psf import psf_rows
from MultiPlaneFusionLib.stack import Stack
from MultiPlaneFusionLib.transforms import rotation_matrix

GRID = Grid(shape=(40, 44, 48), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0))


def _stack(rot, thickness=3.0, step=3.0, shape=(10, 40, 44), gaps=False, seed=0):
    """An axial-like stack through the grid's centre, turned by ``rot`` about that centre."""
    centre = np.array([23.5, 21.5, 19.5])
    row, col, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    pixel = 0.9
    nk, nj, ni = shape
    offsets = (np.arange(nk) - (nk - 1) / 2.0) * step
    if gaps:
        offsets[nk // 2:] += 2.0
    origins = (centre[None, :] - row * pixel * (ni - 1) / 2.0 - col * pixel * (nj - 1) / 2.0
               + offsets[:, None] * normal[None, :])
    pixels = np.random.default_rng(seed).random(shape)
    return Stack(pixels, origins, row, col, (pixel, pixel), thickness)


def _interior(op, margin=6.0):
    """Valid samples whose pixel centre lies ``margin`` voxels inside the grid."""
    st = op.stack
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in st.shape], indexing="ij")
    g = np.stack(GRID.physical_to_index(st.index_to_physical(k, j, i)), axis=0)
    hi = np.asarray(GRID.shape, float)[:, None, None, None] - 1 - margin
    return op.valid & np.all((g >= margin) & (g <= hi), axis=0), g


@pytest.mark.parametrize("axis, deg", [((1, 0.6, 0.3), 2.0), ((0, 0, 1), 20.0), ((0.3, -1, 0.2), 0.4)])
def test_a_ramp_comes_back_as_the_pixel_positions(axis, deg):
    """x = grid index along each axis in turn: every interior sample is that coordinate of its pixel centre
    (a symmetric profile integrates a linear function to its centre value), within the 1/64-node rounding
    of the line shifts and the Lanczos in-plane shears."""
    stack = _stack(rotation_matrix(axis, deg))
    op = SkewOperator(stack, GRID)
    inside, g = _interior(op)
    assert inside.sum() > 1000
    coords = np.meshgrid(*[np.arange(n, dtype=float) for n in GRID.shape], indexing="ij")
    for a in range(3):
        y = op.forward(coords[a])
        err = np.abs(y - g[a])[inside]
        assert err.max() < 0.04, (a, err.max())  # 1/64 node rounding + 0.02 for the shears


def test_aligned_stack_is_the_separable_model():
    stack = _stack(np.eye(3))
    sep = make_operator(stack, GRID)
    assert isinstance(sep, SeparableOperator)
    skew = SkewOperator(stack, GRID)
    inside, _ = _interior(skew, margin=4.0)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in GRID.shape], indexing="ij")
    x = np.sin(k / 3.0) * np.cos(j / 2.5) + np.sin(i / 4.0)
    np.testing.assert_allclose(skew.forward(x)[inside], sep.forward(x)[inside], atol=1e-4)


def test_path_follows_the_profile_drift():
    small = _stack(rotation_matrix((1, 0.6, 0.3), 0.5))
    assert skew_drift_voxels(small, GRID) <= SKEW_MAX_DRIFT_VOXELS
    op = make_operator(small, GRID)
    assert op.path == "skew" and op.pre_shear_axes == ()
    # the same tilt with a much thicker profile drifts more: the grid is pre-sheared first (not the shear path,
    # which is taken only when asked for)
    thick = _stack(rotation_matrix((1, 0.6, 0.3), 4.0), thickness=8.0, step=8.0, shape=(4, 40, 44))
    assert skew_drift_voxels(thick, GRID) > SKEW_MAX_DRIFT_VOXELS
    op = make_operator(thick, GRID)
    assert op.path == "skew" and op.pre_shear_axes
    assert skew_drift_voxels(thick, GRID, pre_shear=len(op.pre_shear_axes)) <= SKEW_MAX_DRIFT_VOXELS
    assert make_operator(thick, GRID, path="shear").path == "shear"
    # a turn about the slice normal alone does not drift, at any angle
    spun = _stack(rotation_matrix((0, 0, 1), 35.0))
    assert skew_drift_voxels(spun, GRID) == pytest.approx(0.0, abs=1e-12)
    op = make_operator(spun, GRID)
    assert op.path == "skew" and op.pre_shear_axes == ()


@pytest.mark.parametrize("psf", ["gaussian", "box"])
def test_irregular_gaps_keep_an_exact_adjoint(psf):
    stack = _stack(rotation_matrix((1, 0.6, 0.3), 1.5), gaps=True)
    op = SkewOperator(stack, GRID, psf)
    assert op.describe()["per_slice_inplane"]
    regular = SkewOperator(_stack(rotation_matrix((1, 0.6, 0.3), 1.5)), GRID, psf)
    assert not regular.describe()["per_slice_inplane"]  # a regular step's drift goes into the shears
    rng = np.random.default_rng(3)
    x = rng.standard_normal(GRID.shape)
    y = rng.standard_normal(stack.shape)
    lhs, rhs = float(np.vdot(op.forward(x), y)), float(np.vdot(x, op.adjoint(y)))
    assert abs(lhs - rhs) <= 1e-9 * abs(lhs)
    ones = op.forward(np.full(GRID.shape, 2.0))
    np.testing.assert_allclose(ones[op.valid], 2.0, rtol=2e-6)


def _tilted(tilt_deg, thickness=2.5, extra_deg=0.0):
    """A gantry-tilted axial series (sheared), optionally turned by ``extra_deg`` more (registered)."""
    t = np.radians(tilt_deg)
    rot = rotation_matrix((1, 0.6, 0.3), extra_deg)
    row, col = rot @ np.array([1.0, 0.0, 0.0]), rot @ np.array([0.0, np.cos(t), np.sin(t)])
    nk, nj, ni = 12, 40, 44
    origins = np.array([23.5, 21.5, 19.5]) - row * 0.9 * (ni - 1) / 2 - col * 0.9 * (nj - 1) / 2
    origins = origins[None, :] + ((np.arange(nk) - (nk - 1) / 2) * 2.5)[:, None] * (rot @ np.array([0, 0, 1.0]))
    return Stack(np.random.default_rng(0).random((nk, nj, ni)), origins, row, col, (0.9, 0.9), thickness)


def _check_positions_and_adjoint(op, stack):
    """Slices sit where they should (a ramp along each grid axis comes back as the pixel centres' indices,
    within 0.04 node), the adjoint is exact and adjoint_add adds."""
    inside, g = _interior(op)
    assert inside.sum() > 1000
    coords = np.meshgrid(*[np.arange(n, dtype=float) for n in GRID.shape], indexing="ij")
    for a in range(3):
        err = np.abs(op.forward(coords[a]) - g[a])[inside]
        assert err.max() < 0.04, (a, err.max())
    rng = np.random.default_rng(5)
    x = rng.standard_normal(GRID.shape)
    y = rng.standard_normal(stack.shape)
    lhs, rhs = float(np.vdot(op.forward(x), y)), float(np.vdot(x, op.adjoint(y)))
    assert abs(lhs - rhs) <= 1e-9 * abs(lhs)
    out = np.ones(GRID.shape)
    op.adjoint_add(y, out)
    np.testing.assert_allclose(out, 1.0 + op.adjoint(y), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("extra", [0.0, 0.4])
def test_gantry_tilt_takes_the_pre_shear(extra):
    """An 18-degree gantry tilt drifts far too much for the plain skew path; sheared once along the column's
    grid axis the profile runs along the normal, the slices sit where they should and the adjoint is exact."""
    stack = _tilted(18.0, extra_deg=extra)
    assert skew_drift_voxels(stack, GRID) > 2 * SKEW_MAX_DRIFT_VOXELS
    assert skew_drift_voxels(stack, GRID, pre_shear=True) < 0.02
    op = make_operator(stack, GRID)
    assert op.path == "skew" and op.describe()["pre_shear_axis"] == "j"
    _check_positions_and_adjoint(op, stack)


@pytest.mark.parametrize("tilt, extra", [(18.0, 0.4), (2.0, 0.0)])
def test_line_runs_give_the_line_groups_numbers(tilt, extra, monkeypatch):
    """Through-plane lines applied run by run (strided views) and by gathered groups agree, both ways; the rows
    moved by whole nodes per fractional shift are the rows computed at each position."""
    stack = _tilted(tilt, extra_deg=extra)
    monkeypatch.setattr(skew_operator, "_MIN_RUN_LINES", 1)
    op = make_operator(stack, GRID)
    assert op.path == "skew" and op._runs is not None
    monkeypatch.setattr(skew_operator, "_MIN_RUN_LINES", 10 ** 9)
    ref = make_operator(stack, GRID)
    assert ref._runs is None
    rng = np.random.default_rng(2)
    x = rng.standard_normal(GRID.shape)
    y = rng.standard_normal(stack.shape)
    # (the float32 normalisation of the two builds differs by round-off)
    np.testing.assert_allclose(op.forward(x), ref.forward(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(op.adjoint(y), ref.adjoint(y), rtol=1e-6, atol=1e-6)
    flat, w, n_t = op._rows
    nk = w.shape[1]
    for g in range(0, len(op._groups), max(1, len(op._groups) // 7)):
        key = op._group_keys[g]
        start, want = psf_rows(op._centre_t + key / SHIFT_STEPS, n_t, op.psf, op._width_t)
        dense = np.zeros((nk, n_t))
        for t in range(want.shape[1]):
            dense[np.arange(nk), start + t] += want[:, t]
        np.testing.assert_allclose(op._matrix(g, np.float64), dense, atol=1e-12)


def test_double_oblique_planes_take_the_two_axis_pre_shear():
    """A plane tilted about both in-plane grid axes (oblique MR) drifts too much with one shear; sheared along
    both the profile runs along the normal (no drift), the slices sit where they should, the adjoint is exact.
    Beyond PRE_SHEAR_MAX_DEG the general path stays."""
    def oblique(ax_deg, ay_deg, nk=10, step=3.0):
        rot = rotation_matrix((1, 0, 0), ax_deg) @ rotation_matrix((0, 1, 0), ay_deg) @ rotation_matrix((0, 0, 1), 7)
        row, col, normal = rot[:, 0], rot[:, 1], rot[:, 2]
        ni, nj = 44, 40
        origins = (np.array([23.5, 21.5, 19.5])[None] - row * 0.9 * (ni - 1) / 2 - col * 0.9 * (nj - 1) / 2
                   + ((np.arange(nk) - (nk - 1) / 2) * step)[:, None] * normal)
        return Stack(np.random.default_rng(0).random((nk, nj, ni)), origins, row, col, (0.9, 0.9), step)

    stack = oblique(15.0, 12.0)
    assert skew_drift_voxels(stack, GRID, pre_shear=1) > SKEW_MAX_DRIFT_VOXELS
    assert skew_drift_voxels(stack, GRID, pre_shear=2) < 1e-9
    op = make_operator(stack, GRID)
    assert op.path == "skew" and sorted(op.describe()["pre_shear_axis"]) == ["i", "j"]
    _check_positions_and_adjoint(op, stack)
    assert make_operator(oblique(25.0, 20.0), GRID).path == "general"  # normal 32 degrees off
