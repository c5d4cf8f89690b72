"""Does the series' in-plane kernel (relative to the truth) set the best prior weight? Every simulated panel case
with its series simulated without an in-plane kernel and with a CT-like Gaussian kernel of 1.2 pixels FWHM, each
fused at the default hybrid's shares x0.3 / x1 / x3.

The panel's Philips series carry no kernel relative to their truth (a scan, which has its own); the phantom's
series carry 1.2 pixels relative to theirs (the analytic object, ``simulation.acquisition``). The model assumes
an in-plane FWHM of 0.9 pixel for every series (``sampling.psf.IN_PLANE_FWHM_FACTOR``). Here each case is run both
ways: the phantom without its kernel (monkeypatched), the Philips series blurred in-plane before the noise.

    python benchmarks/series_kernel.py [--cases "P " "A "] [--kernels 0 1.2]
"""

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import panel
from common import RESULTS, machine, print_table, write_json

from MultiPlaneFusionLib.simulation import acquisition

FACTORS = {"x0.3": {"alpha": 0.015, "huber_alpha": 0.06}, "x1": {}, "x3": {"alpha": 0.15, "huber_alpha": 0.6}}


def simulated_stacks(case, kernel_px):
    """The case's three series with an in-plane Gaussian kernel of ``kernel_px`` FWHM (0: none)."""
    if case.truth == "phantom":
        old = acquisition._KERNEL_FWHM_PX
        acquisition._KERNEL_FWHM_PX = kernel_px if kernel_px > 0 else 1e-3  # 1e-3: taps (0, 1, 0)
        try:
            return panel.simulate_case_stacks(case)
        finally:
            acquisition._KERNEL_FWHM_PX = old
    clean = panel.simulate_case_stacks(dataclasses.replace(case, noise_hu=0.0))
    out = []
    for n, s in enumerate(clean):
        px = s.pixels.copy()
        if kernel_px > 0:
            taps = acquisition._gaussian_taps(kernel_px)
            for k in range(px.shape[0]):
                px[k] = acquisition._blur_slice(px[k], taps)
        rng = np.random.default_rng(case.seed * 10 + n)  # the panel's noise draws
        px += np.float32(case.noise_hu) * rng.standard_normal(px.shape, dtype=np.float32)
        out.append(dataclasses.replace(s, pixels=px))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["P ", "A "])
    ap.add_argument("--kernels", nargs="*", type=float, default=[0.0, 1.2])
    ap.add_argument("--json", default=str(RESULTS / "series_kernel.json"))
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    for case in panel.get_cases(args.cases):
        if not case.simulated:
            continue
        vol, grid = panel.truth_for(case)
        scorer = panel.Scorer(vol, grid, panel.object_threshold(case), region=panel.scored_region(case))
        for kernel in args.kernels:
            panel_kernel = 1.2 if case.truth == "phantom" else 0.0
            row = {"case": case.name, "kernel_px": kernel, "as_panel": kernel == panel_kernel}
            with tempfile.TemporaryDirectory(prefix="mpf-series-kernel-") as root:
                paths = panel.write_case_series(simulated_stacks(case, kernel), root, case.fmt)
                for label, overrides in FACTORS.items():
                    v, _, _ = panel.run_fusion(paths, grid, overrides, False)
                    sc = scorer(v)
                    row[f"{label} dB"], row[f"{label} mm"] = sc["psnr_db"], sc["surface_mean_mm"]
            row["best"] = max(FACTORS, key=lambda f: row[f"{f} dB"])
            rows.append(row)
            print(row, flush=True)
    cols = [("case", "case", ""), ("kernel_px", "series kernel px", "g"), ("as_panel", "as on the panel", "")]
    for f in FACTORS:
        cols += [(f"{f} dB", f"{f} dB", ".2f"), (f"{f} mm", f"{f} mm", ".3f")]
    cols.append(("best", "best", ""))
    print_table(f"best prior weight against the series' in-plane kernel, {started}", rows, cols)
    write_json(args.json, {"machine": machine(), "started": started, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
