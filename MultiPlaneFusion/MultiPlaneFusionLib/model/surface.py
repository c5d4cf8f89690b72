"""Closed surfaces from a volume and its cleaned mask: contour, smooth (in mm), decimate, orient.

Frames. Contouring and smoothing run in *scaled index space*: x = (i * si, j * sj, k * sk) in mm, on
a vtkImageData with the physical spacing; the direction matrix and origin are applied at the end,
``p_LPS = origin + D @ x``, which is exact for any orthonormal (or even sheared) direction. Doing it in
mm rather than in voxel units keeps the coordinates normalisation of the smoother and every
length-based decision (decimation error, feature detection) physical on anisotropic grids. The
windowed-sinc filter itself uses uniform (umbrella) weights, which commute with affine maps, so its
result does not depend on this choice; the pass band is what sets its strength.

Iso method. The contoured field is the grey-level distance to the nearest threshold,
``g = min(v - lo, hi - v)``, with its magnitude kept and its sign taken from the cleaned mask:
``g' = +max(|g|, eps)`` inside the mask, ``-max(|g|, eps)`` outside. Where the cleanup kept the
threshold's decision (almost everywhere), the zero crossing of g' is exactly the isosurface of the
grey levels at lo (and at hi, around voxels brighter than hi); where it changed it (islands dropped,
cavities filled, thin structures cut) the surface follows the mask. ``eps`` (1e-3 of the value range
of the box) keeps every voxel off the iso-value: a voxel exactly at the threshold (common with
integer HU) would put several vertices on one point and make degenerate, non-manifold triangles.
"""

import numpy as np
import vtk

from ..metrics import image_to_vtk, transform_polydata
from ..progress import Monitor
from .meshio import edge_counts, mesh_facts, set_triangles, triangles

# Relative size of the tie guard (fraction of the value range in the contoured box).
_TIE_EPS = 1e-3


def smoothing_parameters(smoothing):
    """(pass band, iterations) of Slicer's closed-surface smoothing for factor ``smoothing`` in [0, 1].

    Pass band 10^(-4 s), iterations int(20 + 40 s) (vtkBinaryLabelmapToClosedSurfaceConversionRule);
    s = 0 means no smoothing at all.
    """
    s = float(smoothing)
    return 10.0 ** (-4.0 * s), int(20 + 40 * s)


def _observe(algorithm, monitor, stage, start, stop):
    """Forward a VTK filter's progress to ``monitor``; abort the filter when the user cancels."""
    state = {"cancelled": False}

    def on_progress(obj, _event):
        if monitor.cancelled():
            state["cancelled"] = True
            obj.SetAbortExecute(1)
            return
        monitor.report(stage, start + (stop - start) * obj.GetProgress())

    algorithm.AddObserver(vtk.vtkCommand.ProgressEvent, on_progress)
    return state


def _run(algorithm, monitor, stage, start, stop):
    state = _observe(algorithm, monitor, stage, start, stop)
    algorithm.Update()
    if state["cancelled"]:
        monitor.check()
    monitor.report(stage, stop)
    out = vtk.vtkPolyData()
    out.ShallowCopy(algorithm.GetOutput())
    return out


def grey_field(values, mask, lo, hi, eps, out=None):
    """The signed grey-level field whose zero level is the masked isosurface (see module doc).

    Parameters
    ----------
    values : ndarray float32, shape (nk, nj, ni)
        Intensities in the box.
    mask : ndarray bool, same shape
        The cleaned mask in the box.
    lo, hi : float
        Threshold range.
    eps : float
        Smallest magnitude (tie guard), in the units of ``values``.
    out : ndarray float32, same shape, optional
        Where to write (e.g. the interior of a padded array).
    """
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    np.subtract(values, np.float32(lo), out=out)
    if float(np.nanmax(values)) > hi:  # the upper threshold cuts something: distance to the nearer one
        upper = np.subtract(np.float32(hi), values, dtype=np.float32)
        np.minimum(out, upper, out=out)
        del upper
    np.abs(out, out=out)
    np.fmax(out, np.float32(eps), out=out)  # fmax also replaces NaN by eps
    np.negative(out, out=out, where=~mask)
    return out


