"""How the fused PSNR depends on the slice profile's width: every series of a panel case fused with one fixed
profile (the case's family) at each width factor of the ladder (``sampling.psf.WIDTH_FACTORS`` and 1.2).

For NRRD cases the nominal thickness is the slice step (no thickness tag), so the truth is thickness / step
(x1.2 on the 3 mm / 2.5 mm case); for DICOM cases it is x1.0.

    python benchmarks/profile_width.py [--cases "P 3mm" "P 4mm" ...]
"""

import argparse
import time

import panel
from common import RESULTS, machine, print_table, write_json

from MultiPlaneFusionLib.sampling.psf import SliceProfile

FACTORS = (0.8, 0.9, 1.0, 1.1, 1.2, 1.25)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["P 3mm", "P 4mm", "P 5mm/4", "A 3mm"])
    ap.add_argument("--json", default=str(RESULTS / "profile_width.json"))
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    for case in panel.get_cases(args.cases):
        prep = panel.PreparedCase(case, check_positions=False, log=lambda *a: None)
        true_factor = case.thickness_mm / (case.step_mm if case.fmt == "nrrd" else case.thickness_mm)
        for f in FACTORS:
            profiles = (SliceProfile(case.profile, f),) * 3
            v, t, _ = panel.run_fusion(prep.paths, prep.grid, {"stack_profiles": profiles}, case.register)
            rows.append({"case": case.name, "profile": f"{case.profile} x{f:g}", "true_factor": true_factor,
                         "seconds": t, **prep.scorer(v)})
            print(rows[-1], flush=True)
    print_table(f"fused PSNR against the profile width, {started}", rows,
                [("case", "case", ""), ("profile", "profile", ""), ("true_factor", "true x", ".2f"),
                 ("psnr_db", "PSNR dB", ".2f"), ("surface_mean_mm", "surf mean mm", ".3f"),
                 ("seconds", "time s", ".1f")])
    write_json(args.json, {"machine": machine(), "started": started, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
