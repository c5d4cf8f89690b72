"""The pipeline: stacks -> grid -> registration -> reconstruction (-> model), with progress and cancel.

The CLI and the Slicer module both call these functions; nothing here parses arguments or touches MRML.
"""

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any, List, Optional

import numpy as np

from . import memory
from .duplicates import drop_duplicates
from .errors import InputError, OutputError
from .grid import Grid, grid_for_stacks
from .progress import Monitor
from .reading import read_stacks
from .reconstruction.average import default_background, fuse_average
from .reconstruction.budget import Budget
from .writing import check_volume_path, make_folder, write_image

log = logging.getLogger("MultiPlaneFusionLib")

METHODS = ("srr", "average")
EXTENTS = ("overlap", "union")
INTERPOLATIONS = ("linear", "bspline")


@dataclass
class FuseOptions:
    """Settings of one fusion.

    method : 'srr' (super-resolution, default) or 'average' (coverage-weighted mean, the baseline).
    spacing_mm : isotropic output spacing; default the finest in-plane spacing of the inputs.
    grid : an exact output grid (``--grid-like``); overrides spacing_mm and extent.
    extent : 'overlap' (region all stacks cover, default) or 'union'.
    reference : index of the reference stack (grid axes, registration target).
    register : rigid registration of the stacks before (and, with srr, during) reconstruction.
    memory_limit_gb : refuse a reconstruction whose estimated peak memory is above this; None: 90 % of the
        memory available when the run starts.
    background : value of voxels no stack covers; default -1024 for CT, 0 otherwise.
    interpolation : resampling of the average method ('linear', 'bspline').
    srr, registration : options of those stages (their modules' dataclasses), None for defaults.
    """

    method: str = "srr"
    spacing_mm: Optional[float] = None
    grid: Optional[Grid] = None
    extent: str = "overlap"
    reference: int = 0
    register: bool = True
    memory_limit_gb: Optional[float] = memory.DEFAULT_MEMORY_LIMIT_GB
    background: Optional[float] = None
    interpolation: str = "linear"
    srr: Any = None
    registration: Any = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise InputError (one line, naming the setting) for a setting out of range; returns self.

        The stage options (``srr``, ``registration``) are checked too when they have a ``validate``.
        """
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.extent not in EXTENTS:
            raise InputError(f"extent must be one of {', '.join(EXTENTS)}, not '{self.extent}'")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not '{self.interpolation}'")
        if self.spacing_mm is not None and not float(self.spacing_mm) > 0:
            raise InputError(f"spacing_mm must be positive (or None for the finest input pixel), got {self.spacing_mm}")
        if int(self.reference) < 0:
            raise InputError(f"reference must be a stack index, 0 or more, got {self.reference}")
        if self.background is not None and not np.isfinite(self.background):
            raise InputError(f"background must be a number (or None), got {self.background}")
        if self.memory_limit_gb is not None and not float(self.memory_limit_gb) > 0:
            raise InputError(f"memory_limit_gb must be positive (or None for the available memory), got "
                             f"{self.memory_limit_gb}")
        for stage in (self.srr, self.registration):
            if stage is not None and hasattr(stage, "validate"):
                stage.validate()
        return self


@dataclass
class FusionResult:
    """``image``: fused SimpleITK float32 volume (LPS); ``coverage``: uint8 count of stacks per voxel;
    ``stacks``: the inputs with their registration transforms; ``summary``: what --json records."""

    image: Any
    coverage: Any
    grid: Grid
    stacks: List[Any]
    summary: dict = field(default_factory=dict)


def _check_overlap(stacks, covered_voxels):
    for s, n in zip(stacks, covered_voxels):
        if n == 0:
            raise InputError(f"stack '{s.description}' ({s.source}) does not overlap the reconstruction grid")


def plan_grid(stacks, options):
    """The reconstruction grid for ``stacks`` under ``options`` (no allocation)."""
    if options.grid is not None:
        return options.grid
    return grid_for_stacks(stacks, reference=options.reference, spacing_mm=options.spacing_mm, extent=options.extent)


def fuse_stacks(stacks, options=None, progress=None, cancel=None):
    """Fuse stacks into one volume on the reconstruction grid.

    Parameters
    ----------
    stacks : list of Stack
    options : FuseOptions
    progress : callable(stage, fraction), optional
    cancel : callable or object with is_set(), optional

    Returns
    -------
    FusionResult
    """
    options = options or FuseOptions()
    monitor = Monitor.wrap(progress, cancel)
    timings = {}
    if not stacks:
        raise InputError("no stacks to fuse")
    if options.method not in METHODS:
        raise InputError(f"unknown method '{options.method}' (use {' or '.join(METHODS)})")
    if not 0 <= options.reference < len(stacks):
        raise InputError(f"--reference {options.reference} is out of range: {len(stacks)} stacks were found")
    stacks, reference, duplicates = drop_duplicates(stacks, options.reference)
    options = replace(options, reference=reference)
    if len(stacks) == 1:
        # Allowed (resampling one series is the baseline users compare with), but not a fusion: say so.
        log.warning("only one series ('%s'): nothing to fuse it with, so the result is no sharper across its "
                    "slices than the series itself and no self-check can run; give the other planes' series too",
                    stacks[0].description)
    if options.reference != 0:
        # The reference goes first: grid axes and registration target are stack 0 downstream.
        stacks = [stacks[options.reference]] + [s for n, s in enumerate(stacks) if n != options.reference]
    grid = plan_grid(stacks, FuseOptions(**{**options.__dict__, "reference": 0}))
    budget = Budget(grid, options.method, limit_gb=options.memory_limit_gb,
                    what=f"a {options.method} reconstruction on a {grid.shape[::-1]} grid", register=options.register,
                    srr_options=options.srr)
    need = budget.check(stacks)
    log.info("grid %s voxels at %s mm, estimated peak memory %.2f GB",
             "x".join(str(v) for v in grid.shape[::-1]), grid.spacing_mm, need / 1024**3)
    background = options.background if options.background is not None else default_background(stacks)

    registration_reports = []
    if options.register and len(stacks) > 1:
        t = time.perf_counter()
        stacks, registration_reports = _register(stacks, options, monitor)
        budget.check(stacks)  # a registered stack may take srr's pre-sheared skew path (more memory)
        timings["register_s"] = time.perf_counter() - t

    info = {}
    if options.method == "srr":
        # SRR starts from its own PSF-weighted average (the same bone surface and PSNR as from the linear
        # average fusion in bench_srr.py) and checks the overlap itself: no average fusion first.
        volume, coverage, info, stacks, more_reports, srr_timings = _srr_with_refinement(
            stacks, grid, options, background=background, monitor=monitor, budget=budget
        )
        registration_reports.extend(more_reports)
        timings.update(srr_timings)
    else:
        t = time.perf_counter()
        average = fuse_average(stacks, grid, interpolation=options.interpolation, background_value=background,
                               monitor=monitor.sub("reconstruct", 0.0, 1.0))
        timings["average_s"] = time.perf_counter() - t
        _check_overlap(stacks, average.covered_voxels)
        volume, coverage = average.volume, average.coverage
    monitor.report("reconstruct", 1.0)

    image = grid.image(volume.astype(np.float32, copy=False))
    coverage_image = grid.image(coverage, dtype=np.uint8)
    summary = {
        "method": options.method,
        "grid": grid.summary(),
        "background": background,
        "stacks": [s.summary() for s in stacks],
        "covered_fraction": float(np.count_nonzero(coverage) / coverage.size),
        "registration": registration_reports,
        "reconstruction": info,
        # srr self-check (None for the average or when it did not run): False means some stack is predicted
        # no better by the fusion than by a single other series; "worse" that it is predicted worse by more than
        # the tie fraction; the Slicer module shows both in the status line
        "fusion_beats_single_series": info.get("fusion_beats_single_series"),
        "fusion_worse_than_single_series": info.get("fusion_worse_than_single_series"),
        "timings_s": timings,
        "estimated_peak_memory_mb": budget.peak_bytes / 1024**2,
        "duplicates_dropped": [{"stack": a, "same_as": b} for a, b in duplicates],
    }
    return FusionResult(image=image, coverage=coverage_image, grid=grid, stacks=stacks, summary=summary)


def _register(stacks, options, monitor):
    from .registration import register_stacks

    return register_stacks(stacks, reference=0, options=options.registration, monitor=monitor.sub("register", 0, 1))


def _srr_with_refinement(stacks, grid, options, *, background, monitor, budget=None):
    from .reconstruction.srr import reconstruct_srr

    timings = {}
    reports = []
    cycles = 0
    if options.register and len(stacks) > 1 and options.registration is not None:
        cycles = int(getattr(options.registration, "refine_cycles", 0) or 0)
    elif options.register and len(stacks) > 1:
        from .registration import RegistrationOptions

        cycles = int(RegistrationOptions().refine_cycles)
    span = 1.0 / (cycles + 1)
    initial = None
    result = None
    srr_options = options.srr
    first = None
    for cycle in range(cycles + 1):
        t = time.perf_counter()
        # coverage is recomputed each cycle: refinement may have moved the stacks
        result = reconstruct_srr(
            stacks, grid, srr_options, initial=initial,
            monitor=monitor.sub("reconstruct", cycle * span, (cycle + 1) * span),
        )
        if first is None:
            first = result
        timings[f"srr_cycle{cycle}_s"] = time.perf_counter() - t
        if cycle == cycles:
            break
        from .registration import refine_registration

        t = time.perf_counter()
        stacks, cycle_reports = refine_registration(
            stacks, result.volume, grid, options=options.registration, monitor=monitor.sub("refine", 0, 1),
            coverage=result.coverage,
        )
        timings[f"refine{cycle}_s"] = time.perf_counter() - t
        reports.extend({**r, "cycle": cycle + 1} for r in cycle_reports)
        if not any(r.get("moved", False) for r in cycle_reports):
            break  # no stack moved beyond unmoved_tolerance_mm: solving again would give the same volume
        if budget is not None:
            budget.check(stacks, resolve=True)
        initial = result.volume
        # Later cycles keep the slice profiles and weight chosen from the data in the first one (the small
        # registration refinements do not change them); the self-check still runs on the final cycle.
        srr_options = _keep_choices(srr_options, result)
    timings["srr_s"] = sum(v for k, v in timings.items() if k.startswith("srr_cycle"))
    return result.volume, result.coverage, _with_first_choices(result.info, first.info), stacks, reports, timings


def _keep_choices(srr_options, result):
    from dataclasses import replace

    from .reconstruction.options import SrrOptions

    opts = srr_options or SrrOptions()
    return replace(opts, alpha=float(result.info["alpha"]), regularizer=result.info["regularizer"],
                   stack_profiles=tuple(result.profiles))


# What the automatic choices report; made in the first cycle only.
_CHOICE_KEYS = ("profile_choice", "in_plane_choice", "alpha_choice", "prior_choice", "alpha_setting",
                "regularizer_setting")


def _with_first_choices(info, first):
    """The final cycle's ``info`` with the first cycle's choice reports: the later cycles are given the
    chosen settings (``_keep_choices``), so on their own they report them as fixed and the JSON would lose
    how (and that) they were chosen."""
    if info is first:
        return info
    return {**info, **{k: first[k] for k in _CHOICE_KEYS}}


def fuse_paths(paths, options=None, progress=None, cancel=None):
    """Read stacks from ``paths`` (DICOM folders/trees, volume files) and fuse them."""
    monitor = Monitor.wrap(progress, cancel)
    t = time.perf_counter()
    monitor.report("read", 0.0)
    stacks = read_stacks(paths)
    monitor.report("read", 1.0)
    read_s = time.perf_counter() - t
    result = fuse_stacks(stacks, options, monitor)
    result.summary["timings_s"]["read_s"] = read_s
    result.summary["inputs"] = [os.fspath(p) for p in paths]
    return result


def write_transforms_if_asked(result, options):
    """Write each stack's registration as an ITK .tfm (``RegistrationOptions.transforms_out``); returns paths.

    Files are numbered in the fusion's stack order (the reference first)."""
    folder = getattr(options.registration, "transforms_out", None) if options is not None else None
    if not folder:
        return []
    from .registration import write_transforms

    make_folder(folder, "transforms folder")
    return [os.path.abspath(p) for p in write_transforms(result.stacks, folder)]


