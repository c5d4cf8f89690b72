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
from vtk.util import numpy_support

from ..progress import CallbackGuard, Monitor
from .mesh import defect_vertices, mesh_facts, points, set_triangles, transform_polydata, triangles

# Relative size of the tie guard (fraction of the value range in the contoured box).
_TIE_EPS = 1e-3

# Constrained iso smoothing (chosen by measurement against truth, see README 'Bone model'). For factor s:
# the windowed sinc's pass band is 10^(-ISO_PASS_BAND_DECADES * s) with Slicer's iterations, a vertex moves
# at most ISO_SHIFT_VOXELS * s of the finest spacing from where flying edges put it, and ends within
# ISO_BAND_VOXELS * s of the volume's isosurface.
ISO_PASS_BAND_DECADES = 2.0
ISO_SHIFT_VOXELS = 0.5
ISO_BAND_VOXELS = 0.2


def smoothing_parameters(smoothing):
    """(pass band, iterations) of Slicer's closed-surface smoothing for factor ``smoothing`` in [0, 1].

    Pass band 10^(-4 s), iterations int(20 + 40 s) (vtkBinaryLabelmapToClosedSurfaceConversionRule);
    s = 0 means no smoothing at all.
    """
    s = float(smoothing)
    return 10.0 ** (-4.0 * s), int(20 + 40 * s)


def iso_smoothing_parameters(smoothing):
    """(pass band, iterations) of the windowed sinc in the constrained smoothing of the ``iso`` method:
    pass band 10^(-2 s) (a sub-voxel isosurface has no stairs to flatten, so a weaker low-pass than
    Slicer's 10^(-4 s)), Slicer's iterations int(20 + 40 s)."""
    s = float(smoothing)
    return 10.0 ** (-ISO_PASS_BAND_DECADES * s), int(20 + 40 * s)


def _observe(algorithm, monitor, *, stage, start, stop):
    """Forward a VTK filter's progress to ``monitor``; abort the filter when the user cancels."""
    # Ctrl-C or a cancel inside the observer aborts the filter and is raised again after Update.
    guard = CallbackGuard(lambda: algorithm.SetAbortExecute(1))

    def on_progress(obj, _event):
        guard.call(monitor.report, stage, start + (stop - start) * obj.GetProgress())

    algorithm.AddObserver(vtk.vtkCommand.ProgressEvent, on_progress)
    return guard


def _run(algorithm, monitor, *, stage, start, stop):
    guard = _observe(algorithm, monitor, stage=stage, start=start, stop=stop)
    algorithm.Update()
    guard.reraise()
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


def _image_view(array, spacing, origin):
    """A vtkImageData sharing the memory of a C-contiguous [k, j, i] array (no copy: keep ``array``
    alive while the image is used). :func:`.mesh.image_to_vtk` is the copying variant."""
    img = vtk.vtkImageData()
    img.SetDimensions(int(array.shape[2]), int(array.shape[1]), int(array.shape[0]))
    img.SetSpacing(*[float(s) for s in spacing])
    img.SetOrigin(*[float(o) for o in origin])
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.reshape(-1), deep=False))
    return img


def _scaled_origin(box, spacing):
    """Scaled-index coordinates (mm) of the first voxel of the padded box."""
    return [float((box[2 - a].start - 1) * spacing[a]) for a in range(3)]


def contour_iso(values, mask, box, spacing, *, lo, hi, vmin, monitor=None, keep_field=False):
    """Unsmoothed isosurface of the masked grey levels, in scaled index space (mm).

    ``values`` is the FULL [k, j, i] volume, ``mask`` the cleaned mask inside ``box``; the box is
    padded by one voxel of a value below the threshold (the one :func:`metrics.iso_surface` uses,
    ``min(vmin, lo) - 1``), so a surface cut by the field of view is capped and closed. With
    ``keep_field`` the contoured field comes back too, as a :class:`SampledField` (for
    :func:`constrain_to_isosurface`): ``(polydata, field)``.
    """
    monitor = Monitor.wrap(monitor)
    crop = values[box]
    span = float(np.nanmax(crop)) - float(np.nanmin(crop))
    eps = _TIE_EPS * span if span > 0 else 1e-6
    pad = -max(max(float(lo) - float(vmin), 0.0) + 1.0, eps)
    field = _padded(crop.shape, pad, np.float32)
    grey_field(crop, mask, lo, hi, eps, out=field[1:-1, 1:-1, 1:-1])
    img = _image_view(field, spacing, _scaled_origin(box, spacing))
    fe = vtk.vtkFlyingEdges3D()
    fe.SetInputData(img)
    fe.SetValue(0, 0.0)
    fe.ComputeNormalsOff()
    fe.ComputeGradientsOff()
    fe.ComputeScalarsOff()
    fe.InterpolateAttributesOff()
    out = _run(fe, monitor, stage="surface", start=0.0, stop=0.3)
    del fe, img  # the image shares the field's memory
    if keep_field:
        return out, SampledField(field, np.asarray(_scaled_origin(box, spacing)), np.asarray(spacing, float))
    return out


