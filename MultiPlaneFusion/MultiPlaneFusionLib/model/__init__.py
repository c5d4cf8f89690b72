"""The bone model: threshold -> cleaned mask -> closed, smooth surface -> model file.

Typical use::

    from MultiPlaneFusionLib.model import ModelOptions, build_model, write_model
    result = build_model(volume, ModelOptions(threshold=(300.0, 3071.0)))
    write_model(result.polydata, "bone.stl", ras=False)

Meshes in memory are LPS millimetres, closed, with outward normals; ``result.mask`` is the cleaned
mask on the input grid (for Slicer's Segment Editor).
"""

import time
from dataclasses import dataclass, field

import numpy as np

from ..progress import Monitor
from .mesh import add_normals, mesh_report, points, signed_volume_mm3, staircase_fraction, triangles
from .meshio import MODEL_EXTENSIONS, model_format, read_model, write_model
from .options import ModelOptions, add_model_arguments, options_from_args
from .segmentation import full_mask_image, image_array, segment
from .surface import (
    contour_iso,
    contour_labelmap,
    decimate,
    iso_band_mm,
    iso_shift_mm,
    iso_smoothing_parameters,
    orient_outward,
    smooth,
    smooth_iso,
    smoothing_parameters,
    to_patient,
)
from .thresholds import PRESETS, automatic_threshold, otsu_level, resolve_threshold

__all__ = [
    "MODEL_EXTENSIONS",
    "PRESETS",
    "ModelOptions",
    "ModelResult",
    "add_model_arguments",
    "automatic_threshold",
    "build_model",
    "mesh_report",
    "model_format",
    "options_from_args",
    "otsu_level",
    "read_model",
    "resolve_threshold",
    "smoothing_parameters",
    "staircase_fraction",
    "write_model",
]


@dataclass
class ModelResult:
    """What :func:`build_model` returns.

    Attributes
    ----------
    polydata : vtkPolyData
        Closed triangle mesh, LPS mm, outward winding and point normals.
    mask : SimpleITK.Image
        uint8 (0/1) cleaned mask on the input grid.
    threshold : (float, float)
        The range used.
    report : dict
        :func:`mesh_report` plus threshold, its source, method, smoothing, volume change, timings.
    """

    polydata: object
    mask: object
    threshold: tuple
    report: dict = field(default_factory=dict)


def _volume(poly):
    return signed_volume_mm3(points(poly), triangles(poly))


