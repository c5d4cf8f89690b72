"""Rigid registration: known synthetic motions, the real Philips series (moved and as acquired), guards,
refinement against a reconstruction, transform files, options and cancellation.

Transform convention under test: ``Stack.transform`` maps scanner -> patient, so a stack simulated with
patient ``motion`` M is perfectly registered when ``stack.transform == inv(M)``; the .tfm file holds the
inverse (patient -> scanner, SimpleITK's fixed -> moving), i.e. M itself.
"""

import argparse
import logging
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from MultiPlaneFusionLib.errors import CancelledError, InputError
from MultiPlaneFusionLib.grid import Grid
from MultiPlaneFusionLib.metrics import correlation
from MultiPlaneFusionLib.progress import Monitor
from MultiPlaneFusionLib.reading import read_stacks
from MultiPlaneFusionLib.reconstruction import fuse_average
from MultiPlaneFusionLib.registration import (
    RegistrationOptions,
    add_registration_arguments,
    refine_registration,
    register_stacks,
    registration_options_from_args,
    rigid_matrix,
    target_registration_error,
    write_transforms,
)
from MultiPlaneFusionLib.registration.rigid import _judge, register_pair
from MultiPlaneFusionLib.sampling import resample_stack
from MultiPlaneFusionLib.sampling.psf import psf_sigma_mm
from MultiPlaneFusionLib.simulation import phantom_bounds_mm, phantom_grid, phantom_truth, simulate_stack
from MultiPlaneFusionLib.transforms import apply, box_corners, describe_motion, rotation_vector_deg

SCALE = 0.5  # a small head keeps every synthetic case to about a second
PIXEL_MM = 1.2
THICKNESS_MM = 3.0
FRAME = "1.2.826.0.1.3680043.2.1125.1"
# Tests about other things than accuracy at the defaults compare on a coarser grid (about 3x faster).
FAST = RegistrationOptions(spacing_mm=2.0)


def head_box(scale=SCALE):
    """The 8 corners of the phantom head's bounding box (the TRE targets) and its centre."""
    lo, hi = phantom_bounds_mm(scale)
    pad = 6.0 * scale  # phantom_bounds_mm adds 6 mm of air (times the scale) around the head
    corners = box_corners(lo + pad, hi - pad)
    return corners, corners.mean(axis=0)


def random_motion(rng, centre, max_translation_mm=8.0, max_rotation_deg=5.0):
    """A rigid motion: rotation of up to ``max_rotation_deg`` about a random axis through ``centre``,
    translation of up to ``max_translation_mm`` in a random direction (at least half of each)."""
    axis = rng.normal(size=3)
    direction = rng.normal(size=3)
    angle = rng.uniform(0.5, 1.0) * max_rotation_deg
    shift = rng.uniform(0.5, 1.0) * max_translation_mm
    return rigid_matrix(axis / np.linalg.norm(axis) * angle, direction / np.linalg.norm(direction) * shift, centre)


def simulate(orientation, seed, motion=None, frame=FRAME, **kw):
    kw.setdefault("thickness_mm", THICKNESS_MM)
    return simulate_stack(
        orientation, pixel_spacing_mm=PIXEL_MM, scale=SCALE, noise_hu=15.0, seed=seed, motion=motion,
        frame_of_reference_uid=frame, **kw,
    )