def contour_labelmap(mask, box, spacing, monitor=None):
    """Slicer's labelmap surface (discrete flying edges on the padded binary mask), scaled index space."""
    monitor = Monitor.wrap(monitor)
    lab = _padded(mask.shape, 0, np.uint8)
    lab[1:-1, 1:-1, 1:-1] = mask
    img = _image_view(lab, spacing, _scaled_origin(box, spacing))
    fe = vtk.vtkDiscreteFlyingEdges3D()
    fe.SetInputData(img)
    fe.SetValue(0, 1)
    fe.ComputeNormalsOff()
    fe.ComputeGradientsOff()
    fe.ComputeScalarsOff()
    out = _run(fe, monitor, stage="surface", start=0.0, stop=0.3)
    del fe, img, lab
    return out


def smooth(poly, smoothing, monitor=None, start=0.3, stop=0.85, pass_band=None, iterations=None):
    """Windowed-sinc smoothing with Slicer's parameters for factor ``smoothing`` (0 returns ``poly``).

    Boundary and feature-edge smoothing off, non-manifold smoothing on, coordinates normalised (as in
    Slicer's conversion rule). Volume-preserving in practice: the windowed sinc is a low-pass filter
    without the shrinkage of Laplacian smoothing; the caller reports the change.
    """
    monitor = Monitor.wrap(monitor)
    if smoothing <= 0 or poly.GetNumberOfCells() == 0:
        return poly
    pb, it = smoothing_parameters(smoothing)
    pass_band = pb if pass_band is None else pass_band
    iterations = it if iterations is None else iterations
    ws = vtk.vtkWindowedSincPolyDataFilter()
    ws.SetInputData(poly)
    ws.SetNumberOfIterations(iterations)
    ws.SetPassBand(pass_band)
    ws.BoundarySmoothingOff()
    ws.FeatureEdgeSmoothingOff()
    ws.NonManifoldSmoothingOn()
    ws.NormalizeCoordinatesOn()
    return _run(ws, monitor, stage="surface", start=start, stop=stop)


class SampledField:
    """A [k, j, i] float32 field on a regular grid in scaled index space, sampled trilinearly.

    ``origin`` and ``spacing`` (mm, x y z = i j k) place sample ``[k, j, i]`` at
    ``origin + (i, j, k) * spacing``. Points outside the grid are clamped to its border cells.
    """

    def __init__(self, array, origin, spacing):
        self.array = array
        self.origin = np.asarray(origin, dtype=float)
        self.spacing = np.asarray(spacing, dtype=float)

    def sample(self, pts, chunk=1_000_000):
        """Value and gradient (per mm) of the trilinear interpolant at ``pts`` (n, 3) in mm.

        The gradient is the trilinear cell's own (exact inside a cell, continuous in value across
        cells); returns ``(values (n,), gradients (n, 3))``.
        """
        a = self.array
        n = len(pts)
        values = np.empty(n)
        grads = np.empty((n, 3))
        hi = np.array([a.shape[2] - 2, a.shape[1] - 2, a.shape[0] - 2])
        for s in range(0, n, chunk):
            u = (np.asarray(pts[s:s + chunk], dtype=float) - self.origin) / self.spacing
            c = np.clip(np.floor(u).astype(np.int64), 0, hi)
            f = np.clip(u - c, 0.0, 1.0)
            i, j, k = c[:, 0], c[:, 1], c[:, 2]
            fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
            c000, c100 = a[k, j, i], a[k, j, i + 1]
            c010, c110 = a[k, j + 1, i], a[k, j + 1, i + 1]
            c001, c101 = a[k + 1, j, i], a[k + 1, j, i + 1]
            c011, c111 = a[k + 1, j + 1, i], a[k + 1, j + 1, i + 1]
            # along x first, then y, then z
            x00, x10 = c000 + fx * (c100 - c000), c010 + fx * (c110 - c010)
            x01, x11 = c001 + fx * (c101 - c001), c011 + fx * (c111 - c011)
            y0, y1 = x00 + fy * (x10 - x00), x01 + fy * (x11 - x01)
            values[s:s + chunk] = y0 + fz * (y1 - y0)
            dx0 = (c100 - c000) + fy * ((c110 - c010) - (c100 - c000))
            dx1 = (c101 - c001) + fy * ((c111 - c011) - (c101 - c001))
            grads[s:s + chunk, 0] = (dx0 + fz * (dx1 - dx0)) / self.spacing[0]
            grads[s:s + chunk, 1] = ((x10 - x00) + fz * ((x11 - x01) - (x10 - x00))) / self.spacing[1]
            grads[s:s + chunk, 2] = (y1 - y0) / self.spacing[2]
        return values, grads


