"""Does a cross-validation score on the probe block rank prior x weight settings as the truth does?

For each panel case (simulated: no registration) and each candidate setting (regularizer, alpha), with the
slice profiles the default chose (``--psf auto``) held fixed:

- truth: PSNR (dB) and 300 HU surface distance of the full reconstruction with that setting;
- scores on the probe block (normalised mean squared prediction error, lower is better):
  ``slices``: 2-fold held-out slices (``autotune._cv_errors``, what ``--alpha auto`` uses);
  ``loso``: leave one stack out, the fusion of the others predicting it through its profile;
  ``loso_n``: the same with alpha scaled by (n-1)/n (the weight per unit data of the full problem).
  (``--hybrid-factors``: the candidates are the default hybrid with both shares scaled; the ``loso_n`` and
  ``n2n`` variants then scale its Tikhonov share only.)

Prints per case the table and, per score, the truth PSNR lost by taking its best setting (regret).

Usage::

    python benchmarks/rank_check.py --cases "P 3mm" "A 3mm" "P 5mm/4"
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import panel  # noqa: E402
from common import RESULTS, write_json  # noqa: E402

from MultiPlaneFusionLib.reading import read_stacks  # noqa: E402
from MultiPlaneFusionLib.reconstruction import autotune, srr  # noqa: E402
from MultiPlaneFusionLib.reconstruction.options import SrrOptions, parse_in_plane  # noqa: E402
from MultiPlaneFusionLib.reconstruction.parallel import Workers  # noqa: E402

# weight of the lightly regularised half reconstructions the n2n score compares against (mm^2)
REF_ALPHA = 0.01
CANDIDATES = [("tikhonov", 0.03), ("tikhonov", 0.1), ("tikhonov", 0.3),
              ("huber", 0.15), ("huber", 0.5), ("huber", 1.5)]


def probe_for(stacks, grid, options, workers):
    run = srr._Run(stacks=stacks, grid=grid, options=options, monitor=srr.Monitor.wrap(None), workers=workers)
    run.background = srr.default_background(stacks)
    srr._agree_and_match(run)
    run.offset = float(run.background)
    run.scale = srr._robust_range(run.work, run.offset)
    return srr._probe(run.work, grid, offset=run.offset, scale=run.scale, options=options, workers=workers)


def loso_errors(problem, profiles, alpha, regularizer, huber, alpha_scale=False):
    """Per left-out stack the mean squared prediction error (normalised units) from the fusion of the others."""
    stacks = problem.stacks
    n = len(stacks)
    out = []
    for k, s in enumerate(stacks):
        others = [i for i in range(n) if i != k]
        a = alpha * (n - 1) / n if alpha_scale else alpha
        x = problem.solve([stacks[i] for i in others], [profiles[i] for i in others], a,
                          regularizer=regularizer, huber=huber)
        pred, meas, mask = problem.predict(s, profiles[k], x)
        d = (pred - meas)[mask].astype(np.float64)
        out.append(float(d @ d) / max(d.size, 1))
    return out


def split_halves(problem, profiles):
    """(half 0, half 1): every stack's even and odd slices, with their profiles."""
    halves = ([], [])
    for s, p in zip(problem.stacks, profiles):
        idx = np.arange(s.shape[0]) % 2
        for f in (0, 1):
            halves[f].append((autotune.select_slices(s, idx == f), p))
    return halves


def interior_mask(problem):
    g = problem.grid
    h = np.asarray(g.spacing_mm[::-1], float)
    m = [int(np.ceil(problem.margin_mm / h[a])) for a in range(3)]
    mask = np.zeros(g.shape, bool)
    mask[m[0]:g.shape[0] - m[0], m[1]:g.shape[1] - m[1], m[2]:g.shape[2] - m[2]] = True
    return mask


def n2n_error(problem, halves, refs, alpha, regularizer, huber, mask, alpha_factor=2.0):
    """Noise2Noise-style voxel score: each half's reconstruction (weight ``alpha_factor`` x alpha: half the data,
    twice the noise per unit volume) against a lightly regularised reconstruction of the other half."""
    err = 0.0
    for f in (0, 1):
        st, pr = zip(*halves[f])
        x = problem.solve(list(st), list(pr), alpha * alpha_factor, regularizer=regularizer, huber=huber)
        d = (x - refs[1 - f])[mask].astype(np.float64)
        err += float(d @ d) / d.size / 2
    return err


def candidate_options(reg, value):
    """SrrOptions of one candidate: ``reg`` at weight ``value``, or for "hybrid" the default hybrid with both
    shares scaled by the factor ``value``."""
    if reg == "hybrid":
        return SrrOptions(**panel.hybrid_scaled(value))
    return SrrOptions(regularizer=reg, alpha=value)


