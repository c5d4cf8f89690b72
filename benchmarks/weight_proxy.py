"""Can the data choose the prior's strength by self-supervision? A diagnostic on the panel's simulated cases.

Every thick series is sharp in its own plane. A *proxy* takes that in-plane detail as a truth, simulates
thick series from it the way the real ones are thick, reconstructs them at candidate settings with the
library's solver and keeps the setting that recovers the proxy truth best (the idea of self-supervised
through-plane super-resolution, e.g. SMORE). Three proxies:

- ``2d``: each of a few slices of every series is a 2-D truth; the other series whose normals lie in its
  plane give two 1-D thick "series" across it (their profile, thickness and step; noise brought up to
  their level, estimated from the data), solved with the library's normal equations and IRLS.
- ``3d-exact``: each series' volume, its slice index taken as a third axis at the pixel spacing
  (squashed along the normal), is a 3-D truth (a centred in-plane crop); three orthogonal series are
  simulated from it as the panel simulates (exact profile integrals, no in-plane blur) and reconstructed
  by ``reconstruct_srr``.
- ``3d-model``: the same truth around the probe block (``--centre block``) or the series' centre, the
  series simulated through the library's own forward model (in-plane FWHM ``--sim-in-plane`` x pixel,
  default the model's) with every real series' orientation, spacing and thickness.

The printed table is the proxy's error (RMS HU over the proxy truth above -500 HU) per candidate and its
choice; compare with the exhaustive sweep's best fixed setting per case (``bench_panel.py --sweep``). The
README ("What the data can and cannot choose") has the measured outcome.

    python benchmarks/weight_proxy.py --kind 3d-exact [--families] [--cases "P 4mm"]
"""

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import panel
from common import RESULTS, machine, print_table, write_json

from MultiPlaneFusionLib.grid import Grid
from MultiPlaneFusionLib.reconstruction import autotune
from MultiPlaneFusionLib.reconstruction.operators import make_operator
from MultiPlaneFusionLib.reconstruction.options import SrrOptions
from MultiPlaneFusionLib.reconstruction.penalty import hybrid_split
from MultiPlaneFusionLib.reconstruction.solvers import NormalEquations, solve_huber, solve_tikhonov
from MultiPlaneFusionLib.reconstruction.srr import reconstruct_srr
from MultiPlaneFusionLib.sampling.psf import SliceProfile
from MultiPlaneFusionLib.stack import Stack

OFFSET_HU = -1024.0
OBJECT_HU = -500.0
HYBRID = (0.05, 0.2)  # the default hybrid's shares; candidates scale both
FACTORS = (0.1, 0.3, 1.0, 3.0)
THRESHOLD = 0.025


def candidates(families):
    """(label, regularizer, alpha, huber_alpha, threshold)."""
    out = [(f"hybrid x{f:g}", "hybrid", HYBRID[0] * f, HYBRID[1] * f, THRESHOLD) for f in FACTORS]
    if families:
        out += [(f"tikhonov {a:g}", "tikhonov", a, 0.0, None) for a in (0.021, 0.07, 0.21)]
        out += [(f"huber {a:g}", "huber", a, 0.0, 0.05) for a in (0.15, 0.5, 1.5)]
    return out


def noise_sigma_hu(pixels):
    """White-noise sigma from in-plane second differences (median absolute value; Immerkaer's mask)."""
    p = np.asarray(pixels, np.float64)
    c = (p[:, :-2, :-2] - 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:] - 2 * p[:, 1:-1, :-2] + 4 * p[:, 1:-1, 1:-1]
         - 2 * p[:, 1:-1, 2:] + p[:, 2:, :-2] - 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:])
    return float(np.median(np.abs(c)) / 0.6745 / 6.0)


def _rms(a, b, mask):
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64))[mask]
    return float(np.sqrt(np.mean(d * d)))