def constrain_to_isosurface(pts, field, band_mm, max_step_mm, steps=4):
    """Bring vertices back to within ``band_mm`` of the zero level of ``field`` (in place; returns pts).

    Each step estimates a vertex's signed distance to the level set as d = g / |grad g| (trilinear
    value and gradient; positive inside) and moves it along the gradient by the part of d beyond the
    band, at most ``max_step_mm`` per step. Vertices already inside the band do not move, so the
    smoothing keeps every change smaller than the band and the surface stays where the volume puts
    it; thin walls keep their two sides (each vertex is pulled to its own side's level set, and one
    step moves less than half a voxel).
    """
    for _ in range(steps):
        g, grad = field.sample(pts)
        norm = np.linalg.norm(grad, axis=1)
        ok = norm > 1e-12
        d = np.zeros(len(pts))
        d[ok] = g[ok] / norm[ok]
        excess = np.clip(d - np.clip(d, -band_mm, band_mm), -max_step_mm, max_step_mm)
        move = np.flatnonzero(ok & (excess != 0))
        if len(move) == 0:
            break
        pts[move] -= (excess[move] / norm[move])[:, None] * grad[move]
    return pts


def smooth_iso(poly, field, *, smoothing, spacing, monitor=None, start=0.3, stop=0.85, pass_band=None,
               iterations=None, shift_voxels=None, band_voxels=None):
    """Constrained smoothing of an isosurface: windowed sinc, then back to within a band of the level set.

    Parameters
    ----------
    poly : vtkPolyData
        The unsmoothed isosurface of ``field`` (scaled index space, mm).
    field : SampledField
        The contoured field (:func:`contour_iso` with ``keep_field``).
    smoothing : float in [0, 1]
        Factor s: the windowed sinc of :func:`iso_smoothing_parameters`, vertices moved at most
        ``iso_shift_mm(s, spacing)`` and kept within ``iso_band_mm(s, spacing)`` of the isosurface.
        0 returns ``poly``.
    spacing : (3,) float
        Voxel spacing in mm.
    pass_band, iterations, shift_voxels, band_voxels : optional
        Override the windowed sinc's parameters, ``ISO_SHIFT_VOXELS`` and ``ISO_BAND_VOXELS`` (for
        measuring alternatives).

    Returns
    -------
    vtkPolyData
        Same vertices (ids and count) and triangles, moved.
    """
    if smoothing <= 0 or poly.GetNumberOfCells() == 0:
        return poly
    pb, it = iso_smoothing_parameters(smoothing)
    out = smooth(poly, smoothing, monitor=monitor, start=start, stop=start + 0.8 * (stop - start),
                 pass_band=pb if pass_band is None else pass_band, iterations=it if iterations is None else iterations)
    pts = points(out).astype(float, copy=True)
    # Tangential drift is limited too: at a rim (the edge of a hole, of a thin wall cut by the
    # threshold) it would widen the hole.
    x0 = points(poly)
    shift = pts - x0
    length = np.linalg.norm(shift, axis=1)
    r = iso_shift_mm(smoothing, spacing, shift_voxels)
    far = length > r
    pts[far] = x0[far] + shift[far] * (r / length[far])[:, None]
    del x0, shift, length
    band = iso_band_mm(smoothing, spacing, band_voxels)
    constrain_to_isosurface(pts, field, band, 0.25 * float(min(spacing)))
    res = vtk.vtkPolyData()
    res.ShallowCopy(out)
    vp = vtk.vtkPoints()
    vp.SetData(numpy_support.numpy_to_vtk(pts, deep=True))
    res.SetPoints(vp)
    Monitor.wrap(monitor).report("surface", stop)
    return res


def iso_band_mm(smoothing, spacing, band_voxels=None):
    """Half width (mm) of the band around the isosurface that constrained smoothing may use:
    ``ISO_BAND_VOXELS * s`` of the finest voxel spacing."""
    v = ISO_BAND_VOXELS if band_voxels is None else band_voxels
    return float(v) * float(smoothing) * float(min(spacing))


