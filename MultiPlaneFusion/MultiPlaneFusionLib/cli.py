"""``multiplanefusion``: a thin argparse front on the pipeline.

Every user error ends with one line on stderr (no traceback) and a non-zero exit code:
1 for input/output/memory errors, 2 for bad arguments (argparse), 130 when cancelled (Ctrl-C).
"""

import argparse
import json
import logging
import os
import signal
import sys
import time

from . import __version__, memory
from .argtypes import int_at_least, positive_float
from .errors import CancelledError, MultiPlaneFusionError
from .pipeline import EXTENTS, INTERPOLATIONS, METHODS, FuseOptions
from .progress import Monitor
from .progress_display import DEMO_PLAN, FUSE_PLAN, MODEL_PLAN, RUN_PLAN, ProgressDisplay

log = logging.getLogger("MultiPlaneFusionLib")


# --------------------------------------------------------------------------------------------- arguments
def _add_common(p):
    p.add_argument("--quiet", action="store_true", help="no progress or info messages on stderr")
    p.add_argument("--verbose", action="store_true", help="debug messages on stderr")
    p.add_argument("--json", metavar="SUMMARY.json", help="write a JSON summary of inputs, settings, timings, outputs")


def _add_fuse_arguments(p):
    d = FuseOptions()
    g = p.add_argument_group("fusion")
    grid = g.add_mutually_exclusive_group()
    grid.add_argument("--spacing", type=positive_float, metavar="MM",
                      help="isotropic output spacing (default: finest in-plane)")
    grid.add_argument("--grid-like", metavar="VOLUME", help="use exactly the grid of this volume file or DICOM series")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help=f"srr (super-resolution) or average (default {d.method})")
    g.add_argument("--extent", choices=EXTENTS, default=d.extent,
                   help="grid covers the region all stacks share (overlap) or any stack covers (union); "
                        f"default {d.extent}")
    g.add_argument("--reference", type=int_at_least(0), default=d.reference, metavar="N",
                   help=f"reference stack index (grid axes, registration target); default {d.reference}")
    g.add_argument("--no-register", action="store_true", help="trust the scanner geometry; skip registration")
    g.add_argument("--background", type=float, help="value where no stack covers (default -1024 for CT, else 0)")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, default=d.interpolation,
                   help=f"resampling of the average method (default {d.interpolation})")
    g.add_argument("--coverage", metavar="FILE", help="also write the coverage mask (stacks covering each voxel)")
    g.add_argument("--memory-limit-gb", type=positive_float, default=d.memory_limit_gb,
                   help="refuse reconstructions estimated above this (default: 90%% of the memory available)")
    _optional_stage_arguments(p)


def _optional_stage_arguments(p):
    """Options owned by the reconstruction and registration stages."""
    from .reconstruction.options import add_srr_arguments
    from .registration import add_registration_arguments

    add_srr_arguments(p)  # makes its own argument group
    add_registration_arguments(p.add_argument_group("registration"))


def _add_model_arguments(p):
    from .model import add_model_arguments

    add_model_arguments(p)  # makes its own argument group


def build_parser():
    parser = argparse.ArgumentParser(
        prog="multiplanefusion",
        description="Fuse thick-slice CT/MR series in several planes into one isotropic volume and a bone model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="list the stacks found in DICOM folders or volume files")
    p.add_argument("paths", nargs="+", metavar="PATH")
    _add_common(p)

    p = sub.add_parser("fuse", help="fuse stacks into one volume")
    p.add_argument("stacks", nargs="+", metavar="STACK", help="DICOM series folder, folder tree, or volume file")
    p.add_argument("-o", "--output", required=True, metavar="FUSED.nrrd", help="output volume (.nrrd, .nii.gz, .mha)")
    p.add_argument("--report", metavar="PICTURE.png", help="also write the report picture (inputs beside the result)")
    _add_fuse_arguments(p)
    _add_common(p)

    p = sub.add_parser("model", help="threshold a volume and export a closed, smoothed surface model")
    p.add_argument("volume", metavar="VOLUME", help="volume file or DICOM series folder")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.stl", help="model file (.stl, .obj, .ply, .vtp)")
    p.add_argument("--modality", default=None, help="CT or MR (default: guessed from the values)")
    _add_model_arguments(p)
    _add_common(p)

    p = sub.add_parser("run", help="fuse then model: OUTDIR/fused.nrrd, OUTDIR/bone.stl, OUTDIR/report.png")
    p.add_argument("stacks", nargs="+", metavar="STACK")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    p.add_argument("--model-format", choices=("stl", "obj", "ply", "vtp"), default="stl")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in OUTDIR")
    _add_fuse_arguments(p)
    _add_model_arguments(p)
    _add_common(p)

    p = sub.add_parser("batch", help="run many cases (a manifest or a DICOM tree) on Dask into OUTDIR/<case>/, "
                                     "resumable; needs the batch extra")
    _add_fuse_arguments(p)
    _add_model_arguments(p)
    _add_common(p)
    from .batch import add_arguments as add_batch_arguments  # plain Python: Dask is imported by the command

    add_batch_arguments(p)

    demo = _keyword_defaults("demo", "run_demo")
    p = sub.add_parser("demo", help="simulate a head phantom's three thick-slice DICOM series and run the pipeline")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--thickness", type=positive_float, default=demo["thickness_mm"], metavar="MM",
                   help=f"slice thickness of the series ({demo['thickness_mm']:g})")
    p.add_argument("--pixel", type=positive_float, default=demo["pixel_spacing_mm"], metavar="MM",
                   help=f"pixel spacing of the series ({demo['pixel_spacing_mm']:g})")
    p.add_argument("--scale", type=positive_float, default=demo["scale"], help="phantom size factor (1 = adult head)")
    p.add_argument("--seed", type=int, default=demo["seed"])
    p.add_argument("--method", choices=METHODS, default=demo["method"])
    _add_common(p)
    return parser