# ------------------------------------------------------------------------------------ synthetic motions
@pytest.mark.parametrize("seed", [0, 1])
def test_known_motions_are_recovered(seed):
    corners, centre = head_box()
    rng = np.random.default_rng(seed)
    motions = [np.eye(4), random_motion(rng, centre), random_motion(rng, centre)]
    stacks = [simulate(o, 3 * seed + n, m) for n, (o, m) in enumerate(zip(("axial", "coronal", "sagittal"), motions))]
    out, reports = register_stacks(stacks, reference=0)
    assert len(out) == len(reports) == 3
    assert reports[0]["reference"] and np.array_equal(out[0].transform, np.eye(4))
    for stack, motion, report in zip(out[1:], motions[1:], reports[1:]):
        before = target_registration_error(np.eye(4), np.linalg.inv(motion), corners)
        tre = target_registration_error(stack.transform, np.linalg.inv(motion), corners)
        assert before > 3.0  # the motion matters ...
        assert tre <= 0.5, f"{stack.description}: TRE {tre:.3f} mm (was {before:.2f} mm)"  # ... and is undone
        assert report["accepted"] and report["warning"] is None
        assert report["initialisation"] == "scanner geometry"
        assert report["final_metric"] < report["initial_metric"]
        assert report["iterations"] > 0
        assert report["motion"] == "small" and report["search"] is None  # small motions: no search, no extra cost
        assert report["decision"].startswith("small motion accepted")
        # The reported motion is the stack's transform described at its centre.
        true = describe_motion(np.linalg.inv(motion), stack.with_transform(np.eye(4)).corners_mm().mean(axis=0))
        assert np.allclose(report["translation_mm"], true["translation_mm"], atol=0.5)
        assert np.allclose(report["rotation_deg"], true["rotation_deg"], atol=0.5)
        # The input stacks are not modified.
    assert all(np.array_equal(s.transform, np.eye(4)) for s in stacks)


def test_aligned_reformats_stay_exactly_aligned():
    """Orthogonal series of one acquisition: a sub-0.25 mm 'correction' is noise and is not applied."""
    stacks = [simulate("axial", 0), simulate("coronal", 1), simulate("sagittal", 2)]
    out, reports = register_stacks(stacks, options=FAST)
    for stack, report in zip(out[1:], reports[1:]):
        assert np.array_equal(stack.transform, np.eye(4))
        assert report["accepted"] and report["warning"] is None and "kept" in report["note"]
        assert report["final_metric"] == report["initial_metric"] >= report["result_metric"] - 1e-3


def test_registration_methods_are_freed():
    """SimpleITK's iteration command refers back to its method: unless it is removed, every registration's
    method, masks and samples stayed alive for the life of the process (a batch worker, a Slicer session)."""
    import gc

    def live_methods():
        gc.collect()
        return sum(isinstance(o, sitk.ImageRegistrationMethod) for o in gc.get_objects())

    before = live_methods()
    stacks = [simulate("axial", 0), simulate("coronal", 1)]
    register_stacks(stacks, options=FAST)
    assert live_methods() == before


def test_other_frame_of_reference_starts_from_moments():
    """Series whose headers do not share a frame: centring on the foreground, then registration."""
    corners, centre = head_box()
    motion = rigid_matrix((0.0, 0.0, 4.0), (25.0, -10.0, 5.0), centre)  # beyond the 20 mm guard on purpose
    ref = simulate("axial", 0)
    moving = simulate("coronal", 1, motion, frame="1.2.3.4.other")
    out, reports = register_stacks([ref, moving], options=FAST)
    assert reports[1]["initialisation"] == "moments centring"
    assert reports[1]["accepted"]
    assert target_registration_error(out[1].transform, np.linalg.inv(motion), corners) <= 0.5


def test_sheared_stack_with_gaps_is_registered():
    """A gantry-tilted series with irregular gaps (4.2 mm, one 1.1 mm, then 7.4 mm steps) as the moving stack."""
    corners, centre = head_box()
    motion = rigid_matrix((2.0, -3.0, 1.0), (4.0, -3.0, 2.0), centre)
    offsets = np.concatenate([np.arange(-50.0, -10.0, 4.2), [-9.0], np.arange(-1.9, 55.0, 7.4)])
    moving = simulate("coronal", 1, motion, tilt_deg=15.0, slice_offsets_mm=offsets, thickness_mm=4.0)
    assert moving.is_sheared and moving.has_gaps
    out, reports = register_stacks([simulate("axial", 0), moving], options=FAST)
    assert reports[1]["accepted"]
    assert target_registration_error(out[1].transform, np.linalg.inv(motion), corners) <= 0.5


