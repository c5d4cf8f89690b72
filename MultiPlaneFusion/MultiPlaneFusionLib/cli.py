"""``multiplanefusion``: a thin argparse front on the pipeline.

Every user error ends with one line on stderr (no traceback) and a non-zero exit code:
1 for input/output/memory errors, 2 for bad arguments (argparse), 130 when cancelled (Ctrl-C).
"""

import argparse
import json
import logging
import os
import sys
import time

from . import __version__, memory
from .errors import CancelledError, MultiPlaneFusionError, OutputError
from .pipeline import METHODS, FuseOptions

log = logging.getLogger("MultiPlaneFusionLib")


class ProgressPrinter:
    """Stage and percent on stderr: one updating line on a terminal, a line per 10 % otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = (None, -1)

    def __call__(self, stage, fraction):
        pct = int(fraction * 100)
        step = 1 if self.tty else 10
        if stage == self.last[0] and pct // step == self.last[1] // step:
            return
        self.last = (stage, pct)
        if self.tty:
            self.stream.write(f"\r{stage:<12s} {pct:3d}%" + ("\n" if pct >= 100 else ""))
        else:
            self.stream.write(f"{stage:<12s} {pct:3d}%\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------------- arguments
def _add_common(p):
    p.add_argument("--quiet", action="store_true", help="no progress or info messages on stderr")
    p.add_argument("--verbose", action="store_true", help="debug messages on stderr")
    p.add_argument("--json", metavar="SUMMARY.json", help="write a JSON summary of inputs, settings, timings, outputs")


def _add_fuse_arguments(p):
    g = p.add_argument_group("fusion")
    grid = g.add_mutually_exclusive_group()
    grid.add_argument("--spacing", type=float, metavar="MM", help="isotropic output spacing (default: finest in-plane)")
    grid.add_argument("--grid-like", metavar="VOLUME", help="use exactly the grid of this volume file or DICOM series")
    g.add_argument("--method", choices=METHODS, default="srr", help="srr (super-resolution, default) or average")
    g.add_argument("--extent", choices=("overlap", "union"), default="overlap",
                   help="grid covers the region all stacks share (default) or any stack covers")
    g.add_argument("--reference", type=int, default=0, metavar="N",
                   help="reference stack index (grid axes, registration target); default 0")
    g.add_argument("--no-register", action="store_true", help="trust the scanner geometry; skip registration")
    g.add_argument("--background", type=float, help="value where no stack covers (default -1024 for CT, else 0)")
    g.add_argument("--interpolation", choices=("linear", "bspline"), default="linear",
                   help="resampling of the average method (default linear)")
    g.add_argument("--coverage", metavar="FILE", help="also write the coverage mask (stacks covering each voxel)")
    g.add_argument("--memory-limit-gb", type=float, default=memory.DEFAULT_MEMORY_LIMIT_GB,
                   help=f"refuse reconstructions estimated above this (default {memory.DEFAULT_MEMORY_LIMIT_GB:g})")
    _optional_stage_arguments(p)


def _optional_stage_arguments(p):
    """Options owned by the reconstruction and registration stages."""
    from .reconstruction.srr import add_srr_arguments
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
    _add_fuse_arguments(p)
    _add_common(p)

    p = sub.add_parser("model", help="threshold a volume and export a closed, smoothed surface model")
    p.add_argument("volume", metavar="VOLUME", help="volume file or DICOM series folder")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.stl", help="model file (.stl, .obj, .ply, .vtp)")
    p.add_argument("--modality", default=None, help="CT or MR (default: guessed from the values)")
    _add_model_arguments(p)
    _add_common(p)

    p = sub.add_parser("run", help="fuse then model: OUTDIR/fused.nrrd and OUTDIR/bone.stl")
    p.add_argument("stacks", nargs="+", metavar="STACK")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    p.add_argument("--model-format", choices=("stl", "obj", "ply", "vtp"), default="stl")
    _add_fuse_arguments(p)
    _add_model_arguments(p)
    _add_common(p)

    p = sub.add_parser("demo", help="simulate a head phantom's three thick-slice DICOM series and run the pipeline")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--thickness", type=float, default=4.0, metavar="MM", help="slice thickness of the series (4)")
    p.add_argument("--pixel", type=float, default=0.8, metavar="MM", help="pixel spacing of the series (0.8)")
    p.add_argument("--scale", type=float, default=1.0, help="phantom size factor (1 = adult head)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=METHODS, default="srr")
    _add_common(p)
    return parser


def fuse_options_from_args(args):
    from .grid import grid_like
    from .reconstruction.srr import srr_options_from_args
    from .registration import registration_options_from_args

    return FuseOptions(
        method=args.method,
        spacing_mm=args.spacing,
        grid=grid_like(args.grid_like) if args.grid_like else None,
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
            flags.append(f"TILT {d['tilt_deg']:.1f}deg (sheared)")
        matrix = "x".join(str(v) for v in d["matrix"])
        pixel = "x".join(f"{v:.4g}" for v in d["pixel_spacing_mm"])
        print(f"{n:>2} {d['description'][:28]:<28} {d['orientation']:<9} {matrix:<13} {pixel:<15} "
              f"{d['thickness_mm']:>6.3g} {steps:<16} {' '.join(flags)}")
        rows.append(d)
    return {"stacks": rows}


def cmd_fuse(args, progress):
    from .pipeline import fuse_paths, write_fusion, write_transforms_if_asked
    from .writing import check_volume_path

    check_volume_path(args.output)  # fail before the long work, not after
    if args.coverage:
        check_volume_path(args.coverage)
    options = fuse_options_from_args(args)
    result = fuse_paths(args.stacks, options, progress)
    written = write_fusion(result, args.output, args.coverage)
    tfms = write_transforms_if_asked(result, options)
    if tfms:
        written["transforms"] = tfms
    if not args.quiet:
        print(f"fused volume: {written['volume']}")
    return {**result.summary, "outputs": written}


def cmd_model(args, progress):
    from .model import build_model, options_from_args, write_model
    from .reading import read_volume
    from .reading.volume_file import guess_modality
    from .writing import check_writable

    check_writable(args.output)
    t = time.perf_counter()
    image = read_volume(args.volume)
    modality = guess_modality(image, args.modality)
    options = options_from_args(args)
    result = build_model(image, options, modality=modality, progress=progress)
    report = write_model(result.polydata, args.output, ras=options.ras)
    if not args.quiet:
        print(f"model: {os.path.abspath(args.output)}")
    return {"input": args.volume, "modality": modality, "mesh": result.report, "export": report,
            "outputs": {"model": os.path.abspath(args.output)}, "timings_s": {"total_s": time.perf_counter() - t}}


def run_pipeline(stacks, outdir, fuse_options, model_options, model_format="stl", progress=None, quiet=False):
    """fuse + model into ``outdir``; returns the summary dict."""
    from .model import build_model, write_model
    from .pipeline import fuse_paths, write_fusion, write_transforms_if_asked

    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder '{outdir}': {e.strerror}") from None
    fused_path = os.path.join(outdir, "fused.nrrd")
    model_path = os.path.join(outdir, f"bone.{model_format}")
    from .writing import check_writable

    check_writable(fused_path)
    result = fuse_paths(stacks, fuse_options, progress)
    modality = result.stacks[0].modality
    t = time.perf_counter()
    model = build_model(result.image, model_options, modality=modality, progress=progress)
    result.summary["timings_s"]["model_s"] = time.perf_counter() - t
    written = write_fusion(result, fused_path)
    tfms = write_transforms_if_asked(result, fuse_options)
    if tfms:
        written["transforms"] = tfms
    written["model"] = os.path.abspath(model_path)
    export = write_model(model.polydata, model_path, ras=model_options.ras)
    if not quiet:
        print(f"fused volume: {written['volume']}")
        print(f"bone model:   {written['model']}")
    return {**result.summary, "mesh": model.report, "export": export, "outputs": written}


def cmd_run(args, progress):
    from .model import options_from_args

    return run_pipeline(args.stacks, args.output, fuse_options_from_args(args), options_from_args(args),
                        args.model_format, progress, args.quiet)


def cmd_demo(args, progress):
    from .demo import run_demo

    return run_demo(args.output, thickness_mm=args.thickness, pixel_spacing_mm=args.pixel, scale=args.scale,
                    seed=args.seed, method=args.method, progress=progress, quiet=args.quiet)


COMMANDS = {"inspect": cmd_inspect, "fuse": cmd_fuse, "model": cmd_model, "run": cmd_run, "demo": cmd_demo}


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


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    progress = None if args.quiet else ProgressPrinter()
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
    except CancelledError as e:
        print(f"multiplanefusion: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("multiplanefusion: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MultiPlaneFusionError as e:
        print(f"multiplanefusion: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("multiplanefusion: error: out of memory; use a coarser --spacing or a smaller region", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
