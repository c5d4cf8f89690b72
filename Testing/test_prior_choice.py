"""The one-standard-error rule of the automatic weight and prior choices (autotune.one_standard_error_choice),
with the standard error of PAIRED differences over the same held-out (fold, stack) units; its use in
choose_prior / choose_alpha; and the prior choice kept across the registration refinement's rerun."""

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
from test_autotune import SCALE, _stacks

from MultiPlaneFusionLib.errors import InputError
from MultiPlaneFusionLib.reconstruction import autotune
from MultiPlaneFusionLib.reconstruction.autotune import (
    PRIOR_LADDER,
    Normalisation,
    choose_alpha,
    choose_prior,
    one_standard_error_choice,
)
from MultiPlaneFusionLib.reconstruction.options import SrrOptions
from MultiPlaneFusionLib.simulation import phantom_grid

# Per-unit held-out errors of a setting that does not matter: some stacks are predicted far worse than
# others (the real Philips series' pattern), a spread every candidate shares.
STACK_SPREAD = np.array([1.0, 30.0, 4.0, 1.2, 28.0, 5.0])
# Small deterministic zero-mean "noise" (a consistent difference is the offset plus this).
WIGGLE = np.array([0.01, -0.02, 0.015, -0.01, 0.02, -0.015])


def _unpaired_se(e):
    return float(np.std(e, ddof=1) / math.sqrt(len(e)))


def test_consistent_small_difference_under_a_large_spread_is_not_equivalent():
    # The smoother candidate is worse by 0.5 on every unit: the paired SE is ~0.01, so it is not within;
    # the unpaired SE of the best (std of the stack spread / sqrt 6, ~5.9) would call it equivalent.
    errors = {"smooth": STACK_SPREAD + 0.5 + WIGGLE, "sharp": STACK_SPREAD}
    chosen, rows = one_standard_error_choice(errors, ["smooth", "sharp"])
    assert chosen == "sharp", rows
    assert rows["smooth"]["within"] is False and rows["sharp"]["within"] is True
    assert rows["smooth"]["excess"] == pytest.approx(0.5)
    assert rows["smooth"]["standard_error"] < 0.05
    assert _unpaired_se(errors["sharp"]) > 10 * rows["smooth"]["excess"]  # what the old rule would have used
    # ... and the unpaired rule (still choose_alpha's) does call them equivalent
    chosen, rows = one_standard_error_choice(errors, ["smooth", "sharp"], paired=False)
    assert chosen == "smooth" and rows["smooth"]["standard_error"] == pytest.approx(_unpaired_se(errors["smooth"]))


def test_a_noisy_difference_keeps_the_smoothest_equivalent_candidate():
    # heavy: consistently worse; medium: a small mean excess drowned in its per-unit differences; light: best
    noisy = np.array([2.0, -1.5, 1.8, -1.2, 1.5, -1.0])
    errors = {1.0: STACK_SPREAD + 3.0 + WIGGLE, 0.3: STACK_SPREAD + noisy, 0.1: STACK_SPREAD}
    chosen, rows = one_standard_error_choice(errors, [1.0, 0.3, 0.1])
    assert chosen == 0.3, rows
    assert rows[0.3]["excess"] == pytest.approx(noisy.mean())
    assert rows[0.3]["standard_error"] == pytest.approx(np.std(noisy, ddof=1) / math.sqrt(6))
    assert [rows[a]["within"] for a in (1.0, 0.3, 0.1)] == [False, True, True]


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_ties_go_to_the_smoother_candidate(order):
    chosen, rows = one_standard_error_choice({"a": STACK_SPREAD, "b": STACK_SPREAD.copy()}, order)
    assert chosen == order[0] and all(r["within"] for r in rows.values())
    # equal means, different units: the smoother is the minimum itself
    chosen, _ = one_standard_error_choice({"a": STACK_SPREAD + WIGGLE, "b": STACK_SPREAD - WIGGLE}, order)
    assert chosen == order[0]


def test_a_single_unit_has_no_standard_error():
    chosen, rows = one_standard_error_choice({"smooth": [10.1], "sharp": [10.0]}, ["smooth", "sharp"])
    assert chosen == "sharp" and rows["smooth"]["standard_error"] == 0.0
    assert one_standard_error_choice({"smooth": [10.0], "sharp": [10.0]}, ["smooth", "sharp"])[0] == "smooth"