def write_fusion(result, path, coverage_path=None):
    """Write the fused volume (and optionally the coverage mask) atomically; returns the paths written."""
    check_volume_path(path)
    if coverage_path:
        check_volume_path(coverage_path)
    write_image(result.image, path)
    written = {"volume": os.path.abspath(path)}
    if coverage_path:
        write_image(result.coverage, coverage_path)
        written["coverage"] = os.path.abspath(coverage_path)
    return written


@dataclass
class RunResult:
    """What :func:`run_to_folder` made: ``fusion`` (a FusionResult), ``model`` (the model package's
    ModelResult), ``outputs`` ({"volume", "model", "report", "transforms": paths}, absolute) and ``summary``
    (what --json records: the fusion summary plus the mesh and export reports and the outputs)."""

    fusion: FusionResult
    model: Any
    outputs: dict
    summary: dict


def run_to_folder(inputs, outdir, *, fuse_options=None, model_options=None, model_format="stl", progress=None,
                  cancel=None, overwrite=True):
    """Fuse ``inputs`` (paths as for :func:`fuse_paths`), build the bone model and write ``outdir/fused.nrrd``,
    ``outdir/bone.<model_format>`` and ``outdir/report.png``; returns a :class:`RunResult`.

    Nothing is left behind on failure or cancel: outputs already renamed are removed, and so is ``outdir``
    when this call created it. With ``overwrite=False`` an existing output is an OutputError, raised before
    any work."""
    paths = {"volume": os.path.join(outdir, "fused.nrrd"), "model": os.path.join(outdir, f"bone.{model_format}"),
             "report": os.path.join(outdir, "report.png")}
    if not overwrite:
        existing = [p for p in paths.values() if os.path.exists(p)]
        if existing:
            raise OutputError(f"'{existing[0]}' exists; use --overwrite to replace it")
    created = make_folder(outdir)
    written = []
    try:
        return _run_to_folder(inputs, paths, fuse_options=fuse_options, model_options=model_options,
                              monitor=Monitor.wrap(progress, cancel), written=written)
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                os.remove(p)
        if created:
            shutil.rmtree(outdir, ignore_errors=True)
        raise