def _padded(shape, pad, dtype):
    """An array of ``shape`` + 2 on every axis whose one-voxel border holds ``pad`` (interior unset)."""
    a = np.empty(tuple(n + 2 for n in shape), dtype=dtype)
    a[0], a[-1] = pad, pad
    a[:, 0], a[:, -1] = pad, pad
    a[:, :, 0], a[:, :, -1] = pad, pad
    return a


def _scaled_origin(box, spacing):
    """Scaled-index coordinates (mm) of the first voxel of the padded box."""
    return [float((box[2 - a].start - 1) * spacing[a]) for a in range(3)]


def contour_iso(values, mask, box, spacing, lo, hi, vmin, monitor=None):
    """Unsmoothed isosurface of the masked grey levels, in scaled index space (mm).

    ``values`` is the FULL [k, j, i] volume, ``mask`` the cleaned mask inside ``box``; the box is
    padded by one voxel of a value below the threshold (the one :func:`metrics.iso_surface` uses,
    ``min(vmin, lo) - 1``), so a surface cut by the field of view is capped and closed.
    """
    monitor = Monitor.wrap(monitor)
    crop = values[box]
    span = float(np.nanmax(crop)) - float(np.nanmin(crop))
    eps = _TIE_EPS * span if span > 0 else 1e-6
    pad = -max(max(float(lo) - float(vmin), 0.0) + 1.0, eps)
    field = _padded(crop.shape, pad, np.float32)
    grey_field(crop, mask, lo, hi, eps, out=field[1:-1, 1:-1, 1:-1])
    img = image_to_vtk(field, spacing, _scaled_origin(box, spacing))
    del field
    fe = vtk.vtkFlyingEdges3D()
    fe.SetInputData(img)
    fe.SetValue(0, 0.0)
    fe.ComputeNormalsOff()
    fe.ComputeGradientsOff()
    fe.ComputeScalarsOff()
    fe.InterpolateAttributesOff()
    return _run(fe, monitor, "surface", 0.0, 0.3)


def contour_labelmap(mask, box, spacing, monitor=None):
    """Slicer's labelmap surface (discrete flying edges on the padded binary mask), scaled index space."""
    monitor = Monitor.wrap(monitor)
    lab = _padded(mask.shape, 0, np.uint8)
    lab[1:-1, 1:-1, 1:-1] = mask
    img = image_to_vtk(lab, spacing, _scaled_origin(box, spacing))
    del lab
    fe = vtk.vtkDiscreteFlyingEdges3D()
    fe.SetInputData(img)
    fe.SetValue(0, 1)
    fe.ComputeNormalsOff()
    fe.ComputeGradientsOff()
    fe.ComputeScalarsOff()
    return _run(fe, monitor, "surface", 0.0, 0.3)


def smooth(poly, smoothing, monitor=None, start=0.3, stop=0.85):
    """Windowed-sinc smoothing with Slicer's parameters for factor ``smoothing`` (0 returns ``poly``).

    Boundary and feature-edge smoothing off, non-manifold smoothing on, coordinates normalised (as in
    Slicer's conversion rule). Volume-preserving in practice: the windowed sinc is a low-pass filter
    without the shrinkage of Laplacian smoothing; the caller reports the change.
    """
    monitor = Monitor.wrap(monitor)
    if smoothing <= 0 or poly.GetNumberOfCells() == 0:
        return poly
    pass_band, iterations = smoothing_parameters(smoothing)
    ws = vtk.vtkWindowedSincPolyDataFilter()
    ws.SetInputData(poly)
    ws.SetNumberOfIterations(iterations)
    ws.SetPassBand(pass_band)
    ws.BoundarySmoothingOff()
    ws.FeatureEdgeSmoothingOff()
    ws.NonManifoldSmoothingOn()
    ws.NormalizeCoordinatesOn()
    return _run(ws, monitor, "surface", start, stop)