def check_case(case, log=print, in_plane_psf=None, candidates=CANDIDATES):
    prep = panel.PreparedCase(case, check_positions=False, log=log)
    stacks = read_stacks(prep.paths)
    grid = prep.grid
    t = time.perf_counter()
    # the default's profiles (with --in-plane-psf, their in-plane widths too) are kept for every candidate
    res0 = srr.reconstruct_srr(stacks, grid, SrrOptions(in_plane_psf=in_plane_psf))
    s0 = prep.scorer(res0.volume)
    log(f"  default: {s0['psnr_db']:.2f} dB {s0['surface_mean_mm']:.3f} mm ({time.perf_counter() - t:.1f} s); "
        f"profiles {[p.label() for p in res0.profiles]}")
    profiles = res0.profiles
    base = SrrOptions()
    rows = []
    with Workers(None) as workers:
        probe = probe_for(stacks, grid, base, workers)
        prof_blk = [profiles[k] for k in probe.index]
        problem = probe.problem
        halves = split_halves(problem, prof_blk)
        mask = interior_mask(problem)
        refs = []
        for f in (0, 1):
            st, pr = zip(*halves[f])
            refs.append(problem.solve(list(st), list(pr), REF_ALPHA))
        for reg, factor in candidates:
            opts = candidate_options(reg, factor)
            alpha, huber = opts.effective_alpha, srr._huber_args(opts)
            t = time.perf_counter()
            res = srr.reconstruct_srr(stacks, grid, replace(opts, stack_profiles=profiles, self_check=False))
            full_s = time.perf_counter() - t
            sc = prep.scorer(res.volume)
            sl = tuple(slice(o, o + n) for o, n in zip(probe.offset, problem.grid.shape))
            dv = (res.volume[sl] - prep.truth[sl])[mask].astype(np.float64)
            block_rmse = float(np.sqrt(np.mean(dv * dv)))
            t = time.perf_counter()
            slices = np.mean(list(autotune._cv_errors(problem, prof_blk, alpha, folds=2, regularizer=reg,
                                                      huber=huber, starts={}).values()))
            t_sl = time.perf_counter() - t
            t = time.perf_counter()
            loso = np.mean(loso_errors(problem, prof_blk, alpha, reg, huber))
            t_lo = time.perf_counter() - t
            loso_n = np.mean(loso_errors(problem, prof_blk, alpha, reg, huber, alpha_scale=True))
            t = time.perf_counter()
            n2n = n2n_error(problem, halves, refs, alpha, reg, huber, mask)
            t_n2n = time.perf_counter() - t
            n2n1 = n2n_error(problem, halves, refs, alpha, reg, huber, mask, alpha_factor=1.0)
            setting = f"{reg} {'x' if reg == 'hybrid' else ''}{factor:g}"
            row = {"case": case.name, "setting": setting, "psnr_db": sc["psnr_db"],
                   "surface_mm": sc["surface_mean_mm"], "full_s": full_s, "block_rmse_hu": block_rmse,
                   "slices": float(slices) * 1e4, "loso": float(loso) * 1e4, "loso_n": float(loso_n) * 1e4,
                   "n2n": n2n * 1e4, "n2n_a1": n2n1 * 1e4, "n2n_s": t_n2n,
                   "slices_s": t_sl, "loso_s": t_lo}
            rows.append(row)
            log(f"  {row['setting']:<14} truth {row['psnr_db']:6.2f} dB {row['surface_mm']:.3f} mm "
                f"blk {block_rmse:5.1f} HU "
                f"slices {row['slices']:8.3f}  loso {row['loso']:8.3f}  loso_n {row['loso_n']:8.3f}  "
                f"n2n {row['n2n']:8.3f}  n2n_a1 {row['n2n_a1']:8.3f}  "
                f"(full {full_s:.1f} s, slices {t_sl:.1f} s, loso {t_lo:.1f} s, n2n {t_n2n:.1f} s)")
    best = max(r["psnr_db"] for r in rows)
    br = min(rows, key=lambda r: r["block_rmse_hu"])
    log(f"  truth on the block prefers {br['setting']} ({br['psnr_db']:.2f} dB on the whole)")
    for key in ("slices", "loso", "loso_n", "n2n", "n2n_a1"):
        pick = min(rows, key=lambda r: r[key])
        truth_rank = np.argsort(np.argsort([-r["psnr_db"] for r in rows]))
        score_rank = np.argsort(np.argsort([r[key] for r in rows]))
        rho = float(np.corrcoef(truth_rank, score_rank)[0, 1])
        log(f"  score {key:<7}: picks {pick['setting']:<14} {pick['psnr_db']:.2f} dB, regret "
            f"{best - pick['psnr_db']:.2f} dB, Spearman {rho:+.2f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=["P 3mm", "A 3mm", "P 5mm/4"])
    p.add_argument("--in-plane-factor", type=float, default=None,
                   help="experiment: in-plane PSF FWHM / pixel spacing of the model (default: the library's)")
    p.add_argument("--in-plane-psf", default=None,
                   help="the reconstruction's in-plane PSF setting (SrrOptions.in_plane_psf: a factor or auto); the "
                        "widths the default run chose are kept for every candidate and score")
    p.add_argument("--hybrid-factors", type=float, nargs="+",
                   help="candidates: the default hybrid with both shares scaled by these factors (instead of "
                        "Tikhonov / Huber at three weights each)")
    args = p.parse_args(argv)
    candidates = CANDIDATES if not args.hybrid_factors else [("hybrid", f) for f in args.hybrid_factors]
    in_plane = parse_in_plane(args.in_plane_psf)
    if args.in_plane_factor is not None:
        from MultiPlaneFusionLib.sampling import psf

        psf.IN_PLANE_FWHM_FACTOR = args.in_plane_factor
        autotune.IN_PLANE_FWHM_FACTOR = args.in_plane_factor
    out = []
    for case in panel.get_cases(args.cases):
        print(f"== {case.name}", flush=True)
        out.extend(check_case(case, in_plane_psf=in_plane, candidates=candidates))
    suffix = "" if args.in_plane_factor is None else "_inplane" + str(args.in_plane_factor)
    suffix += "" if in_plane is None else f"_inplanepsf_{in_plane}"
    suffix += "" if not args.hybrid_factors else "_hybrid"
    write_json(RESULTS / f"rank_check{suffix}.json", {"rows": out})


if __name__ == "__main__":
    main()