def mr_like(stack):
    """An MR-like contrast of a simulated CT stack: dark air and bone, bright soft tissue (not monotonic)."""
    hu = stack.pixels
    values = np.where(hu < -500, 20.0, np.where(hu > 300, 150.0, 800.0 - 0.3 * np.abs(hu)))
    values = values + np.random.default_rng(0).normal(0.0, 10.0, hu.shape)
    return replace(stack, pixels=values.astype(np.float32), modality="MR")


def test_mutual_information_across_contrasts():
    corners, centre = head_box()
    motion = rigid_matrix((2.0, -3.0, 1.0), (4.0, -3.0, 2.0), centre)
    ref, moving = simulate("axial", 0), simulate("sagittal", 1, motion)
    for stacks in ([ref, mr_like(moving)], [mr_like(ref), mr_like(moving)]):  # CT to MR, MR to MR (Otsu masks)
        out, reports = register_stacks(stacks, options=FAST)
        assert reports[1]["accepted"]
        assert target_registration_error(out[1].transform, np.linalg.inv(motion), corners) <= 0.5


# ------------------------------------------------------------------------------------------------ guards
def test_a_result_beyond_the_bounds_is_rejected(caplog):
    corners, centre = head_box()
    motion = rigid_matrix((0.0, 2.0, 0.0), (0.0, 6.0, 0.0), centre)
    stacks = [simulate("axial", 0), simulate("coronal", 1, motion)]
    tight = replace(FAST, max_translation_mm=2.0, max_large_translation_mm=2.0, motion_search="off")
    with caplog.at_level(logging.WARNING, logger="MultiPlaneFusionLib"):
        out, reports = register_stacks(stacks, options=tight)
    assert not reports[1]["accepted"] and reports[1]["motion"] == "implausible"
    assert "mm" in reports[1]["warning"] and "kept" in reports[1]["warning"]
    assert np.array_equal(out[1].transform, np.eye(4))  # the scanner geometry is kept
    assert any("registration of" in r.getMessage() for r in caplog.records)
    # Beyond the small-motion bound but within the large one: accepted, as the metric clearly improves ...
    out, reports = register_stacks(stacks, options=replace(tight, max_large_translation_mm=10.0))
    assert reports[1]["accepted"] and reports[1]["motion"] == "large" and "large motion" in reports[1]["note"]
    assert reports[1]["gain"] >= tight.large_motion_min_gain
    assert target_registration_error(out[1].transform, np.linalg.inv(motion), corners) <= 0.5
    # ... but not when the gain asked for is out of reach (the guard, not the optimiser, rejected it).
    out, reports = register_stacks(stacks, options=replace(tight, max_large_translation_mm=10.0,
                                                           large_motion_min_gain=1e3))
    assert not reports[1]["accepted"] and "gain" in reports[1]["warning"]
    assert np.array_equal(out[1].transform, np.eye(4))


def large_motion(seed, centre, max_rotation_deg=25.0, max_translation_mm=15.0):
    """A rotation of 17 to ``max_rotation_deg`` about a random axis through ``centre`` (the fetal MRI range and
    above) and a translation of 5 to ``max_translation_mm`` in a random direction."""
    rng = np.random.default_rng(100 + seed)
    axis, direction = rng.normal(size=3), rng.normal(size=3)
    angle, shift = rng.uniform(17.0, max_rotation_deg), rng.uniform(5.0, max_translation_mm)
    return rigid_matrix(axis / np.linalg.norm(axis) * angle, direction / np.linalg.norm(direction) * shift, centre)


@pytest.mark.parametrize("seed, orientation, frame", [(0, "coronal", FRAME), (1, "sagittal", FRAME),
                                                      (2, "sagittal", "1.2.3.4.other")])