def _keyword_defaults(module, function):
    """The keyword defaults of ``module.function`` (read, not repeated, by the parser)."""
    import importlib
    import inspect

    signature = inspect.signature(getattr(importlib.import_module(f".{module}", __package__), function))
    return {k: v.default for k, v in signature.parameters.items() if v.default is not inspect.Parameter.empty}


def fuse_options_from_args(args):
    from .reading import read_grid_source
    from .reconstruction.options import srr_options_from_args
    from .registration import registration_options_from_args

    return FuseOptions(
        method=args.method,
        spacing_mm=args.spacing,
        grid=read_grid_source(args.grid_like) if args.grid_like else None,
        extent=args.extent,
        reference=args.reference,
        register=not args.no_register,
        memory_limit_gb=args.memory_limit_gb,
        background=args.background,
        interpolation=args.interpolation,
        srr=srr_options_from_args(args),
        registration=registration_options_from_args(args),
    )


# ---------------------------------------------------------------------------------------------- commands
def cmd_inspect(args, progress):
    from .reading import read_stacks

    stacks = read_stacks(args.paths)
    header = (f"{'#':>2} {'description':<28} {'orient.':<9} {'matrix':<13} {'pixel mm':<15} {'thick':>6} "
              f"{'step min-max mm':<16} flags")
    print(header)
    rows = []
    for n, s in enumerate(stacks):
        d = s.summary()
        steps = "-" if d["slice_step_min_mm"] is None else f"{d['slice_step_min_mm']:.2f}-{d['slice_step_max_mm']:.2f}"
        flags = []
        if d["gaps"]:
            flags.append("GAPS")
        if d["sheared"]:
            d["signed_tilt_deg"], along = signed_tilt(s)
            flags.append(f"TILT {d['signed_tilt_deg']:+.1f}deg along {along} (sheared)")
        if d["acquisition"]:  # sets the nominal slice profile (box for sequenced CT)
            flags.append(d["acquisition"].upper())
        matrix = "x".join(str(v) for v in d["matrix"])
        pixel = "x".join(f"{v:.4g}" for v in d["pixel_spacing_mm"])
        print(f"{n:>2} {d['description'][:28]:<28} {d['orientation']:<9} {matrix:<13} {pixel:<15} "
              f"{d['thickness_mm']:>6.3g} {steps:<16} {' '.join(flags)}")
        print(f"{'':>2} {d['source']}")  # the path tells rows with the same description apart
        rows.append(d)
    return {"stacks": rows}


def signed_tilt(stack):
    """Gantry tilt in degrees with its sign, and the in-plane axis the slices drift along ("rows" when
    the slice origins move along the row direction i, "columns" along j)."""
    shear = stack.shear_per_mm
    axis = int(abs(shear[1]) >= abs(shear[0]))
    sign = 1.0 if shear[axis] >= 0 else -1.0
    return sign * stack.tilt_deg, ("columns" if axis else "rows")


def cmd_fuse(args, progress):
    from .pipeline import fuse_paths, write_fusion, write_transforms_if_asked
    from .report_picture import write_report_picture
    from .writing import check_volume_path, check_writable

    check_volume_path(args.output)  # fail before the long work, not after
    if args.coverage:
        check_volume_path(args.coverage)
    if args.report:
        check_writable(args.report)
    options = fuse_options_from_args(args)
    result = fuse_paths(args.stacks, options, progress)
    monitor = Monitor.wrap(progress)
    monitor.report("write", 0.0)
    written = write_fusion(result, args.output, args.coverage)
    tfms = write_transforms_if_asked(result, options)
    if args.report:
        picture = write_report_picture(args.report, result)
        if picture:
            written["report"] = picture
    monitor.report("write", 1.0)
    if tfms:
        written["transforms"] = tfms
    if not args.quiet:
        _end_progress_line(progress)
        print(f"fused volume: {written['volume']}")
    return {**result.summary, "outputs": written}