def iso_shift_mm(smoothing, spacing, shift_voxels=None):
    """Largest move (mm) of a vertex from its flying-edges position in constrained smoothing:
    ``ISO_SHIFT_VOXELS * s`` of the finest voxel spacing."""
    v = ISO_SHIFT_VOXELS if shift_voxels is None else shift_voxels
    return float(v) * float(smoothing) * float(min(spacing))


def _decimate_pro(pts, tris, reduction):
    """vtkDecimatePro on the sub-mesh ``tris`` (ids into ``pts``); returns its triangles as ids into ``pts``.

    Boundary vertices are never deleted (BoundaryVertexDeletionOff), so the boundary a sub-mesh shares
    with the rest of the mesh comes back unchanged and the pieces fit together again exactly. The
    sub-mesh gets only the points it uses (the filter's cost follows its point count).
    """
    used, local = np.unique(tris, return_inverse=True)
    sub = vtk.vtkPolyData()
    sp = vtk.vtkPoints()
    sp.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(pts[used]), deep=True))
    sub.SetPoints(sp)
    set_triangles(sub, local.reshape(-1, 3))
    ids = numpy_support.numpy_to_vtk(np.arange(len(used), dtype=np.int64), deep=True, array_type=vtk.VTK_ID_TYPE)
    ids.SetName("input_id")
    sub.GetPointData().AddArray(ids)
    d = vtk.vtkDecimatePro()
    d.SetInputData(sub)
    d.SetTargetReduction(float(np.clip(reduction, 0.0, 0.99)))
    d.PreserveTopologyOn()
    d.SplittingOff()
    d.BoundaryVertexDeletionOff()
    d.SetFeatureAngle(60.0)
    d.SetMaximumError(vtk.VTK_DOUBLE_MAX)
    d.Update()
    out = d.GetOutput()
    input_id = numpy_support.vtk_to_numpy(out.GetPointData().GetArray("input_id")).astype(np.int64)
    return used[input_id[triangles(out)]]


def _chunks(pts, tris, n_chunks, phase=0.0):
    """Chunk label of every triangle: slabs of equal triangle count along the longest axis.

    ``phase`` in [0, 1) shifts the slab boundaries by that fraction of a slab (a later pass then cuts
    elsewhere, so earlier seams get decimated too).
    """
    if n_chunks <= 1:
        return np.zeros(len(tris), dtype=np.int64)
    c = pts[tris].mean(axis=1)
    axis = int(np.argmax(np.ptp(c, axis=0)))
    q = (np.arange(1, n_chunks) - phase) / n_chunks
    return np.searchsorted(np.quantile(c[:, axis], q), c[:, axis]).astype(np.int64)


def _decimate_pass(poly, reduction, *, n_chunks, phase, max_rounds, report):
    """One pass by chunks with repair rounds: (triangles as ids of ``poly``, rounds, frozen) or None."""
    pts, tris = points(poly), triangles(poly)
    chunk = _chunks(pts, tris, n_chunks, phase)
    keep_as_is = np.zeros(len(pts), dtype=bool)
    # A spot is protected over a radius of a few edge lengths.
    radius = 4.0 * float(np.median(np.linalg.norm(pts[tris[:, 0]] - pts[tris[:, 1]], axis=1)))
    locator = None
    pieces = [None] * n_chunks
    todo = list(range(n_chunks))
    for rounds in range(1, max_rounds + 1):
        for m, c in enumerate(todo):
            mine = tris[chunk == c]
            frozen = keep_as_is[mine].any(axis=1)
            free = mine[~frozen]
            # Hit this chunk's share of the target with what is free to change.
            r = 1.0 - ((1.0 - reduction) * len(mine) - np.count_nonzero(frozen)) / max(len(free), 1)
            pieces[c] = np.vstack([_decimate_pro(pts, free, r), mine[frozen]]) if len(free) else mine
            report((rounds - 1 + (m + 1) / len(todo)) / max_rounds)
        out = np.vstack(pieces)
        bad = defect_vertices(out, len(pts))
        if len(bad) == 0:
            return out, rounds, int(np.count_nonzero(keep_as_is[tris].all(axis=1)))
        if locator is None:
            locator = vtk.vtkStaticPointLocator()
            locator.SetDataSet(poly)
            locator.BuildLocator()
        found = vtk.vtkIdList()
        for v in bad:
            locator.FindPointsWithinRadius(radius, pts[v].tolist(), found)
            keep_as_is[[found.GetId(i) for i in range(found.GetNumberOfIds())]] = True
        todo = sorted(set(chunk[keep_as_is[tris].any(axis=1)].tolist()))
    return None