def test_large_motions_are_recovered_by_default(seed, orientation, frame):
    """Stacks moved by 17-25 degrees and 5-15 mm (patient motion between MR stacks of one session, same frame of
    reference, or a stack of another frame): registered to <= 0.5 mm TRE with the default options. Without the
    rotation search the local optimiser stops 0.8-16 mm short on most of these (benchmarks/bench_registration.py)."""
    corners, centre = head_box()
    motion = large_motion(seed, centre)
    out, reports = register_stacks([simulate("axial", 0), simulate(orientation, seed + 1, motion, frame=frame)])
    report = reports[1]
    tre = target_registration_error(out[1].transform, np.linalg.inv(motion), corners)
    assert tre <= 0.5, (tre, report["initialisation"], report["search"])
    assert report["accepted"] and report["motion"] == "large" and "large motion accepted" in report["note"]
    assert report["search"] is not None and report["search"]["candidates"] > 10  # the large motion set it off
    assert report["gain"] >= RegistrationOptions().large_motion_min_gain and report["decision"] == report["note"]
    starts = ["scanner geometry"] if frame == FRAME else ["moments centring", "scanner geometry"]
    assert [t["initialisation"] for t in report["initialisations_tried"]] == starts


def test_implausible_motions_are_rejected():
    """A 45 mm shift (half the head) is found by the search, and rejected as implausible."""
    _, centre = head_box()
    ref = simulate("axial", 0)
    shifted = simulate("coronal", 1, rigid_matrix((0.0, 0.0, 5.0), (45.0, 0.0, 0.0), centre))
    out, reports = register_stacks([ref, shifted], options=FAST)
    assert not reports[1]["accepted"] and reports[1]["motion"] == "implausible"
    assert "plausible" in reports[1]["warning"] and np.array_equal(out[1].transform, np.eye(4))
    assert reports[1]["search"]["reason"] == "local result rejected"


@pytest.mark.parametrize("angle_deg, shift_mm, gain, verdict", [
    (8.0, 15.0, 0.01, "small"), (25.0, 15.0, 0.5, "large"), (25.0, 15.0, 0.01, "no clear gain"),
    (5.0, 0.0, -0.5, "worse"), (60.0, 2.0, 5.0, "implausible"), (5.0, 45.0, 5.0, "implausible")])
def test_guards_by_motion_and_gain(angle_deg, shift_mm, gain, verdict):
    """Small motions pass on any improvement, large ones (beyond 10 degrees / 20 mm) only on a clear one (5 %),
    beyond 40 degrees / 40 mm nothing passes."""
    options = RegistrationOptions()
    change = {"translation_mm": [shift_mm, 0.0, 0.0], "rotation_deg": [0.0, 0.0, angle_deg],
              "rotation_angle_deg": angle_deg}
    warning, motion, measured = _judge(options, change, -1.0, -1.0 - gain)
    assert np.isclose(measured, gain)
    if verdict in ("small", "large"):
        assert warning is None and motion == verdict
    else:
        assert warning is not None and (motion == "implausible") == (verdict == "implausible")
        assert {"no clear gain": "gain", "worse": "worse", "implausible": "plausible"}[verdict] in warning


def test_a_result_worse_than_the_start_is_rejected():
    """Start the optimiser 15 mm off with a single iteration: it cannot get back, the start geometry wins."""
    _, centre = head_box()
    ref, moving = simulate("axial", 0), simulate("sagittal", 1)
    far = np.linalg.inv(rigid_matrix((0, 0, 0), (15.0, 0.0, 0.0), centre))
    options = RegistrationOptions(iterations=1, shrink_factors=(1,), smoothing_sigmas=(0.0,))
    r, info = register_pair(ref, psf_sigma_mm(ref), moving, r_start=np.eye(4), r_init=far, options=options,
                            monitor=Monitor())
    assert not info["accepted"]
    assert "worse" in info["warning"]
    assert info["result_metric"] > info["initial_metric"]
    assert np.array_equal(r, np.eye(4))


def test_a_stack_outside_the_reference_is_kept_with_a_warning():
    ref, moving = simulate("axial", 0), simulate("coronal", 1)
    far = moving.with_transform(rigid_matrix(translation_mm=(0.0, 0.0, 400.0)))
    out, reports = register_stacks([ref, far])
    assert not reports[1]["accepted"] and "overlap" in reports[1]["warning"]
    assert np.array_equal(out[1].transform, far.transform)


