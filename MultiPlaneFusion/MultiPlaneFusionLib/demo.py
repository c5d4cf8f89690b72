"""`multiplanefusion demo`: simulate a head's three thick-slice series as real DICOM, then run the pipeline.

The series go through the same path as a user's data (DICOM files -> reader -> fusion -> model), so the
demo exercises everything end to end; the phantom's ground truth is saved next to them for comparison.
"""

import logging
import os
import shutil
import time

from .model import ModelOptions
from .pipeline import FuseOptions, run_to_folder
from .progress import Monitor
from .simulation import phantom_truth, simulate_orthogonal_stacks, write_dicom_series
from .writing import make_folder, write_image

log = logging.getLogger("MultiPlaneFusionLib")


def run_demo(outdir, *, thickness_mm=4.0, pixel_spacing_mm=0.8, scale=1.0, seed=0, method="srr", noise_hu=15.0,
             progress=None, cancel=None):
    """Write ``outdir/dicom/{axial,coronal,sagittal}``, ``outdir/truth.nrrd``, then fuse and model.

    Returns the pipeline's :class:`~MultiPlaneFusionLib.pipeline.RunResult`; ``outputs`` also holds
    ``truth`` and the summary's timings ``simulate_s``.
    """
    created = make_folder(outdir)
    try:
        return _run_demo(outdir, thickness_mm=thickness_mm, pixel_spacing_mm=pixel_spacing_mm, scale=scale,
                         seed=seed, method=method, noise_hu=noise_hu, monitor=Monitor.wrap(progress, cancel))
    except BaseException:
        if created:  # a failed or cancelled demo leaves nothing behind
            shutil.rmtree(outdir, ignore_errors=True)
        raise


def _run_demo(outdir, *, thickness_mm, pixel_spacing_mm, scale, seed, method, noise_hu, monitor):
    t = time.perf_counter()
    monitor.report("simulate", 0.0)
    stacks = simulate_orthogonal_stacks(thickness_mm=thickness_mm, pixel_spacing_mm=pixel_spacing_mm, scale=scale,
                                        noise_hu=noise_hu, seed=seed)
    folders = []
    for n, s in enumerate(stacks):
        folder = os.path.join(outdir, "dicom", s.orientation)
        write_dicom_series(s, folder, series_number=n + 1)
        folders.append(folder)
        monitor.report("simulate", (n + 1) / len(stacks))
    simulate_s = time.perf_counter() - t
    log.info("simulated series: %s", ", ".join(folders))
    result = run_to_folder(folders, outdir, fuse_options=FuseOptions(method=method), model_options=ModelOptions(),
                           progress=monitor)
    # Ground truth on the same grid, for a side-by-side look in any viewer.
    grid = result.fusion.grid
    truth_path = os.path.join(outdir, "truth.nrrd")
    write_image(grid.image(phantom_truth(grid, scale=scale)), truth_path)
    result.outputs["truth"] = os.path.abspath(truth_path)
    result.summary["timings_s"]["simulate_s"] = simulate_s
    return result
