"""Quality metrics shared by tests, benchmarks and users evaluating a fusion against a reference.

Volumes are numpy arrays on the same grid (shape (nk, nj, ni)); surfaces are vtkPolyData in mm.
"""

import numpy as np
import vtk
from vtk.util import numpy_support

from .model.mesh import image_to_vtk, transform_polydata


def psnr(test, reference, mask=None, data_range=None):
    """Peak signal-to-noise ratio in dB of ``test`` against ``reference`` inside ``mask``.

    ``data_range`` defaults to the reference's range inside the mask.
    """
    t = np.asarray(test, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if mask is not None:
        t, r = t[mask], r[mask]
    if data_range is None:
        data_range = float(r.max() - r.min())
    mse = float(np.mean((t - r) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def correlation(a, b, mask=None):
    """Pearson correlation of two volumes inside ``mask``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def dice(a, b):
    """Dice overlap of two boolean masks."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def iso_surface(volume, threshold, grid=None, pad_value=None):
    """The exact (unsmoothed) flying-edges isosurface of a volume at ``threshold``, in LPS mm.

    ``grid`` (a :class:`~MultiPlaneFusionLib.grid.Grid`) places it in patient space; without it the
    surface is in voxel units. The volume is padded by one voxel of ``pad_value`` (default: below the
    threshold) so surfaces cut by the field of view are closed.
    """
    v = np.asarray(volume, dtype=np.float32)
    if pad_value is None:
        pad_value = min(float(v.min()), float(threshold)) - 1.0
    v = np.pad(v, 1, mode="constant", constant_values=pad_value)
    spacing = (1.0, 1.0, 1.0) if grid is None else grid.spacing_mm
    img = image_to_vtk(v, spacing, [-s for s in spacing])
    fe = vtk.vtkFlyingEdges3D()
    fe.SetInputData(img)
    fe.SetValue(0, float(threshold))
    fe.ComputeNormalsOff()
    fe.ComputeGradientsOff()
    fe.Update()
    poly = fe.GetOutput()
    if grid is not None:
        poly = transform_polydata(poly, grid.direction_matrix, grid.origin_mm)
    return poly


def surface_distance(test, reference):
    """Symmetric vertex-to-surface distance between two vtkPolyData surfaces, in mm.

    Unsigned distances from every vertex of each surface to the other surface (exact point-to-triangle,
    vtkDistancePolyDataFilter) are pooled. Returns ``{"mean", "p95", "max", "n"}``; inf when a surface is
    empty.
    """
    if min(test.GetNumberOfCells(), reference.GetNumberOfCells()) == 0:
        return {"mean": float("inf"), "p95": float("inf"), "max": float("inf"), "n": 0}
    f = vtk.vtkDistancePolyDataFilter()
    f.SetInputData(0, test)
    f.SetInputData(1, reference)
    f.SignedDistanceOff()
    f.ComputeSecondDistanceOn()
    f.Update()
    d = np.concatenate(
        [
            numpy_support.vtk_to_numpy(f.GetOutput().GetPointData().GetArray("Distance")),
            numpy_support.vtk_to_numpy(f.GetSecondDistanceOutput().GetPointData().GetArray("Distance")),
        ]
    ).astype(float)
    return {"mean": float(d.mean()), "p95": float(np.percentile(d, 95)), "max": float(d.max()), "n": int(d.size)}