# ---------------------------------------------------------------------------------------------------- 2-D
class _ThickAxis:
    """``y = W x`` along array axis 1 (j) or 2 (i) of a (1, nj, ni) grid; the interface NormalEquations uses."""

    def __init__(self, w, axis):
        self.w = w.astype(np.float32)
        self.axis = axis
        self.gram = self.w.T @ self.w

    def forward(self, x):
        return np.einsum("kji,mi->kjm", x, self.w) if self.axis == 2 else np.einsum("kji,mj->kmi", x, self.w)

    def adjoint(self, y):
        return np.einsum("kjm,mi->kji", y, self.w) if self.axis == 2 else np.einsum("kmi,mj->kji", y, self.w)

    def normal(self, x, out=None, scale=1.0, workers=None, scratch=None, accumulate=True):
        r = x @ self.gram if self.axis == 2 else np.einsum("kji,jl->kli", x, self.gram)
        r = (r * np.float32(scale)).astype(np.float32)
        if accumulate:
            out += r
        else:
            out[...] = r
        return out


def _solve_2d(ops, ys, cs, spacing, cand, x0):
    _, reg, alpha, huber_alpha, delta = cand
    b = np.zeros_like(x0)
    rows = np.zeros_like(x0)
    for op, y, c in zip(ops, ys, cs):
        b += np.float32(c) * op.adjoint(y)
        rows += np.float32(c) * op.adjoint(np.ones_like(y))
    x = (b / np.maximum(rows, 1e-6)).astype(np.float32)
    if reg == "tikhonov":
        system = NormalEquations(ops, cs, alpha, spacing, rows)
        solve_tikhonov(system, b, x, max_iterations=300, tolerance=1e-4, solution_tolerance=1e-3)
    else:
        weight, floor = hybrid_split(alpha, huber_alpha) if reg == "hybrid" else (alpha, 0.0)
        system = NormalEquations(ops, cs, weight, spacing, rows)
        solve_huber(system, b, x, delta, outer_iterations=10, max_iterations=300, tolerance=1e-4, edge_scale_mm=0.35,
                    solution_tolerance=1e-3, floor=floor)
    return x


def proxy_2d(stacks, profiles, cands, scale, rng, n_slices=3):
    sig = [noise_sigma_hu(s.pixels) / scale for s in stacks]
    err = {c[0]: [] for c in cands}
    for a, s in enumerate(stacks):
        row, col = s.row_direction, s.column_direction
        di, dj = s.pixel_spacing_mm
        for k in np.linspace(0.3 * s.shape[0], 0.7 * s.shape[0], n_slices).round().astype(int):
            truth = ((s.pixels[k] - np.float32(OFFSET_HU)) / np.float32(scale))[None].astype(np.float32)
            _, nj, ni = truth.shape
            ops, ys, cs = [], [], []
            for b, (sb, p) in enumerate(zip(stacks, profiles)):
                if abs(float(sb.normal @ row)) > 0.99:
                    axis, d, n = 2, di, ni
                elif abs(float(sb.normal @ col)) > 0.99:
                    axis, d, n = 1, dj, nj
                else:
                    continue
                step = sb.slice_step_mm
                w = panel.sampling_matrix(np.arange(0.5 * step / d, n - 1, step / d), n, p.kind, p.width_mm(sb) / d)
                op = _ThickAxis(w, axis)
                y = op.forward(truth)
                inherited = sig[a] * math.sqrt(float((w ** 2).sum(axis=1).mean()))
                add = math.sqrt(max(0.0, sig[b] ** 2 - inherited ** 2))
                ops.append(op)
                ys.append(y + np.float32(add) * rng.standard_normal(y.shape).astype(np.float32))
                cs.append(step / d)
            if len(ops) < 2:
                continue
            mask = np.zeros(truth.shape, bool)
            mask[:, 8:-8, 8:-8] = True
            mask &= truth > (OBJECT_HU - OFFSET_HU) / scale
            for cand in cands:
                x = _solve_2d(ops, ys, cs, (1.0, dj, di), cand, truth)
                err[cand[0]].append(_rms(x, truth, mask) * scale)
    return {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in err.items()}