def build_model(image, options=None, *, modality="CT", progress=None, cancel=None):
    """Threshold, clean and surface a volume into a closed, smooth bone model.

    Parameters
    ----------
    image : SimpleITK.Image
        3-D scalar volume in LPS mm (HU for CT); any spacing and direction.
    options : ModelOptions, optional
        Defaults: ``ModelOptions()`` (CT bone preset, the bones of the region, constrained iso surface).
    modality : str
        'CT' allows HU presets; any other modality needs ``options.threshold`` or
        ``options.auto_threshold``.
    progress, cancel
        See :mod:`MultiPlaneFusionLib.progress`; stages "segment" and "surface".

    Returns
    -------
    ModelResult

    Raises
    ------
    InputError
        No threshold for a non-CT volume, nothing within the threshold, nothing left after cleanup.
    CancelledError
        When ``cancel`` fires.
    """
    options = ModelOptions() if options is None else options.validate()
    monitor = Monitor.wrap(progress, cancel)
    timings = {}
    t0 = time.perf_counter()
    values = image_array(image)
    lo, hi, source = resolve_threshold(values, preset=options.preset, threshold=options.threshold,
                                       auto=options.auto_threshold, modality=modality)
    mask, box, seg = segment(
        image,
        lo,
        hi,
        islands=options.islands,
        min_island_mm3=options.min_island_mm3,
        fill_cavities=options.fill_cavities,
        remove_thin_mm=options.remove_thin_mm,
        island_gap_mm=options.island_gap_mm,
        fragment_min_mm3=options.fragment_min_mm3,
        monitor=monitor,
        array=values,
    )
    t1 = time.perf_counter()
    timings["segment_s"] = t1 - t0

    spacing = image.GetSpacing()
    monitor.report("surface", 0.0)
    field = None
    if options.surface_method == "iso":
        vmin = float(np.nanmin(values))
        poly, field = contour_iso(values, mask, box, spacing, lo=lo, hi=hi, vmin=vmin, monitor=monitor,
                                  keep_field=True)
    else:
        poly = contour_labelmap(mask, box, spacing, monitor)
    t2 = time.perf_counter()
    timings["contour_s"] = t2 - t1

    volume_before = _volume(poly)
    before = points(poly).copy()
    if field is not None:
        poly = smooth_iso(poly, field, smoothing=options.smoothing, spacing=spacing, monitor=monitor)
    else:
        poly = smooth(poly, options.smoothing, monitor)
    del field
    # Smoothing moves vertices without adding or removing any: their displacement is the smoothing's
    # effect on the shape (scaled index space is mm, the direction only rotates it).
    moved = np.linalg.norm(points(poly) - before, axis=1) if len(before) else np.zeros(1)
    del before
    volume_after = _volume(poly)
    t3 = time.perf_counter()
    timings["smooth_s"] = t3 - t2

    poly, decimation = decimate(poly, options.decimate, monitor)
    t4 = time.perf_counter()
    timings["decimate_s"] = t4 - t3

    poly = to_patient(poly, image.GetDirection(), image.GetOrigin())
    poly, facts = orient_outward(poly)
    poly = add_normals(poly)
    monitor.report("surface", 0.97)
    mask_image = full_mask_image(mask, box, image)
    t5 = time.perf_counter()
    timings["finish_s"] = t5 - t4

    report = mesh_report(poly, facts)
    timings["report_s"] = time.perf_counter() - t5
    timings["total_s"] = time.perf_counter() - t0
    iso = options.surface_method == "iso"
    pass_band, iterations = (iso_smoothing_parameters if iso else smoothing_parameters)(options.smoothing)
    band = iso_band_mm(options.smoothing, spacing) if iso else None
    shift = iso_shift_mm(options.smoothing, spacing) if iso else None
    change = 100.0 * (abs(volume_after) - abs(volume_before)) / abs(volume_before) if volume_before else 0.0
    report.update(
        threshold=[lo, hi],
        threshold_source=source,
        method=options.surface_method,
        smoothing=options.smoothing,
        smoothing_pass_band=pass_band if options.smoothing > 0 else None,
        smoothing_iterations=iterations if options.smoothing > 0 else 0,
        smoothing_iso_band_mm=band if options.smoothing > 0 else None,
        smoothing_iso_shift_mm=shift if options.smoothing > 0 else None,
        smoothing_volume_change_percent=change,
        smoothing_displacement_mm={"mean": float(moved.mean()), "max": float(moved.max())},
        decimation=decimation,
        mask_voxels=seg["voxels"],
        mask_volume_mm3=seg["volume_mm3"],
        islands={"mode": options.islands, "found": seg["pieces_found"], "kept": seg["pieces_kept"]},
        timings=timings,
    )
    if "pieces_dropped_far" in seg:
        report["islands"].update(gap_mm=options.island_gap_mm, fragment_min_mm3=options.fragment_min_mm3,
                                 dropped_far=seg["pieces_dropped_far"],
                                 dropped_far_mm3=seg["dropped_far_voxels"] * seg["volume_mm3"] / max(seg["voxels"], 1))
    if "cavity_voxels_filled" in seg:
        report["cavity_voxels_filled"] = seg["cavity_voxels_filled"]
    monitor.report("surface", 1.0)
    return ModelResult(polydata=poly, mask=mask_image, threshold=(lo, hi), report=report)
