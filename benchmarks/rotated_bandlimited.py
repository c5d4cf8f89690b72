"""The rotated-stack residual with a band-limited truth: is a small-angle excess the operator's or the instrument's?

bench_rotated.py scores y - A x_true with y from the analytic simulator and x_true the phantom rasterised on
the grid: hard edges, aliased. Here both come from one band-limited object instead: the phantom on a grid of
half the spacing, smoothed by a Gaussian of ``--sigma`` mm; y is that fine image through the stack's own
model on the fine grid, x_true the same image sampled at the coarse grid's nodes. With ``--sigma 0`` the
object is the plain rasterised phantom again.

    python benchmarks/rotated_bandlimited.py --scale 0.4 --sigma 0.6
"""

import argparse

import numpy as np
import SimpleITK as sitk

from MultiPlaneFusionLib.grid import Grid
from MultiPlaneFusionLib.reconstruction.general_operator import GeneralOperator
from MultiPlaneFusionLib.reconstruction.operators import make_operator
from MultiPlaneFusionLib.reconstruction.shear_operator import ShearOperator
from MultiPlaneFusionLib.registration import rigid_matrix
from MultiPlaneFusionLib.simulation import phantom_bounds_mm, phantom_grid, phantom_truth, simulate_stack


def band_limited_truth(scale, sigma_mm):
    """(coarse grid at 1 mm, fine grid at 0.5 mm, fine image, coarse image): the object and its samples."""
    coarse = phantom_grid(1.0, scale)
    # the fine nodes straddle the coarse ones (0.75 mm of margin each side), so every coarse node is inside
    fine = Grid(shape=tuple(int(n * 2 + 2) for n in coarse.shape), spacing_mm=(0.5, 0.5, 0.5),
                origin_mm=tuple(float(o) - 0.75 for o in coarse.origin_mm))
    img = fine.image(phantom_truth(fine, scale, supersample=2).astype(np.float32))
    if sigma_mm > 0:
        img = sitk.SmoothingRecursiveGaussian(img, sigma_mm)
        ref = coarse.image(np.zeros(coarse.shape, np.float32))
        xc = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1000.0))
    else:
        xc = phantom_truth(coarse, scale, supersample=2)
    return coarse, fine, sitk.GetArrayFromImage(img).astype(np.float32), np.asarray(xc, np.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=0.4)
    p.add_argument("--sigma", type=float, default=0.6, help="band limit of the object, Gaussian sigma in mm")
    p.add_argument("--angles", default="0,0.15,0.3,1,3")
    p.add_argument("--axis", default="1,0.6,0.3")
    args = p.parse_args(argv)
    coarse, fine, xf, xc = band_limited_truth(args.scale, args.sigma)
    lo, hi = phantom_bounds_mm(args.scale)
    centre = (np.asarray(lo) + np.asarray(hi)) / 2.0
    axis = np.asarray([float(v) for v in args.axis.split(",")])
    axis /= np.linalg.norm(axis)
    print(f"coarse grid {coarse.shape} at 1 mm, object sigma {args.sigma:g} mm; coronal 4 mm series, 0.8 mm pixels; "
          "residual RMS HU (ratio to aligned)")
    base = None
    for deg in [float(v) for v in args.angles.split(",")]:
        motion = rigid_matrix(axis * deg, (0.0, 0.0, 0.0), centre)
        stack = simulate_stack("coronal", thickness_mm=4.0, pixel_spacing_mm=0.8, scale=args.scale, noise_hu=0.0,
                               motion=motion).with_transform(np.linalg.inv(motion))
        y = make_operator(stack, fine).forward(xf)
        ops = {"auto": make_operator(stack, coarse)}
        if deg > 0:
            ops["shear"] = ShearOperator(stack, coarse)
            ops["trilinear"] = GeneralOperator(stack, coarse, shared_axis=None)
        cells = []
        for name, op in ops.items():
            ok = np.asarray(op.valid, bool)
            r = float(np.sqrt(np.mean((y[ok] - op.forward(xc)[ok]) ** 2)))
            base = r if base is None else base
            cells.append(f"{name} ({op.path}) {r:.2f} ({r / base:.3f})")
        print(f"{deg:5.2f} deg  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