def test_a_unit_missing_for_one_candidate_is_dropped_from_all():
    # The last unit is missing for "smooth"; over the three common units both are equal (smooth wins the tie).
    # Scored on its own units only, "sharp" would have the lower mean (1.5 against 2.0) and win.
    errors = {"smooth": [1.0, 2.0, 3.0, np.nan], "sharp": [1.0, 2.0, 3.0, 0.0]}
    chosen, rows = one_standard_error_choice(errors, ["smooth", "sharp"])
    assert chosen == "smooth"
    assert rows["sharp"]["mean"] == pytest.approx(2.0)
    with pytest.raises(InputError, match="no held-out samples"):
        one_standard_error_choice({"a": [np.nan, 1.0], "b": [1.0, np.nan]}, ["a", "b"])
    with pytest.raises(ValueError, match="order"):
        one_standard_error_choice({"a": [1.0], "b": [1.0]}, ["a"])


def _fake_cv(monkeypatch, table):
    """``autotune._cv_errors`` answering from ``table``: {(regularizer, alpha): {(fold, stack): mse}}."""
    def fake(problem, profiles, alpha, *, folds, regularizer, huber, starts):
        return dict(table[(regularizer, alpha)])

    monkeypatch.setattr(autotune, "_cv_errors", fake)


def _units(values):
    """{(fold, stack): value} for six units (two folds x three stacks), in STACK_SPREAD's order."""
    return {(f, s): float(v) for (f, s), v in zip(((f, s) for f in range(2) for s in range(3)), values)}


def test_choose_prior_does_not_jump_to_the_largest_weight(monkeypatch):
    # Huber 0.5 best; Huber 1.5 worse by 0.3 on every unit (the unpaired rule, SE ~5.9, took it);
    # Huber 0.15 worse and noisy; Tikhonov worse throughout. Tikhonov 0.1 also has a unit no other
    # candidate has, with a huge error: it must not count.
    noisy = np.array([2.0, -1.5, 1.8, -1.2, 1.5, -1.0])
    table = {("huber", 1.5): _units(STACK_SPREAD + 0.3 + WIGGLE), ("huber", 0.5): _units(STACK_SPREAD),
             ("huber", 0.15): _units(STACK_SPREAD + 0.2 + noisy),
             ("tikhonov", 0.3): _units(STACK_SPREAD + 5.0), ("tikhonov", 0.1): _units(STACK_SPREAD + 2.0),
             ("tikhonov", 0.03): _units(STACK_SPREAD + 4.0 + noisy)}
    table[("tikhonov", 0.1)][(1, 3)] = 1e6
    _fake_cv(monkeypatch, table)
    scale = 10.0
    problem = SimpleNamespace(norm=Normalisation(0.0, scale))
    reg, alpha, rows = choose_prior(problem, [None] * 3)
    assert (reg, alpha) == ("huber", 0.5), rows
    assert [(r["regularizer"], r["alpha"]) for r in rows] == list(PRIOR_LADDER)
    by = {(r["regularizer"], r["alpha"]): r for r in rows}
    assert by[("huber", 1.5)]["within_one_standard_error"] is False
    assert by[("huber", 1.5)]["cv_mse_excess"] == pytest.approx(0.3 * scale ** 2, abs=1e-3)
    assert by[("huber", 1.5)]["cv_mse_standard_error"] < 0.05 * scale ** 2
    assert by[("huber", 0.5)]["cv_mse_excess"] == 0.0 and by[("huber", 0.5)]["within_one_standard_error"]
    assert by[("tikhonov", 0.1)]["cv_rms"] == pytest.approx(math.sqrt(STACK_SPREAD.mean() + 2.0) * scale, abs=1e-3)
    # the noisy Huber 0.15 is within one SE too, but the rule keeps the larger weight among those within
    assert by[("huber", 0.15)]["within_one_standard_error"] is True
    table[("huber", 1.5)] = _units(STACK_SPREAD + noisy * 0.5)
    assert choose_prior(problem, [None] * 3)[:2] == ("huber", 1.5)


