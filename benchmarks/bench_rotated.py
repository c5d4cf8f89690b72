"""Benchmark of the forward models for stacks rotated against the grid.

For one noise-free coronal series of the analytic phantom (simulated by the analytic, sub-sampled simulator:
no inverse crime), rotated by 0-5 degrees about a fixed oblique axis through the head's centre: the model
residual RMS ||y - A x_true|| / sqrt(n) (HU, valid samples) of the shear path (four Lanczos-3 shears), of
the skew path (through-plane first along the nearest grid axis, then two in-plane shears; with its profile
drift in voxels) and of the trilinear general path, the time of one normal application A^T A x per path
(median of 3), and the separable path's residual and time at 0 degrees for reference.

    .venv/bin/python benchmarks/bench_rotated.py [--scale 0.6] [--spacing 1.0] [--thickness 4]
"""

import argparse
import time

import numpy as np

from MultiPlaneFusionLib.reconstruction.general_operator import GeneralOperator
from MultiPlaneFusionLib.reconstruction.operators import make_operator
from MultiPlaneFusionLib.reconstruction.shear_operator import ShearOperator, shear_path_applies
from MultiPlaneFusionLib.reconstruction.skew_operator import SkewOperator, skew_drift_voxels
from MultiPlaneFusionLib.registration import rigid_matrix
from MultiPlaneFusionLib.simulation import phantom_bounds_mm, phantom_grid, phantom_truth, simulate_stack


def residual(op, y, x):
    r = (op.forward(x) - y)[op.valid]
    return float(np.sqrt(np.mean(r * r)))


def normal_s(op, x, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        op.normal(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=0.6)
    p.add_argument("--spacing", type=float, default=1.0)
    p.add_argument("--thickness", type=float, default=4.0)
    p.add_argument("--angles", default="0,0.5,1,2,5")
    p.add_argument("--axis", default="1,0.6,0.3")
    p.add_argument("--orientation", default="coronal")
    p.add_argument("--tilt", type=float, default=0.0, help="gantry tilt (degrees) of the simulated series")
    p.add_argument("--supersample", type=int, default=2,
                   help="sub-points per voxel and axis of the truth image x_true (2: the panel's)")
    p.add_argument("--fuse", action="store_true",
                   help="also fused PSNR against the angle: axial (reference) + coronal + sagittal 4 mm series with "
                        "15 HU noise, the coronal and sagittal acquired from the head rotated by the angle (about the "
                        "axis and about its mirror), registered exactly; default srr with --psf gaussian")
    args = p.parse_args(argv)
    grid = phantom_grid(args.spacing, args.scale)
    x = phantom_truth(grid, args.scale, supersample=args.supersample).astype(np.float32)
    lo, hi = phantom_bounds_mm(args.scale)
    centre = (np.asarray(lo) + np.asarray(hi)) / 2.0
    axis = np.asarray([float(v) for v in args.axis.split(",")])
    axis /= np.linalg.norm(axis)
    print(f"grid {grid.shape} at {args.spacing} mm, {args.orientation} {args.thickness} mm slices, 0.8 mm pixels, "
          f"tilt {args.tilt:g} deg, rotation axis {np.round(axis, 3).tolist()}")
    print(f"{'deg':>5} {'path':>16} {'resid HU':>9} {'normal s':>9} {'vs 0 deg':>9} {'skew drift vox':>14}")
    base = None
    for deg in [float(v) for v in args.angles.split(",")]:
        motion = rigid_matrix(axis * deg, (0.0, 0.0, 0.0), centre)
        # The stack is acquired from the moved head; its transform puts it back (the registration's result).
        stack = simulate_stack(args.orientation, tilt_deg=args.tilt, thickness_mm=args.thickness,
                               pixel_spacing_mm=0.8, scale=args.scale,
                               noise_hu=0.0, motion=motion)
        stack = stack.with_transform(np.linalg.inv(motion))
        ops = {"auto": make_operator(stack, grid)}
        if deg > 0 or args.tilt:
            if shear_path_applies(stack, grid):
                ops["shear"] = ShearOperator(stack, grid)
            ops["skew"] = SkewOperator(stack, grid)
            ops["skew-pre"] = SkewOperator(stack, grid, pre_shear=1)
            ops["skew-pre2"] = SkewOperator(stack, grid, pre_shear=2)
            ops["trilinear"] = GeneralOperator(stack, grid, shared_axis=None)
        if args.tilt:
            ops["shared"] = GeneralOperator(stack, grid)
        for name, op in ops.items():
            y = stack.pixels.astype(np.float32)
            r = residual(op, y, x)
            if base is None:
                base = r
            t = normal_s(op, x)
            pre = {"skew-pre": 1, "skew-pre2": 2}.get(name, 0)
            drift = skew_drift_voxels(stack, grid, pre_shear=pre) if name.startswith("skew") else float("nan")
            print(f"{deg:5.1f} {name + ':' + op.path:>16} {r:9.2f} {t:9.3f} {r / base:9.3f} {drift:14.3f}")
    if args.fuse:
        fuse_table(args, grid, x, centre, axis)


def fuse_table(args, grid, x, centre, axis):
    """Fused PSNR (inside the head) and srr time against the rotation of the coronal and sagittal series."""
    from MultiPlaneFusionLib.metrics import psnr
    from MultiPlaneFusionLib.reconstruction.options import SrrOptions
    from MultiPlaneFusionLib.reconstruction.srr import reconstruct_srr

    mirror = axis * np.array([1.0, -1.0, 1.0])
    head = x > -900
    print(f"{'deg':>5} {'PSNR dB':>8} {'vs 0 deg':>9} {'srr s':>7}  paths")
    base = None
    for deg in [float(v) for v in args.angles.split(",")]:
        stacks = [simulate_stack("axial", thickness_mm=args.thickness, pixel_spacing_mm=0.8, scale=args.scale,
                                 noise_hu=15.0, seed=1)]
        for n, (orient, ax) in enumerate((("coronal", axis), ("sagittal", mirror))):
            motion = rigid_matrix(ax * deg, (0.0, 0.0, 0.0), centre)
            s = simulate_stack(orient, thickness_mm=args.thickness, pixel_spacing_mm=0.8, scale=args.scale,
                               noise_hu=15.0, seed=2 + n, motion=motion)
            stacks.append(s.with_transform(np.linalg.inv(motion)))
        t = time.perf_counter()
        res = reconstruct_srr(stacks, grid, SrrOptions(psf="gaussian", self_check=False))
        seconds = time.perf_counter() - t
        q = psnr(res.volume, x, head)
        if base is None:
            base = q
        print(f"{deg:5.1f} {q:8.2f} {q - base:+9.2f} {seconds:7.1f}  {', '.join(res.info['operator_paths'])}")


if __name__ == "__main__":
    main()