def _is_closed(poly):
    tris = triangles(poly)
    boundary, non_manifold, _ = edge_counts(tris, poly.GetNumberOfPoints())
    return len(tris) > 0 and boundary == 0 and non_manifold == 0


def decimate(poly, spec, monitor=None, start=0.85, stop=0.95):
    """Reduce the triangle count, keeping the mesh closed.

    Parameters
    ----------
    spec : None, float in (0, 1) or int
        Fraction of triangles to remove, or the target triangle count.

    Returns
    -------
    (vtkPolyData, dict)
        The mesh and what was done: method ('quadric' or 'pro' or None), requested and achieved
        reduction. Quadric decimation (volume-preserving) is tried first; when its result is not
        closed, vtkDecimatePro with topology preservation replaces it; if neither stays closed the
        input is returned unchanged and the report says so.
    """
    monitor = Monitor.wrap(monitor)
    n = poly.GetNumberOfCells()
    info = {"requested": spec, "method": None, "reduction": 0.0}
    if spec is None or n == 0:
        return poly, info
    reduction = float(spec) if isinstance(spec, float) else 1.0 - float(spec) / n
    info["target_reduction"] = reduction
    if reduction <= 0:
        return poly, info
    mid = 0.5 * (start + stop)
    q = vtk.vtkQuadricDecimation()
    q.SetInputData(poly)
    q.SetTargetReduction(reduction)
    q.VolumePreservationOn()
    out = _run(q, monitor, "surface", start, mid)
    method = "quadric"
    if not _is_closed(out):
        p = vtk.vtkDecimatePro()
        p.SetInputData(poly)
        p.SetTargetReduction(reduction)
        p.PreserveTopologyOn()
        p.SplittingOff()
        p.BoundaryVertexDeletionOff()
        p.SetFeatureAngle(60.0)
        p.SetMaximumError(vtk.VTK_DOUBLE_MAX)
        out = _run(p, monitor, "surface", mid, stop)
        method = "pro"
        if not _is_closed(out):
            info["note"] = "decimation could not keep the mesh closed; kept every triangle"
            return poly, info
    info.update(method=method, reduction=1.0 - out.GetNumberOfCells() / n)
    return out, info


def to_patient(poly, direction, origin):
    """Scaled index space -> LPS: p = origin + D @ x (D is the image's direction matrix, columns i, j, k)."""
    return transform_polydata(poly, np.asarray(direction, dtype=float).reshape(3, 3), origin)


def orient_outward(poly):
    """Make a closed mesh's triangles wind counter-clockwise seen from outside (positive volume).

    Marching-cubes output is consistently oriented, so one global test suffices; a mirrored direction
    matrix (determinant -1) is what flips it. An inconsistently oriented mesh is repaired first.

    Returns
    -------
    (vtkPolyData, dict)
        The oriented mesh and its :func:`~.meshio.mesh_facts`.
    """
    facts = mesh_facts(poly)
    if facts["triangles"] == 0:
        return poly, facts
    if not facts["consistently_oriented"]:
        f = vtk.vtkPolyDataNormals()
        f.SetInputData(poly)
        f.ConsistencyOn()
        f.AutoOrientNormalsOn()
        f.SplittingOff()
        f.ComputePointNormalsOff()
        f.Update()
        poly = vtk.vtkPolyData()
        poly.ShallowCopy(f.GetOutput())
        facts = mesh_facts(poly)
    if facts["signed_volume_mm3"] < 0:
        out = vtk.vtkPolyData()
        out.ShallowCopy(poly)
        poly = set_triangles(out, triangles(poly)[:, ::-1])
        facts["signed_volume_mm3"] = -facts["signed_volume_mm3"]
    return poly, facts
