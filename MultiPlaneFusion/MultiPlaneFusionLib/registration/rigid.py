"""Rigid (6 degrees of freedom) registration of stacks to a target, with SimpleITK.

Directions, precisely
---------------------
``Stack.transform`` (call it T) maps the stack's *scanner* coordinates to *patient* (reconstruction)
coordinates: pixel ``(k, j, i)`` lies at ``T @ index_to_scanner(k, j, i)``. SimpleITK's registration returns
a transform R that maps points of the FIXED image to points of the MOVING image. Here the fixed image lives
in patient space (the reference stack, or the current reconstruction) and the moving image is the stack in
its own scanner space, so ``R = T^-1`` and the stack receives ``T = R^-1``. The ``.tfm`` files written by
:func:`write_transforms` hold R (fixed -> moving, the resampling direction ITK and Slicer expect).

The two images compared (each carrying both stacks' PSFs on isotropic grids) and their masks are made
in :mod:`.pair`.

Optimisation, initialisation, guards
------------------------------------
Euler3DTransform about the fixed mask's centroid; Mattes mutual information (or correlation) on at most
``max_samples`` jittered random points per level (fixed seed); regular-step gradient descent with
physical-shift scales over a shrink-factor pyramid. Stacks sharing the reference's FrameOfReferenceUID
start from the scanner geometry; others start from a moments centring of the foreground masks *and* from the
scanner geometry, and the better result wins.

Large motion: MR stacks of one session share a frame of reference, but the patient moves between them (fetal
MRI: 17-22 degrees). From 17-25 degrees away the local optimiser alone stops in a nearby optimum or short of
the truth (0.8-16 mm TRE on the phantom). So when the local result rotated the stack by more than
``search_trigger_deg`` or was rejected (``motion_search='auto'``; 'always', 'off'), a rotation search follows:
the start and the local result, each also turned by +-``search_steps_deg`` (15, 30) about L, P and S through
the fixed mask's centroid (26 candidates), are scored densely at the coarsest pyramid level; the
``search_keep`` best are optimised at that level, the best of those through the finer levels, and that
replaces the local result when its dense metric is better. Small motions do not set it off: they cost what
they did. Refinement cycles never search.

Guards, on the result's motion relative to the optimiser's start: within ``max_translation_mm`` and
``max_rotation_deg`` (small) it is accepted unless it makes the metric worse than at the start geometry;
beyond those but within ``max_large_translation_mm`` / ``max_large_rotation_deg`` (large) only when it also
improves the metric by ``large_motion_min_gain`` (relative) or more; beyond those it is implausible. A rejected
result keeps the start geometry (a warning logged and reported); an accepted large motion is noted in the
report and the log. The metric comparisons are made densely in numpy over every masked voxel, not with the
optimiser's samples; a change within 1e-3 (relative) counts as "no improvement" and silently keeps the start.
"""

import logging
import os
import re
import time
from dataclasses import replace

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..progress import CallbackGuard, Monitor
from ..sampling.psf import REGISTRATION_IN_PLANE_FWHM_FACTOR, psf_sigma_mm
from ..stack import check_reference, scanner_centre_mm
from ..transforms import apply, describe_motion, rigid_matrix
from ..writing import atomic_path, make_folder
from .options import RegistrationOptions
from .pair import prepare_pair, stack_foreground_mask
from .report import log_report, reference_report, stack_report

log = logging.getLogger("MultiPlaneFusionLib")

STAGE = "register"
# Relative metric change below which a result counts as "no better, no worse" than its start: the sampled
# optimiser and the dense evaluation disagree by about 1e-4 relative near an optimum.
_METRIC_NOISE = 1e-3


# ------------------------------------------------------------------------------- SimpleITK transforms
def matrix_from_sitk(transform):
    """The 4x4 matrix of an affine-like SimpleITK transform (found by mapping the origin and unit vectors)."""
    o = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    cols = [np.array(transform.TransformPoint(tuple(float(v) for v in e))) - o for e in np.eye(3)]
    m = np.eye(4)
    m[:3, :3] = np.stack(cols, axis=1)
    m[:3, 3] = o
    return m