def _run_to_folder(inputs, paths, *, fuse_options, model_options, monitor, written):
    from .model import ModelOptions, build_model, write_model
    from .report_picture import write_report_picture
    from .writing import check_writable

    model_options = model_options or ModelOptions()
    check_writable(paths["volume"])
    fusion = fuse_paths(inputs, fuse_options, monitor)
    model_need = memory.estimate_model_bytes(fusion.grid.n_voxels, memory.current_rss_bytes(), report=True)
    memory.check_limit(model_need, (fuse_options or FuseOptions()).memory_limit_gb, "the bone model and report")
    log.info("bone model and report: estimated peak memory %.2f GB", model_need / 1024**3)
    fusion.summary["estimated_peak_memory_mb"] = max(fusion.summary["estimated_peak_memory_mb"], model_need / 1024**2)
    t = time.perf_counter()
    model = build_model(fusion.image, model_options, modality=fusion.stacks[0].modality, progress=monitor)
    fusion.summary["timings_s"]["model_s"] = time.perf_counter() - t
    monitor.report("write", 0.0)
    outputs = write_fusion(fusion, paths["volume"])
    written.append(paths["volume"])
    monitor.report("write", 0.4)
    transforms = write_transforms_if_asked(fusion, fuse_options)
    written.extend(transforms)
    if transforms:
        outputs["transforms"] = transforms
    export = write_model(model.polydata, paths["model"], ras=model_options.ras)
    written.append(paths["model"])
    outputs["model"] = os.path.abspath(paths["model"])
    monitor.report("write", 0.7)
    picture = write_report_picture(paths["report"], fusion, model.polydata)
    if picture:
        written.append(picture)
        outputs["report"] = picture
    monitor.report("write", 1.0)
    summary = {**fusion.summary, "mesh": model.report, "export": export, "outputs": outputs}
    return RunResult(fusion=fusion, model=model, outputs=outputs, summary=summary)