def cmd_model(args, progress):
    from .model import build_model, options_from_args, write_model
    from .reading import read_volume
    from .reading.volume_file import guess_modality
    from .writing import check_writable

    check_writable(args.output)
    t = time.perf_counter()
    monitor = Monitor.wrap(progress)
    monitor.report("read", 0.0)
    image = read_volume(args.volume)
    monitor.report("read", 1.0)
    modality = guess_modality(image, args.modality)
    need = memory.estimate_model_bytes(image.GetNumberOfPixels(), memory.current_rss_bytes())
    memory.check_limit(need, memory.DEFAULT_MEMORY_LIMIT_GB, "the bone model")
    log.info("estimated peak memory %.2f GB", need / 1024**3)
    options = options_from_args(args)
    result = build_model(image, options, modality=modality, progress=progress)
    monitor.report("write", 0.0)
    report = write_model(result.polydata, args.output, ras=options.ras)
    monitor.report("write", 1.0)
    if not args.quiet:
        _end_progress_line(progress)
        print(f"model: {os.path.abspath(args.output)}")
    return {"input": args.volume, "modality": modality, "mesh": result.report, "export": report,
            "outputs": {"model": os.path.abspath(args.output)}, "timings_s": {"total_s": time.perf_counter() - t},
            "estimated_peak_memory_mb": need / 1024**2}


def _print_outputs(outputs, progress, quiet):
    if not quiet:
        _end_progress_line(progress)
        print(f"fused volume: {outputs['volume']}")
        print(f"bone model:   {outputs['model']}")


def cmd_run(args, progress):
    from .model import options_from_args
    from .pipeline import run_to_folder

    result = run_to_folder(args.stacks, args.output, fuse_options=fuse_options_from_args(args),
                           model_options=options_from_args(args), model_format=args.model_format,
                           progress=progress, overwrite=args.overwrite)
    _print_outputs(result.outputs, progress, args.quiet)
    return result.summary


def cmd_demo(args, progress):
    from .demo import run_demo

    result = run_demo(args.output, thickness_mm=args.thickness, pixel_spacing_mm=args.pixel, scale=args.scale,
                      seed=args.seed, method=args.method, progress=progress)
    _print_outputs(result.outputs, progress, args.quiet)
    if not args.quiet:
        print(f"ground truth: {result.outputs['truth']}")
    return result.summary


def cmd_batch(args, progress):
    from .batch.command import run_command  # imports Dask only when it runs (exit 1 with a hint if absent)

    return run_command(args, progress, fuse_options_from_args(args))


COMMANDS = {"inspect": cmd_inspect, "fuse": cmd_fuse, "model": cmd_model, "run": cmd_run, "demo": cmd_demo,
            "batch": cmd_batch}


def _write_json(path, summary):
    from .writing import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=_json_default)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def _plan(args):
    """Stages of this command and their shares of its time (see progress_display)."""
    plans = {"fuse": FUSE_PLAN, "run": RUN_PLAN, "demo": DEMO_PLAN, "model": MODEL_PLAN}
    plan = dict(plans.get(args.command, FUSE_PLAN))
    if getattr(args, "method", "srr") != "srr":
        plan.pop("refine", None)
    if getattr(args, "no_register", False):
        plan.pop("register", None)
        plan.pop("refine", None)
    return plan


def _end_progress_line(progress):
    end = getattr(progress, "finish", None)
    if end is not None:
        end()


def _interrupt_hook(progress):
    """Test hook: ``MULTIPLANEFUSION_TEST_SIGINT_AT=STAGE`` sends this process a real SIGINT the first time
    ``STAGE`` reports a fraction above 0, i.e. from inside that stage's callbacks (tests of Ctrl-C)."""
    stage = os.environ.get("MULTIPLANEFUSION_TEST_SIGINT_AT")
    if not stage:
        return progress
    fired = []

    def hooked(name, fraction):
        if progress is not None:
            progress(name, fraction)
        if name == stage and fraction > 0 and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    return hooked


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    progress = None if args.quiet else ProgressDisplay(_plan(args))
    if progress is None:
        logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    else:  # log lines go above the progress line, never glued to it
        logging.basicConfig(level=level, handlers=[progress.log_handler()])
    display, progress = progress, _interrupt_hook(progress)
    t = time.perf_counter()
    try:
        if args.json:
            from .writing import check_writable

            check_writable(args.json)
        summary = COMMANDS[args.command](args, progress)
        if args.json:
            summary = dict(summary or {})
            summary["command"] = args.command
            summary["wall_time_s"] = time.perf_counter() - t
            summary["peak_memory_mb"] = memory.peak_rss_mb()
            summary["version"] = __version__
            _write_json(args.json, summary)
        _end_progress_line(display)
    except CancelledError as e:
        _end_progress_line(display)
        print(f"multiplanefusion: error: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        _end_progress_line(display)
        print("multiplanefusion: error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MultiPlaneFusionError as e:
        _end_progress_line(display)
        print(f"multiplanefusion: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        _end_progress_line(display)
        print("multiplanefusion: error: out of memory; use a coarser --spacing or a smaller region", file=sys.stderr)
        return 1
    except OSError as e:  # the system refused a file operation the checks above did not foresee (disk full, I/O)
        _end_progress_line(display)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"multiplanefusion: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