def test_choose_alpha_keeps_the_unpaired_rule(monkeypatch):
    # choose_alpha stays on the unpaired rule (autotune.choose_alpha's docstring: measured on the phantom,
    # the paired one takes the ladder's lowest weight): the same table as the paired rule would answer 0.03
    # for gives the largest weight, each weight reporting its own standard error.
    ladder = autotune.ALPHA_LADDER["tikhonov"]  # (0.003, 0.01, 0.03, 0.1)
    noisy = np.array([2.0, -1.5, 1.8, -1.2, 1.5, -1.0])
    table = {("tikhonov", 0.1): _units(STACK_SPREAD + 0.4 + WIGGLE), ("tikhonov", 0.03): _units(STACK_SPREAD + noisy),
             ("tikhonov", 0.01): _units(STACK_SPREAD), ("tikhonov", 0.003): _units(STACK_SPREAD + 1.0)}
    _fake_cv(monkeypatch, table)
    problem = SimpleNamespace(norm=Normalisation(0.0, 1.0))
    alpha, rms, se = choose_alpha(problem, [None] * 3, regularizer="tikhonov")
    assert alpha == 0.1, (rms, se)
    assert sorted(rms) == sorted(ladder)
    assert se[0.01] == pytest.approx(_unpaired_se(STACK_SPREAD), abs=1e-3)
    paired = {a: np.array(list(table[("tikhonov", a)].values())) for a in ladder}
    assert one_standard_error_choice(paired, sorted(ladder, reverse=True))[0] == 0.03


def test_prior_choice_is_kept_through_the_refinement_rerun(monkeypatch, caplog):
    """On the registration refinement's rerun the regularizer and weight picked by --regularizer auto are
    given (not chosen again), and the final result still reports the choice and that it was automatic."""
    import MultiPlaneFusionLib.registration as registration
    from MultiPlaneFusionLib import pipeline
    from MultiPlaneFusionLib.progress import Monitor
    from MultiPlaneFusionLib.reconstruction import srr
    from MultiPlaneFusionLib.registration import RegistrationOptions

    given = []
    real = srr.reconstruct_srr

    def spied(stacks, grid, options=None, **kw):
        given.append(options)
        return real(stacks, grid, options, **kw)

    monkeypatch.setattr(srr, "reconstruct_srr", spied)
    # one refinement that reports a move, so the reconstruction runs a second time
    monkeypatch.setattr(registration, "refine_registration", lambda stacks, *a, **kw: (stacks, [{"moved": True}]))
    grid = phantom_grid(1.0, SCALE)
    options = pipeline.FuseOptions(register=True, registration=RegistrationOptions(refine_cycles=1),
                                   srr=SrrOptions(psf="gaussian", regularizer="auto", self_check=False))
    with caplog.at_level(logging.INFO, logger="MultiPlaneFusionLib"):
        _, _, info, _, _, _ = pipeline._srr_with_refinement(_stacks("gaussian", noise=20.0), grid, options,
                                                            background=-1024.0, monitor=Monitor.wrap(None))
    assert len(given) == 2 and given[0].regularizer == "auto"
    choice = info["prior_choice"]
    assert choice is not None and (choice["regularizer"], choice["alpha"]) in PRIOR_LADDER, info["prior_choice"]
    assert (given[1].regularizer, given[1].alpha) == (choice["regularizer"], choice["alpha"])
    assert (info["regularizer"], info["alpha"]) == (choice["regularizer"], choice["alpha"])
    assert info["regularizer_setting"] == "auto" and info["alpha_setting"] == "auto"
    assert all({"cv_mse_excess", "within_one_standard_error", "cv_mse_standard_error"} <= set(r)
               for r in choice["cv_by_candidate"])
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SRR done")]
    assert len(done) == 2 and all(f"{choice['regularizer']} alpha {choice['alpha']:.4g}" in m for m in done)


def test_huber_at_the_largest_weight_warns_about_thin_structures(monkeypatch, caplog):
    from MultiPlaneFusionLib.reconstruction.srr import reconstruct_srr

    top = max(a for r, a in PRIOR_LADDER if r == "huber")
    rows = [{"regularizer": r, "alpha": a, "cv_rms": 1.0, "cv_mse_standard_error": 0.0, "cv_mse_excess": 0.0,
             "within_one_standard_error": True} for r, a in PRIOR_LADDER]
    for picked, warned in ((("huber", top), True), (("huber", 0.5), False)):
        monkeypatch.setattr(autotune, "choose_prior", lambda *a, picked=picked, **kw: (*picked, rows))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="MultiPlaneFusionLib"):
            res = reconstruct_srr(_stacks("gaussian"), phantom_grid(1.0, SCALE),
                                  SrrOptions(psf="gaussian", regularizer="auto", self_check=False))
        warning = res.info["prior_choice"]["warning"]
        assert (warning is not None) == warned and (res.info["regularizer"], res.info["alpha"]) == picked
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("thin structures" in m for m in logged) == warned, logged