def test_disabled_registration_returns_the_stacks_untouched():
    stacks = [simulate("axial", 0), simulate("coronal", 1)]
    out, reports = register_stacks(stacks, options=RegistrationOptions(enabled=False))
    assert reports == [] and all(a is b for a, b in zip(out, stacks))
    out, reports = refine_registration(stacks, np.zeros((2, 2, 2)), None, options=RegistrationOptions(enabled=False))
    assert reports == [] and all(a is b for a, b in zip(out, stacks))
    with pytest.raises(InputError):
        register_stacks(stacks, reference=2)


# ----------------------------------------------------------------------------------------- refinement
def test_refinement_against_a_reconstruction_converges():
    """Against a perfect reconstruction (the phantom on a 1.5 mm grid, partly uncovered), stacks 2 mm / 2 degrees
    off converge."""
    corners, centre = head_box()
    rng = np.random.default_rng(7)
    motions = [np.eye(4), random_motion(rng, centre), random_motion(rng, centre)]
    stacks = [simulate(o, n, m) for n, (o, m) in enumerate(zip(("axial", "coronal", "sagittal"), motions))]
    offsets = [random_motion(rng, centre, 2.0, 2.0) for _ in motions[1:]]
    start = [stacks[0]] + [s.with_transform(np.linalg.inv(m) @ o) for s, m, o in zip(stacks[1:], motions[1:], offsets)]
    grid = phantom_grid(1.5, SCALE)
    volume = phantom_truth(grid, SCALE)
    # As with --extent union: the top quarter holds only the background value (no stack covered it).
    coverage = np.ones(grid.shape, dtype=np.uint8)
    coverage[3 * grid.shape[0] // 4 :] = 0
    volume[coverage == 0] = -1024.0
    out, reports = refine_registration(start, volume, grid, options=RegistrationOptions(), coverage=coverage)
    assert np.array_equal(out[0].transform, np.eye(4)) and reports[0]["reference"]
    for s0, s1, m, report in zip(start[1:], out[1:], motions[1:], reports[1:]):
        before = target_registration_error(s0.transform, np.linalg.inv(m), corners)
        after = target_registration_error(s1.transform, np.linalg.inv(m), corners)
        assert before > 1.0 and after <= 0.3, (before, after)
        assert report["accepted"] and report["initialisation"] == "current geometry"
        assert np.linalg.norm(report["cycle_translation_mm"]) > 0.2
        moved = np.max(np.linalg.norm(s1.corners_mm() - s0.corners_mm(), axis=1))
        assert np.isclose(report["cycle_max_shift_mm"], moved) and moved > 1.0


def _fake_refinement(monkeypatch, shift_mm):
    """Make the refinement's registration return its start moved by ``shift_mm`` along x (0: the start as a
    kept result comes back, inv(inv(T)), i.e. off by round-off only)."""
    from MultiPlaneFusionLib.registration import refine

    def fake(target, sigmas, moving, r_start, r_init, options, monitor, span, search=None):
        r = np.linalg.inv(np.linalg.inv(r_start))
        r[0, 3] += shift_mm
        info = {"initial_metric": -0.5, "final_metric": -0.5, "result_metric": -0.5, "iterations": 1,
                "accepted": True, "warning": None, "note": None, "spacing_mm": 2.0, "stop": None, "seconds": 0.0}
        return r, info

    monkeypatch.setattr(refine, "register_pair", fake)


@pytest.mark.parametrize("shift_mm, moved", [(0.0, False), (1e-12, False), (0.009, False), (0.05, True)])
def test_refinement_update_below_the_tolerance_is_no_motion(monkeypatch, shift_mm, moved):
    """A stack whose update moves no corner of the head's box by more than unmoved_tolerance_mm (0.01 mm) keeps
    its transform bit for bit and is reported unmoved."""
    _, centre = head_box()
    grid = phantom_grid(3.0, SCALE)
    turned = rigid_matrix((1.3, -0.7, 0.4), (2.0, -1.0, 0.5), centre)  # a registered (non-identity) transform
    stacks = [simulate("axial", 0), simulate("coronal", 1).with_transform(turned)]
    _fake_refinement(monkeypatch, shift_mm)
    out, reports = refine_registration(stacks, np.zeros(grid.shape, np.float32), grid, options=RegistrationOptions())
    assert reports[1]["moved"] is moved and not reports[0].get("moved", False)
    assert np.isclose(reports[1]["cycle_box_shift_mm"], abs(shift_mm), atol=1e-9)
    if moved:
        assert not np.array_equal(out[1].transform, turned)
    else:
        assert out[1] is stacks[1] and np.array_equal(out[1].transform, turned)


def test_no_stack_moved_means_no_second_solve(monkeypatch):
    """The refinement cycle does not re-solve when every update is round-off (it used to: 1e-15 mm is not 0)."""
    from MultiPlaneFusionLib.pipeline import FuseOptions, fuse_stacks
    from MultiPlaneFusionLib.reconstruction.options import SrrOptions

    _, centre = head_box()
    turned = rigid_matrix((0.0, 0.0, 1.0), (0.0, 0.0, 0.0), centre)
    stacks = [simulate("axial", 0), simulate("coronal", 1).with_transform(turned)]
    options = FuseOptions(spacing_mm=3.0, register=True, registration=replace(FAST, refine_cycles=2),
                          srr=SrrOptions(max_iterations=3, outer_iterations=1))
    from MultiPlaneFusionLib.registration import rigid

    monkeypatch.setattr(rigid, "register_pair", lambda t, s, m, *, r_start, **kw: (np.asarray(r_start, float), {
        "initial_metric": None, "final_metric": None, "result_metric": None, "iterations": 0, "accepted": False,
        "warning": None, "note": None, "spacing_mm": None, "stop": None, "seconds": 0.0}))
    for shift_mm, solves in ((1e-12, 1), (0.05, 3)):
        _fake_refinement(monkeypatch, shift_mm)
        timings = fuse_stacks(stacks, options).summary["timings_s"]
        assert sorted(k for k in timings if k.startswith("srr_cycle")) == [f"srr_cycle{c}_s" for c in range(solves)]


# ------------------------------------------------------------------------------------- transform files
def test_transform_files_hold_the_fixed_to_moving_map(tmp_path):
    _, centre = head_box()
    motion = rigid_matrix((1.0, -2.0, 1.0), (3.0, -2.0, 4.0), centre)
    stacks = [simulate("axial", 0), simulate("coronal", 1, motion)]
    out, _ = register_stacks(stacks, options=FAST)
    paths = write_transforms(out, tmp_path / "tfm")
    assert len(paths) == 2 and all(p.endswith(".tfm") for p in paths)
    assert sorted(p.name for p in (tmp_path / "tfm").iterdir()) == sorted(p.split("/")[-1] for p in paths)
    for path, stack in zip(paths, out):
        tx = sitk.ReadTransform(path)
        pts = np.array([[0.0, 0.0, 0.0], [50.0, -20.0, 30.0], [-40.0, 60.0, -10.0]])
        mapped = np.array([tx.TransformPoint(tuple(p)) for p in pts])
        assert np.allclose(mapped, apply(np.linalg.inv(stack.transform), pts), atol=1e-6)
    # patient -> scanner of the moved series is the motion itself (to registration accuracy)
    tx = sitk.ReadTransform(paths[1])
    p = centre + np.array([30.0, 0.0, 0.0])
    assert np.linalg.norm(np.array(tx.TransformPoint(tuple(p))) - apply(motion, p)) < 0.5


# ------------------------------------------------------------------------------- options, progress, cancel
def test_options_and_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-register", action="store_true")  # owned by the CLI
    add_registration_arguments(parser)
    args = parser.parse_args(["--metric", "correlation", "--max-translation-mm", "5", "--max-rotation-deg", "3",
                              "--max-large-translation-mm", "30", "--max-large-rotation-deg", "35",
                              "--motion-search", "always", "--refine-cycles", "0", "--transforms-out", "out"])
    o = registration_options_from_args(args)
    assert (o.enabled, o.metric, o.max_translation_mm, o.max_rotation_deg, o.refine_cycles, o.transforms_out) == (
        True, "correlation", 5.0, 3.0, 0, "out")
    assert (o.max_large_translation_mm, o.max_large_rotation_deg, o.motion_search) == (30.0, 35.0, "always")
    assert not registration_options_from_args(parser.parse_args(["--no-register"])).enabled
    d = registration_options_from_args(parser.parse_args([]))
    assert d == RegistrationOptions()
    for bad in ({"metric": "nmi"}, {"max_translation_mm": 0}, {"sampling": 0}, {"refine_cycles": -1},
                {"shrink_factors": (2, 1), "smoothing_sigmas": (1.0,)}, {"max_large_rotation_deg": 0},
                {"motion_search": "sometimes"}, {"large_motion_min_gain": -0.1}, {"search_steps_deg": ()},
                {"search_keep": 0}):
        with pytest.raises(InputError):
            RegistrationOptions(**bad)


@pytest.mark.parametrize("bad, name", [
    ({"max_voxels": 0}, "max_voxels"),
    ({"histogram_bins": 1}, "histogram_bins"),
    ({"foreground_hu": float("nan")}, "foreground_hu"),
    ({"seed": -1}, "seed"),
])
def test_options_refuse_bad_grid_histogram_mask_and_seed_settings(bad, name):
    with pytest.raises(InputError, match=name):
        RegistrationOptions(**bad)
    assert RegistrationOptions(max_voxels=1, histogram_bins=2, foreground_hu=-300.0, seed=0).seed == 0


def test_correlation_metric_progress_and_cancel():
    _, centre = head_box()
    motion = rigid_matrix((0.0, 0.0, 3.0), (4.0, 0.0, 0.0), centre)
    stacks = [simulate("axial", 0), simulate("sagittal", 1, motion)]
    seen = []
    out, reports = register_stacks(
        stacks, options=replace(FAST, metric="correlation"), monitor=Monitor(lambda s, f: seen.append((s, f)))
    )
    assert reports[1]["accepted"] and reports[1]["metric"] == "correlation"
    assert -1.0 <= reports[1]["final_metric"] < reports[1]["initial_metric"]
    assert {s for s, _ in seen} == {"register"} and seen[-1][1] == 1.0
    assert all(b >= a for (_, a), (_, b) in zip(seen, seen[1:]))
    calls = []
    with pytest.raises(CancelledError):
        monitor = Monitor(lambda s, f: calls.append(f), cancel=lambda: len(calls) > 3)
        register_stacks(stacks, options=FAST, monitor=monitor)
    assert len(calls) < 10  # stopped within an iteration or so


def test_rotation_helpers_round_trip():
    m = rigid_matrix((3.0, -4.0, 12.0), (1.0, 2.0, 3.0), (10.0, 0.0, -5.0))
    assert np.allclose(rotation_vector_deg(m), (3.0, -4.0, 12.0))
    assert np.allclose(m[:3, :3].T @ m[:3, :3], np.eye(3))
    d = describe_motion(m, (10.0, 0.0, -5.0))
    assert np.allclose(d["translation_mm"], (1.0, 2.0, 3.0)) and np.isclose(d["rotation_angle_deg"], 13.0)


# ------------------------------------------------------------------------------------------ real series
def moved_geometry(stack, motion):
    """The stack with ``motion`` written into its DICOM geometry (as if the patient had moved)."""
    r = motion[:3, :3]
    return replace(stack, slice_origins_mm=apply(motion, stack.slice_origins_mm),
                   row_direction=r @ stack.row_direction, column_direction=r @ stack.column_direction)


@pytest.fixture(scope="module")
def philips(real_series):
    """The Philips 5 mm axial and tilted series, and an evaluation against the 1 mm series on its grid at
    0.9 mm in-plane, inside the phantom (1 mm > -500 HU)."""
    names = ("philips_axial_5mm", "philips_tilt_minus18", "philips_tilt_plus16", "philips_axial_1mm")
    ref5, minus18, plus16, one = (read_stacks(real_series(n))[0] for n in names)
    nk, nj, ni = one.shape
    di, dj = one.pixel_spacing_mm
    n_i, n_j = int(ni * di / 0.9), int(nj * dj / 0.9)
    first = one.slice_origins_mm[0] + (0.45 - 0.5 * di) * one.row_direction + (0.45 - 0.5 * dj) * one.column_direction
    axes = np.stack([one.row_direction, one.column_direction, one.normal], axis=1)
    grid = Grid((nk, n_j, n_i), (0.9, 0.9, one.slice_step_mm), tuple(first), tuple(axes.ravel()))
    truth, covered = resample_stack(one, grid)
    inside = covered & (truth > -500)

    def fused_correlation(stacks):
        fused = fuse_average(stacks, grid)
        return correlation(fused.volume, truth, inside & (fused.coverage > 0))

    stacks = [ref5, minus18, plus16]
    registered, reports = register_stacks(stacks)  # shared by both tests: the costly step
    return {
        "stacks": stacks, "one": one, "score": fused_correlation, "before": fused_correlation(stacks),
        "registered": registered, "reports": reports, "after": fused_correlation(registered),
    }


def test_real_moved_series_are_put_back(philips):
    ref5, minus18, plus16 = philips["stacks"]
    centre = ref5.corners_mm().mean(axis=0)
    # 3 mm and 2 degrees each, in different directions
    m1 = rigid_matrix(np.array([1.0, 0.0, 1.0]) / np.sqrt(2) * 2.0, (3.0, 0.0, 0.0), centre)
    m2 = rigid_matrix((0.0, -2.0, 0.0), np.array([0.0, 1.0, -1.0]) / np.sqrt(2) * 3.0, centre)
    moved = [ref5, moved_geometry(minus18, m1), moved_geometry(plus16, m2)]
    unmoved_score = philips["before"]
    assert philips["score"](moved) < unmoved_score - 0.05  # the offset really hurts the fusion
    registered, reports = register_stacks(moved)
    assert all(r["accepted"] for r in reports)
    unmoved_registered = philips["registered"]
    score = philips["score"](registered)
    assert score >= unmoved_score - 0.01
    assert abs(score - philips["after"]) <= 0.01
    # Both runs land on the same patient placement: the moved series' scanner frame is motion @ original.
    box = ref5.corners_mm()
    for k, m in ((1, m1), (2, m2)):
        same = unmoved_registered[k].transform @ np.linalg.inv(m)
        assert target_registration_error(registered[k].transform, same, box) <= 0.5


def test_real_series_as_acquired(philips):
    """Registering the Philips series as they are never lowers the fused correlation with the 1 mm series.

    The tilted series come from a second study (six minutes later) and sit about 1 mm posterior of the
    axial study: an independent check (pydicom positions, numpy trilinear sampling of the 1 mm volume)
    finds the best correlation of each tilted series at a +1 mm P offset (0.83 -> 0.93 and 0.74 -> 0.93).
    Registration finds that offset; the two reformats of the axial study must not move at all.
    """
    ref5 = philips["stacks"][0]
    before, after = philips["before"], philips["after"]
    assert after >= before, (before, after)
    for r in philips["reports"][1:]:
        assert r["accepted"] and abs(r["translation_mm"][1] - 0.9) < 0.4  # the P offset
    # Same acquisition (5 mm and 1 mm reformats of one axial scan): the geometry stays within 0.5 mm.
    one = philips["one"]
    same, reports = register_stacks([one, ref5])
    assert reports[1]["accepted"]
    assert target_registration_error(same[1].transform, np.eye(4), ref5.corners_mm()) <= 0.5