# ---------------------------------------------------------------------------------------------------- 3-D
def _squashed(s, centre_index, crop_px, max_slices):
    """(volume HU, grid): a crop of the series, its slice index a third axis at the mean pixel spacing."""
    def window(c, n, size):
        lo = min(max(int(round(c - size / 2)), 0), max(0, n - size))
        return lo, min(n, lo + size)

    (k0, k1), (j0, j1), (i0, i1) = (window(c, n, z) for c, n, z in
                                    zip(centre_index, s.shape, (max_slices, crop_px, crop_px)))
    vol = np.ascontiguousarray(s.pixels[k0:k1, j0:j1, i0:i1], np.float32)
    di, dj = s.pixel_spacing_mm
    origin = s.slice_origins_mm[k0] + i0 * di * s.row_direction + j0 * dj * s.column_direction
    m = np.stack([s.row_direction, s.column_direction, s.normal], axis=1)
    grid = Grid(shape=vol.shape, spacing_mm=(di, dj, 0.5 * (di + dj)), origin_mm=tuple(float(v) for v in origin),
                direction=tuple(float(v) for v in m.ravel()))
    return vol, grid


def _interior(grid, margin_mm):
    h = np.asarray(grid.spacing_mm[::-1], float)
    m = [int(math.ceil(min(margin_mm, 0.3 * n * hh) / hh)) for n, hh in zip(grid.shape, h)]
    return tuple(slice(r, n - r) for r, n in zip(m, grid.shape))


