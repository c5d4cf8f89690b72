"""The real Philips series' slice profiles, measured against the real 1 mm series (a diagnostic).

Each thick series is registered to the 1 mm series, which is then pushed through the forward model of that
series with every candidate profile (box / Gaussian, width factors around the nominal thickness); the
profile whose prediction fits the series best (least squares after a gain and offset, inside the phantom)
is the one its scanner used, up to the 1 mm series' own slice profile (about 0.18 mm^2 of variance, which
makes every fitted width slightly narrow). This needs a truth, so the library cannot do it; it checks what
``sampling.psf.nominal_profile`` assumes where the data alone cannot measure a profile.

    python benchmarks/real_profiles.py
"""

import argparse
import time

import numpy as np
import SimpleITK as sitk
from common import RESULTS, extract_series, machine, print_table, write_json

from MultiPlaneFusionLib.reading import read_grid_source, read_stacks, stack_to_image
from MultiPlaneFusionLib.reconstruction.operators import make_operator
from MultiPlaneFusionLib.registration.rigid import register_stacks
from MultiPlaneFusionLib.sampling.psf import SliceProfile, nominal_profile

SERIES = ("philips_tilt_minus18", "philips_tilt_plus16", "philips_axial_5mm")
FACTORS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25)


def profile_fit(stack, grid, truth):
    """RMS (HU) of the series' samples against the truth through each candidate profile, and the gain."""
    y = stack.pixels.astype(np.float64)
    rows = []
    for kind in ("box", "gaussian"):
        for f in FACTORS:
            p = SliceProfile(kind, f)
            op = make_operator(p.apply(stack), grid, kind)
            pred = op.forward(truth).astype(np.float64)
            ok = np.asarray(op.valid, bool) & (y > -500) & (pred > -500)
            a = np.stack([pred[ok], np.ones(int(ok.sum()))], 1)
            coef = np.linalg.lstsq(a, y[ok], rcond=None)[0]
            r = y[ok] - a @ coef
            rows.append({"profile": p.label(), "rms_hu": float(np.sqrt(np.mean(r * r))), "gain": float(coef[0])})
    return rows


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    ref_folder = extract_series("philips_axial_1mm")
    stacks = read_stacks([ref_folder] + [extract_series(n) for n in SERIES])
    t = time.perf_counter()
    registered, _ = register_stacks(stacks, reference=0)
    print(f"registered to the 1 mm series in {time.perf_counter() - t:.1f} s")
    grid = read_grid_source(ref_folder)
    truth = sitk.GetArrayFromImage(stack_to_image(stacks[0])).astype(np.float32)
    out = []
    for name, s in zip(SERIES, registered[1:]):
        rows = profile_fit(s, grid, truth)
        best = min(rows, key=lambda r: r["rms_hu"])
        nominal = nominal_profile(s).label()
        print_table(f"{name} ({s.thickness_mm:g} mm, {s.acquisition or 'acquisition unknown'}; best {best['profile']}, "
                    f"nominal {nominal})", rows,
                    [("profile", "profile", ""), ("rms_hu", "RMS HU", ".2f"), ("gain", "gain", ".3f")])
        out.append({"series": name, "acquisition": s.acquisition, "thickness_mm": s.thickness_mm,
                    "best": best["profile"], "nominal": nominal, "rows": rows})
    write_json(RESULTS / "real_profiles.json", {"machine": machine(), "series": out})


if __name__ == "__main__":
    main()