def _quadric(poly, reduction):
    q = vtk.vtkQuadricDecimation()
    q.SetInputData(poly)
    q.SetTargetReduction(float(reduction))
    q.VolumePreservationOn()
    q.Update()
    out = vtk.vtkPolyData()
    out.ShallowCopy(q.GetOutput())
    return out


def decimate(poly, spec, monitor=None, start=0.85, stop=0.95, max_rounds=5, chunk_triangles=250_000,
             max_passes=3, tolerance=0.02, quadric_max_triangles=400_000):
    """Reduce the triangle count, keeping the mesh closed and consistently oriented.

    1. Quadric decimation with volume preservation (the best shape per triangle), for meshes of up to
       ``quadric_max_triangles`` (it needs about 0.7 kB per triangle: 1 GB for 1.5 M triangles, and on
       large bone models it nearly always joins some thin sheets). Its result is kept when it is
       closed and consistently oriented, the usual case for smooth shapes and moderate reductions.
    2. Otherwise (larger meshes, or edge collapses that joined two nearly touching sheets of thin
       bone), vtkDecimatePro
       (topology preserved, no splitting: Slicer's decimation) runs on chunks of the mesh (slabs of
       about ``chunk_triangles``) whose shared boundaries it never touches, so the chunks fit together
       again exactly. Where it still makes a non-manifold or open spot, the input triangles within a
       few edge lengths of the spot are kept as they are and only the chunks concerned are decimated
       again (up to ``max_rounds`` rounds). When the kept spots and the seams leave the count above
       the target (by more than ``tolerance``), another pass with shifted seams continues on the
       result (up to ``max_passes``). Closed by construction, but coarser than quadric decimation
       at extreme reductions (thin walls lose volume beyond about 90 % reduction).

    Parameters
    ----------
    spec : None, float in (0, 1) or int
        Fraction of triangles to remove, or the target triangle count.

    Returns
    -------
    (vtkPolyData, dict)
        The mesh and what was done: method, requested, target and achieved reduction (and, for the
        fallback, passes and repair rounds). If the mesh cannot be kept closed, the input comes back
        unchanged with a 'note'.
    """
    monitor = Monitor.wrap(monitor)
    n = poly.GetNumberOfCells()
    info = {"requested": spec, "method": None, "reduction": 0.0}
    if spec is None or n == 0:
        return poly, info
    target = (1.0 - float(spec)) * n if isinstance(spec, float) else float(spec)
    info["target_reduction"] = 1.0 - target / n
    if target >= n:
        return poly, info
    mid = start
    if n <= quadric_max_triangles:
        quadric = _quadric(poly, 1.0 - target / n)
        defects = defect_vertices(triangles(quadric), quadric.GetNumberOfPoints())
        mid = start + 0.3 * (stop - start)
        monitor.report("surface", mid)
        if len(defects) == 0:
            info.update(method="quadric (volume preserving)", reduction=1.0 - quadric.GetNumberOfCells() / n)
            monitor.report("surface", stop)
            return quadric, info
        info["quadric_defect_vertices"] = int(len(defects))
        del quadric
    current, rounds, frozen = poly, [], []
    span = (stop - mid) / max_passes
    for p in range(max_passes):
        m = current.GetNumberOfCells()

        def report(f, base=mid + p * span):
            monitor.report("surface", base + span * min(1.0, f))

        n_chunks = max(1, int(round(m / chunk_triangles)))
        done = _decimate_pass(current, 1.0 - target / m, n_chunks=n_chunks, phase=0.5 * (p % 2),
                              max_rounds=max_rounds, report=report)
        if done is None:
            if p == 0:
                info["note"] = "decimation could not keep the mesh closed; kept every triangle"
                return poly, info
            break
        tris, r, f = done
        result = vtk.vtkPolyData()
        result.SetPoints(current.GetPoints())
        set_triangles(result, tris)
        clean = vtk.vtkCleanPolyData()  # drop the points no triangle uses any more
        clean.SetInputData(result)
        clean.PointMergingOff()
        clean.Update()
        current = vtk.vtkPolyData()
        current.ShallowCopy(clean.GetOutput())
        rounds.append(r)
        frozen.append(f)
        left = current.GetNumberOfCells()
        if left <= target * (1.0 + tolerance) or m - left < 0.01 * m:
            break
    info.update(
        method="decimate pro by chunks (topology preserved)",
        reduction=1.0 - current.GetNumberOfCells() / n,
        passes=len(rounds),
        repair_rounds=rounds,
        triangles_kept_full_resolution=frozen,
    )
    monitor.report("surface", stop)
    return current, info


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
        The oriented mesh and its :func:`~.mesh.mesh_facts`.
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