def proxy_3d_exact(stacks, case, cands, scale, rng, crop_px=64):
    sig = [noise_sigma_hu(s.pixels) for s in stacks]
    err = {c[0]: [] for c in cands}
    for a, s in enumerate(stacks):
        truth, grid = _squashed(s, [(n - 1) / 2.0 for n in s.shape], crop_px, 10 ** 6)
        grid = replace(grid, origin_mm=(0.0, 0.0, 0.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
        prox = []
        for n, o in enumerate(("axial", "coronal", "sagittal")):
            # the truth's own noise, averaged over a profile, is a small part of the level: not subtracted
            prox.append(panel.simulate_from_volume(truth, grid, o, case.thickness_mm, case.step_mm, case.profile,
                                                   sig[(a + n) % 3], seed=int(rng.integers(1 << 30))))
        box = _interior(grid, 3.0)
        t = truth[box]
        mask = t > OBJECT_HU
        for label, reg, alpha, huber_alpha, delta in cands:
            opts = SrrOptions(psf=case.profile, self_check=False, regularizer=reg, alpha=alpha,
                              huber_alpha=huber_alpha if reg == "hybrid" else None, huber_delta=delta)
            err[label].append(_rms(reconstruct_srr(prox, grid, opts).volume[box], t, mask))
    return {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in err.items()}


def _proxy_stack(b, grid):
    """An empty series with ``b``'s orientation, pixel spacing, step and thickness covering ``grid``."""
    nk, nj, ni = grid.shape
    cs = np.array(np.meshgrid([-0.5, nk - 0.5], [-0.5, nj - 0.5], [-0.5, ni - 0.5], indexing="ij")).reshape(3, -1)
    corners = grid.index_to_physical(cs[0], cs[1], cs[2])
    c = corners.mean(axis=0)
    di, dj = b.pixel_spacing_mm
    step = b.slice_step_mm if b.shape[0] > 1 else b.thickness_mm

    def reach(v):
        return float(np.abs((corners - c) @ v).max())

    n_i = int(math.ceil(2 * reach(b.row_direction) / di)) + 1
    n_j = int(math.ceil(2 * reach(b.column_direction) / dj)) + 1
    u = np.arange(-reach(b.normal), reach(b.normal) + 1e-9, step)
    u -= u.mean()
    origins = (c[None, :] + u[:, None] * b.normal[None, :] - 0.5 * (n_i - 1) * di * b.row_direction
               - 0.5 * (n_j - 1) * dj * b.column_direction)
    return Stack(pixels=np.zeros((len(u), n_j, n_i), np.float32), slice_origins_mm=origins,
                 row_direction=b.row_direction, column_direction=b.column_direction, pixel_spacing_mm=(di, dj),
                 thickness_mm=b.thickness_mm, modality="CT", description="proxy " + b.description)


def proxy_3d_model(stacks, profiles, cands, scale, rng, grid, centre="block", sim_in_plane=None, crop_px=64,
                   max_slices=64):
    block, _ = autotune.choose_block(stacks, grid, 48)
    block_centre = block.index_to_physical(*[(n - 1) / 2.0 for n in block.shape])
    sig = [noise_sigma_hu(s.pixels) / scale for s in stacks]
    err = {c[0]: [] for c in cands}
    for a, s in enumerate(stacks):
        if centre == "block":
            k, j, i = s.physical_to_index(np.asarray(block_centre, float)[None, :])
            ci = [float(np.ravel(v)[0]) for v in (k, j, i)]
        else:
            ci = [(n - 1) / 2.0 for n in s.shape]
        vol, g = _squashed(s, ci, crop_px, max_slices)
        truth = (vol - np.float32(OFFSET_HU)) * np.float32(1.0 / scale)
        prox = []
        for nb, (b, p) in enumerate(zip(stacks, profiles)):
            ps = p.apply(_proxy_stack(b, g))
            sim = ps if sim_in_plane is None else replace(ps, in_plane_fwhm_factor=float(sim_in_plane))
            op = make_operator(sim, g, p.kind)
            y = op.forward(truth)
            spread = op.forward(rng.standard_normal(truth.shape).astype(np.float32))
            inherited = float(np.std(spread[op.valid])) * sig[a] if op.valid.any() else 0.0
            y += np.float32(math.sqrt(max(0.0, sig[nb] ** 2 - inherited ** 2))) * rng.standard_normal(y.shape).astype(
                np.float32)
            y[~op.valid] = 0.0
            prox.append(replace(ps, pixels=y))
        margin = 3.0 * max(x.thickness_mm for x in stacks) * 1.25 / 2.3548 * 0.5 + float(max(g.spacing_mm))
        problem = autotune.BlockProblem(prox, g, autotune.Normalisation(0.0, 1.0), margin_mm=margin)
        box = _interior(g, margin)
        t = truth[box]
        mask = t > (OBJECT_HU - OFFSET_HU) / scale
        for label, reg, alpha, huber_alpha, delta in cands:
            x = problem.solve(prox, profiles, alpha, regularizer=reg, huber=(delta, 0.35, 10, huber_alpha))
            err[label].append(_rms(x[box], t, mask) * scale)
    return {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in err.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("2d", "3d-exact", "3d-model"), default="3d-exact")
    ap.add_argument("--cases", nargs="*", default=["P ", "A "])
    ap.add_argument("--families", action="store_true", help="also Tikhonov and Huber (2d, 3d-exact)")
    ap.add_argument("--centre", choices=("block", "stack"), default="block", help="3d-model: where the crop is")
    ap.add_argument("--sim-in-plane", type=float, default=None, help="3d-model: in-plane FWHM of the simulation")
    ap.add_argument("--crop", type=int, default=64, help="3-D: in-plane crop of the proxy truths, pixels")
    ap.add_argument("--json", default=str(RESULTS / "weight_proxy.json"))
    args = ap.parse_args()
    from MultiPlaneFusionLib.reconstruction.srr import _robust_range

    cands = candidates(args.families and args.kind != "3d-model")
    rng = np.random.default_rng(0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    for case in panel.get_cases(args.cases):
        if not case.simulated:
            continue
        t0 = time.perf_counter()
        stacks = panel.simulate_case_stacks(case)
        profiles = [SliceProfile(case.profile)] * len(stacks)
        scale = _robust_range(stacks, OFFSET_HU)
        if args.kind == "2d":
            err = proxy_2d(stacks, profiles, cands, scale, rng)
        elif args.kind == "3d-exact":
            err = proxy_3d_exact(stacks, case, cands, scale, rng, crop_px=args.crop)
        else:
            err = proxy_3d_model(stacks, profiles, cands, scale, rng, panel.truth_for(case)[1], centre=args.centre,
                                 sim_in_plane=args.sim_in_plane, crop_px=args.crop)
        best = min(err, key=err.get)
        rows.append({"case": case.name, "kind": args.kind, "rms_hu": err, "choice": best,
                     "seconds": time.perf_counter() - t0})
        print(f"{case.name}: {best}  ({', '.join(f'{k} {v:.1f}' for k, v in err.items())})", flush=True)
    labels = [c[0] for c in cands]
    table = [dict({"case": r["case"], "choice": r["choice"]}, **r["rms_hu"]) for r in rows]
    print_table(f"proxy {args.kind}: RMS error (HU) on the proxy truth, {started}", table,
                [("case", "case", "")] + [(k, k, ".1f") for k in labels] + [("choice", "choice", "")])
    write_json(args.json, {"machine": machine(), "started": started, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