def _euler(matrix, centre_mm):
    """A SimpleITK Euler3DTransform equal to the rigid 4x4 ``matrix``, rotating about ``centre_mm``."""
    a = np.asarray(matrix, dtype=float)[:3, :3]
    b = np.asarray(matrix, dtype=float)[:3, 3]
    c = np.asarray(centre_mm, dtype=float)
    e = sitk.Euler3DTransform()
    e.SetCenter([float(v) for v in c])
    # Re-orthonormalise: products of float matrices drift away from SO(3) by ~1e-15 per step.
    u, _, vt = np.linalg.svd(a)
    e.SetMatrix([float(v) for v in (u @ vt).ravel()], 1e-4)
    e.SetTranslation([float(v) for v in b - c + a @ c])
    return e


def sitk_transform(matrix):
    """A SimpleITK AffineTransform holding a 4x4 matrix."""
    m = np.asarray(matrix, dtype=float)
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in m[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in m[:3, 3]])
    return t


# ----------------------------------------------------------------------------------- registration
def _method(options, pair):
    reg = sitk.ImageRegistrationMethod()
    if options.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(options.histogram_bins)
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # ITK draws percentage x (voxels of the level) jittered points and drops those outside the fixed mask, so
    # the expected sample count is percentage x (mask voxels of the level): cap it at max_samples (the cost
    # of an iteration grows with it, the accuracy hardly does beyond ~10^4 points).
    factors = options.shrink_factors
    masked = float(pair.mask_voxels)
    percentages = [min(float(options.sampling), options.max_samples * f**3 / max(masked, 1.0)) for f in factors]
    reg.SetMetricSamplingPercentagePerLevel(percentages, int(options.seed))
    reg.SetMetricFixedMask(pair.fixed_mask)
    reg.SetMetricMovingMask(pair.moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel([int(v) for v in factors])
    reg.SetSmoothingSigmasPerLevel([float(v) * pair.spacing_mm for v in options.smoothing_sigmas])
    reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    # Steps are in mm of physical shift (scales from physical shift): start at one grid voxel and stop below
    # 1/1000 of it. A gentle relaxation (0.8) matters: halving the step at every gradient sign flip (0.5)
    # stopped after ~30 iterations and left rotation errors near 1 degree on the phantom.
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=pair.spacing_mm,
        minStep=0.001 * pair.spacing_mm,
        numberOfIterations=int(options.iterations),
        relaxationFactor=0.8,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def _metric_at(options, pair, r_matrix):
    """The metric (lower is better) at ``r_matrix`` over every voxel of both masks; inf if they do not meet.

    Evaluated densely in numpy on the moving image resampled onto the fixed grid, so the start geometry and
    the result are compared on exactly the same terms: ``-NCC`` for 'correlation', ``-MI`` (joint
    histogram of ``histogram_bins`` bins over fixed intensity ranges) for 'mattes'. SimpleITK's
    MetricEvaluate would recompute a gradient image of the whole moving image at every call.
    """
    tx = _euler(r_matrix, pair.centre_mm)
    # Copies, not views: a view of a temporary image would outlive its buffer.
    moved = sitk.GetArrayFromImage(
        sitk.Resample(pair.moving, pair.fixed, tx, sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    )
    inside = sitk.GetArrayFromImage(
        sitk.Resample(pair.moving_mask, pair.fixed, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    )
    sel = (sitk.GetArrayViewFromImage(pair.fixed_mask) > 0) & (inside > 0) & ~np.isnan(moved)
    if np.count_nonzero(sel) < 100:
        return float("inf")
    f = sitk.GetArrayViewFromImage(pair.fixed)[sel].astype(np.float64)
    m = moved[sel].astype(np.float64)
    if options.metric == "correlation":
        f -= f.mean()
        m -= m.mean()
        return float(-(f @ m) / max(np.sqrt((f @ f) * (m @ m)), 1e-12))
    joint, _, _ = np.histogram2d(
        np.clip(f, *pair.fixed_range), np.clip(m, *pair.moving_range), bins=options.histogram_bins,
        range=[pair.fixed_range, pair.moving_range],
    )
    p = joint / joint.sum()
    px, py = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    return float(-np.sum(p[nz] * np.log(p[nz] / np.outer(px, py)[nz])))


def _moments_initialisation(target, moving, options):
    """R (patient -> moving scanner) translating the target's foreground centroid onto the stack's."""
    scanner = moving.with_transform(np.eye(4))
    masks = [stack_foreground_mask(s, threshold=options.foreground_hu) for s in (target, scanner)]
    init = sitk.CenteredTransformInitializer(
        masks[0], masks[1], sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    return matrix_from_sitk(init)


def _execute(pair, options, r_init, on_iteration):
    """Run SimpleITK's optimiser over ``options``' pyramid from ``r_init``: (R, stop condition, iterations).

    A cancel or Ctrl-C inside ``on_iteration`` stops the optimiser and is raised again here; a SimpleITK
    failure (e.g. every sample left the moving image) raises RuntimeError."""
    reg = _method(options, pair)
    reg.SetInitialTransform(_euler(r_init, pair.centre_mm), inPlace=False)
    guard = CallbackGuard(reg.StopRegistration)
    count = [0]

    def step():
        count[0] += 1
        on_iteration()

    reg.AddCommand(sitk.sitkIterationEvent, lambda: guard.call(step))
    try:
        result = reg.Execute(pair.fixed, pair.moving)
    except RuntimeError:
        guard.reraise()
        raise
    finally:
        # The command (held in C++) refers back to ``reg`` through the guard: a cycle Python's collector
        # cannot see, which kept every registration's method, masks and samples alive (1.4 MB a stack on the
        # batch benchmark's cases, growing with every case a batch worker or a Slicer session runs).
        reg.RemoveAllCommands()
    guard.reraise()
    return matrix_from_sitk(result), reg.GetOptimizerStopConditionDescription(), count[0]


def _coarse_pair(pair, options):
    """``pair`` at the first (coarsest) level of the pyramid: images smoothed and shrunk as SimpleITK's
    registration does, masks subsampled. The large-motion search scores its candidates densely on it and
    optimises them on it as a one-level pyramid (SimpleITK would smooth and shrink the full images again for
    every candidate). ``spacing_mm`` stays that of the full pair: the optimiser's steps are those of the
    first level of a full registration."""
    factor = int(options.shrink_factors[0])
    sigma_mm = float(options.smoothing_sigmas[0]) * pair.spacing_mm

    def shrink(image, smooth):
        if smooth and sigma_mm > 0:
            image = sitk.DiscreteGaussian(image, sigma_mm**2, 64, 0.01, True)
        return sitk.Shrink(image, [factor] * 3) if factor > 1 else image

    fixed_mask = shrink(pair.fixed_mask, False)
    return replace(pair, fixed=shrink(pair.fixed, True), fixed_mask=fixed_mask, moving=shrink(pair.moving, True),
                   moving_mask=shrink(pair.moving_mask, False),
                   mask_voxels=int(sitk.GetArrayViewFromImage(fixed_mask).sum()))


def search_rotations_deg(options):
    """The rotation vectors (degrees) the large-motion search adds to a start: +-each step about L, P and S."""
    return [axis * sign * step for axis in np.eye(3) for step in options.search_steps_deg for sign in (1.0, -1.0)]


def _rotation_search(pair, options, bases, execute):
    """Large-motion search: every start in ``bases`` (R matrices) turned by each of
    :func:`search_rotations_deg` about the fixed mask's centroid, scored densely at the coarse level; the
    ``search_keep`` best optimised at that level, the best of those through the finer levels.
    Returns (R or None when every candidate failed, info dict)."""
    coarse = _coarse_pair(pair, options)
    turns = [np.zeros(3)] + search_rotations_deg(options)
    scored = []
    for base in bases:
        for rv in turns:
            r = np.asarray(base, dtype=float) @ rigid_matrix(rv, (0.0, 0.0, 0.0), pair.centre_mm)
            scored.append((_metric_at(options, coarse, r), len(scored), r, rv))
    scored.sort(key=lambda c: (c[0], c[1]))
    first = replace(options, shrink_factors=(1,), smoothing_sigmas=(0.0,), iterations=options.search_iterations)
    refined = []
    for _, order, r, rv in scored[: options.search_keep]:
        try:
            r_coarse, _, _ = execute(first, r, coarse)
        except RuntimeError:
            continue
        refined.append((_metric_at(options, coarse, r_coarse), order, r_coarse, rv))
    info = {"candidates": len(scored), "refined": len(refined), "turn_deg": None, "stop": None}
    if not refined:
        return None, info
    _, order, r_best, rv = min(refined, key=lambda c: (c[0], c[1]))
    info["turn_deg"] = [float(v) for v in rv]
    info["base"] = order // len(turns)
    finer = options.shrink_factors[1:]
    if finer:
        rest = replace(options, shrink_factors=finer, smoothing_sigmas=options.smoothing_sigmas[1:])
        r_best, info["stop"], _ = execute(rest, r_best)
    return r_best, info


def _judge(options, change, initial_metric, final_metric):
    """(warning or None, motion class, relative gain) of a result by the guards; see :class:`RegistrationOptions`.

    ``change`` is :func:`describe_motion` of the result relative to the optimiser's start."""
    shift = float(np.linalg.norm(change["translation_mm"]))
    angle = float(change["rotation_angle_deg"])
    if not np.isfinite(final_metric):
        gain = None
    elif not np.isfinite(initial_metric):  # the start geometry did not even overlap the target
        gain = float("inf")
    else:
        gain = (initial_metric - final_metric) / max(abs(initial_metric), 1e-12)
    small = shift <= options.max_translation_mm and angle <= options.max_rotation_deg
    large_mm = max(options.max_large_translation_mm, options.max_translation_mm)
    large_deg = max(options.max_large_rotation_deg, options.max_rotation_deg)
    plausible = shift <= large_mm and angle <= large_deg
    motion = "small" if small else ("large" if plausible else "implausible")
    moved = f"{shift:.1f} mm, {angle:.1f} degrees"
    if not np.isfinite(final_metric):
        return "registration left no overlap with the target", motion, gain
    if motion == "implausible":
        return (f"registration moved the stack by {moved}: beyond the plausible {large_mm:g} mm / "
                f"{large_deg:g} degrees"), motion, gain
    if motion == "large" and gain < options.large_motion_min_gain:
        return (f"registration moved the stack by {moved} (beyond {options.max_translation_mm:g} mm / "
                f"{options.max_rotation_deg:g} degrees) for a metric gain of {100 * gain:.1f} % "
                f"(< {100 * options.large_motion_min_gain:g} %)"), motion, gain
    if final_metric > initial_metric + _METRIC_NOISE * abs(initial_metric):
        return f"registration made the metric worse ({initial_metric:.4f} -> {final_metric:.4f})", motion, gain
    return None, motion, gain


def register_pair(target, target_sigmas_mm, moving, *, r_start, r_init, options, monitor, span=(0.0, 1.0),
                  search=None):
    """Register one stack to a target; the building block of :func:`register_stacks` and refinement.

    Parameters
    ----------
    target : Stack
        In patient space (its own transform applied).
    target_sigmas_mm : array (3,)
        PSF sigmas of the target along its row, column and normal axes (zeros for a reconstruction).
    moving : Stack
        Its pixels and scanner geometry are used; its transform is ignored (``r_start``/``r_init`` say where
        it is).
    r_start, r_init : ndarray (4, 4)
        Patient -> moving-scanner maps: the geometry to fall back to (and to beat), and the optimiser's start.
    options : RegistrationOptions
    monitor : Monitor
        Reports stage "register" over ``span``; cancellation stops the optimiser and raises CancelledError.
    search : {'auto', 'always', 'off'} or None
        The large-motion rotation search (None: ``options.motion_search``); see the module docstring.

    Returns
    -------
    r_final : ndarray (4, 4)
        Patient -> moving-scanner map to use (``r_start`` when the result was rejected).
    info : dict
        initial_metric, final_metric, result_metric, iterations, accepted, warning, note, decision (one
        sentence, always), spacing_mm, stop, seconds, motion ('small', 'large' or 'implausible', of the
        result relative to the optimiser's start), gain (relative metric improvement on ``r_start``), search
        (None when not run, else why, candidates scored, refined, the winning turn and whether it won).
    """
    t0 = time.perf_counter()
    search = options.motion_search if search is None else search
    try:
        pair = prepare_pair(target, target_sigmas_mm, moving, r_init=r_init, options=options)
    except InputError as e:  # no overlap: nothing to register against
        return _kept(r_start, f"{e}; kept the starting geometry", t0)
    levels = len(options.shrink_factors)
    local_budget = int(options.iterations) * levels
    search_budget = options.search_keep * int(options.search_iterations) + int(options.iterations) * (levels - 1)
    # Progress: the local registration fills the span when no search can follow, else its first part.
    total = local_budget + (search_budget if search != "off" else 0)
    state = {"iterations": 0}

    def on_iteration():
        state["iterations"] += 1
        monitor.report(STAGE, span[0] + (span[1] - span[0]) * min(1.0, state["iterations"] / total))

    def execute(opts, r, on=None):
        return _execute(pair if on is None else on, opts, r, on_iteration)

    try:
        r_local, stop, _ = execute(options, r_init)
    except RuntimeError as e:  # e.g. every sample left the moving image
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "SimpleITK error"
        return _kept(r_start, f"registration failed ({reason}); kept the starting geometry", t0)
    initial_metric = _metric_at(options, pair, r_start)
    local_metric = _metric_at(options, pair, r_local)
    centre = scanner_centre_mm(moving)
    local_change = describe_motion(np.linalg.inv(r_local) @ r_init, centre)
    local_warning, _, _ = _judge(options, local_change, initial_metric, local_metric)
    r_final, final_metric, search_info = r_local, local_metric, None
    reason = None
    if search == "always":
        reason = "always"
    elif search == "auto":
        if local_warning is not None:
            reason = "local result rejected"
        elif local_change["rotation_angle_deg"] > options.search_trigger_deg:
            reason = f"local result rotated {local_change['rotation_angle_deg']:.1f} degrees"
    if reason is not None:
        r_search, search_info = _rotation_search(pair, options, [r_init, r_local], execute)
        search_info["reason"] = reason
        search_info["won"] = False
        if r_search is not None:
            search_metric = _metric_at(options, pair, r_search)
            search_info["metric"] = search_metric
            # Another optimum must be better beyond the metric's noise to replace the local one.
            margin = _METRIC_NOISE * abs(local_metric) if np.isfinite(local_metric) else 0.0
            if search_metric < local_metric - margin:
                r_final, final_metric = r_search, search_metric
                search_info["won"] = True
                stop = search_info["stop"] or stop
    monitor.report(STAGE, span[1])  # the optimiser may converge before ``total`` iterations

    # Guards, relative to the optimiser's start: how far the stack's centre moved, and by what angle.
    change = describe_motion(np.linalg.inv(r_final) @ r_init, centre)
    warning, motion, gain = _judge(options, change, initial_metric, final_metric)
    accepted = warning is None
    result_metric, note = final_metric, None
    if not accepted:
        warning += "; kept the starting geometry"
        r_final, final_metric = np.asarray(r_start, dtype=float), initial_metric
    elif final_metric > initial_metric:
        # Worse only at the level of the sampled optimiser's noise: the start was already optimal (typical
        # of a refinement cycle). Keep the start, without alarming anyone.
        note = "no improvement on the starting geometry; kept it"
        r_final, final_metric = np.asarray(r_start, dtype=float), initial_metric
    else:
        # A change within the registration's own precision is not worth having: it would only knock exactly
        # orthogonal reformats off their axes (and the reconstruction off its fast separable path).
        corners = moving.with_transform(np.eye(4)).corners_mm()
        moved_mm = float(np.max(np.linalg.norm(apply(np.linalg.inv(r_final), corners)
                                               - apply(np.linalg.inv(r_start), corners), axis=1)))
        if moved_mm < options.min_shift_mm:
            note = f"change below {options.min_shift_mm:g} mm ({moved_mm:.3f} mm); kept the starting geometry"
            r_final, final_metric = np.asarray(r_start, dtype=float), initial_metric
        elif motion == "large":
            note = (f"large motion accepted ({np.linalg.norm(change['translation_mm']):.1f} mm, "
                    f"{change['rotation_angle_deg']:.1f} degrees): metric gain {100 * gain:.1f} % "
                    f">= {100 * options.large_motion_min_gain:g} %")
    # One sentence on why the result was used or not, whatever happened.
    decision = warning or note or (
        f"small motion accepted ({np.linalg.norm(change['translation_mm']):.1f} mm, "
        f"{change['rotation_angle_deg']:.1f} degrees, within {options.max_translation_mm:g} mm / "
        f"{options.max_rotation_deg:g} degrees): metric gain {100 * gain:.1f} %")
    info = {
        "initial_metric": initial_metric,
        "final_metric": final_metric,
        "result_metric": result_metric,
        "iterations": int(state["iterations"]),
        "accepted": accepted,
        "warning": warning,
        "note": note,
        "decision": decision,
        "motion": motion,
        "gain": gain,
        "search": search_info,
        "spacing_mm": pair.spacing_mm,
        "stop": stop,
        "seconds": time.perf_counter() - t0,
    }
    return r_final, info


def _kept(r_start, warning, t0):
    """(r_start, info) of a registration that could not run."""
    info = {"initial_metric": None, "final_metric": None, "result_metric": None, "iterations": 0,
            "accepted": False, "warning": warning, "note": None, "decision": warning, "motion": None, "gain": None,
            "search": None,
            "spacing_mm": None, "stop": None, "seconds": time.perf_counter() - t0}
    return np.asarray(r_start, dtype=float), info


def _better(a, b):
    """True when registration outcome ``a`` (info dict) beats ``b`` (None counts as no outcome)."""
    if b is None:
        return True
    if a["accepted"] != b["accepted"]:
        return a["accepted"]
    return a["accepted"] and a["final_metric"] < b["final_metric"]


def register_each(stacks, reference, *, monitor, register_one, target_name):
    """The loop both registrations share: ``register_one(n, span)`` -> (stack n registered, its report) for
    every stack but ``reference``, with progress over ``span`` (start, stop) of the stage; returns the stacks
    and the reports in stack order (the reference's included)."""
    others = [n for n in range(len(stacks)) if n != reference]
    out, reports = list(stacks), []
    monitor.report(STAGE, 0.0)
    for done, n in enumerate(others):
        out[n], report = register_one(n, (done / len(others), (done + 1) / len(others)))
        reports.append(report)
        log_report(report, target_name)
    reports = sorted(reports + [reference_report(reference, stacks[reference])], key=lambda r: r["index"])
    monitor.report(STAGE, 1.0)
    return out, reports


def register_stacks(stacks, *, reference=0, options=None, monitor=None):
    """Rigidly register every stack to the reference stack.

    Parameters
    ----------
    stacks : sequence of Stack
    reference : int
        Index of the reference stack; it keeps its transform (the identity, normally).
    options : RegistrationOptions or None
    monitor : Monitor or None
        Stage "register"; raises CancelledError when cancelled.

    Returns
    -------
    stacks : list of Stack
        Copies (sharing pixels) with ``transform`` set: scanner -> patient (see the module docstring).
    reports : list of dict
        One per stack, in order: translation_mm (3, displacement of the stack's centre), rotation_deg
        (rotation vector, degrees), rotation_angle_deg, initial_metric and final_metric (lower is better),
        iterations, accepted, warning (None or a sentence), note (None or a sentence: why the start was kept
        silently, or that a large motion was accepted), initialisation ("scanner geometry" when the
        FrameOfReferenceUIDs match, else "moments centring" or "scanner geometry", whichever won; with
        " + rotation search" when the large-motion search found the result), motion ('small', 'large',
        'implausible'), gain (relative metric improvement), search (None, or what the large-motion search
        did: reason, candidates, refined, turn_deg, won, metric), decision (one sentence: why the result was
        used or not), initialisations_tried (each start's outcome), transform (4x4), seconds.

    The stacks' transforms are not written to disk here; call :func:`write_transforms` with the final
    stacks (after any refinement) when ``options.transforms_out`` is set.
    """
    options = options or RegistrationOptions()
    monitor = Monitor.wrap(monitor)
    stacks = list(stacks)
    if not stacks:
        raise InputError("no stacks to register")
    check_reference(stacks, reference)
    if not options.enabled or len(stacks) < 2:
        return stacks, []
    target = stacks[reference]
    target_sigmas = psf_sigma_mm(target, in_plane_factor=REGISTRATION_IN_PLANE_FWHM_FACTOR)

    def register_one(n, span):
        s = stacks[n]
        r_start = np.linalg.inv(s.transform)
        same_frame = bool(s.frame_of_reference_uid) and s.frame_of_reference_uid == target.frame_of_reference_uid
        candidates = [("scanner geometry", r_start)]
        if not same_frame:
            # Unrelated headers: start from the foreground centroids, but also from the scanner geometry
            # (series of one session often share coordinates under different UIDs); the better one wins.
            candidates.insert(0, ("moments centring", _moments_initialisation(target, s, options)))
        best, tried = None, []
        width = (span[1] - span[0]) / len(candidates)
        for c, (initialisation, r_init) in enumerate(candidates):
            sub_span = (span[0] + c * width, span[0] + (c + 1) * width)
            r_final, info = register_pair(target, target_sigmas, s, r_start=r_start, r_init=r_init, options=options,
                                         monitor=monitor, span=sub_span)
            tried.append({"initialisation": initialisation, "accepted": info["accepted"],
                          "final_metric": info["final_metric"], "searched": info.get("search") is not None,
                          "decision": info.get("decision")})
            if _better(info, best[2] if best else None):
                best = (initialisation, r_final, info)
        initialisation, r_final, info = best
        moved = s.with_transform(np.linalg.inv(r_final))
        report = stack_report(n, moved, initialisation, info, metric=options.metric)
        report["initialisations_tried"] = tried
        return moved, report

    return register_each(stacks, reference, monitor=monitor, register_one=register_one,
                         target_name=f"reference '{target.description}'")


# --------------------------------------------------------------------------------------- writing
def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "_", text or "").strip("_")[:40] or "stack"


def write_transforms(stacks, folder):
    """Write each stack's registration as an ITK ``.tfm`` file (LPS) in ``folder``; return the paths.

    Each file holds the *resampling* transform fixed -> moving, i.e. ``inv(stack.transform)``: it maps
    patient (reference) points to the stack's scanner points, as SimpleITK's registration returns it.
    That is the convention of ITK transform files, which Slicer reads as such (its developer guide,
    "Transforms / Transform files": ITK files are LPS and in the resampling convention; Slicer converts to RAS
    and inverts as needed), so setting the loaded transform as the parent of the series volume as read from
    disk moves it onto the reference.
    Files are named ``stackNN_<description>.tfm`` (NN = position in ``stacks``) and written atomically.
    """
    folder = os.fspath(folder)
    make_folder(folder, "transforms folder")
    paths = []
    for n, s in enumerate(stacks):
        path = os.path.join(folder, f"stack{n:02d}_{_slug(s.description)}.tfm")
        with atomic_path(path) as tmp:
            sitk.WriteTransform(sitk_transform(np.linalg.inv(s.transform)), tmp)
        paths.append(os.path.abspath(path))
    return paths
