"""Triangle meshes in memory: arrays in and out of vtkPolyData, topology (edges, defects, components),
volume and area, normals, the mesh report, and the last geometric touch before a file is written.

Meshes are LPS millimetres; :mod:`.meshio` writes and reads them.
"""

import logging

import numpy as np
import vtk
from vtk.util import numpy_support

LOGGER = logging.getLogger("MultiPlaneFusionLib")


# ------------------------------------------------------------------------------------------ arrays
def triangles(poly):
    """Triangle vertex ids of a vtkPolyData, int64 array of shape (n, 3).

    Raises ValueError when the polys are not all triangles (run vtkTriangleFilter first).
    """
    cells = poly.GetPolys()
    n = cells.GetNumberOfCells()
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    offsets = numpy_support.vtk_to_numpy(cells.GetOffsetsArray())
    if not np.all(np.diff(offsets) == 3):
        raise ValueError("mesh has non-triangle polygons")
    return numpy_support.vtk_to_numpy(cells.GetConnectivityArray()).astype(np.int64).reshape(-1, 3)


def points(poly):
    """Vertex coordinates, float64 array of shape (n, 3) (zero rows for an empty mesh)."""
    if poly.GetNumberOfPoints() == 0:
        return np.zeros((0, 3))
    return numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)


def set_triangles(poly, tris):
    """Replace the polys of ``poly`` (in place) by the triangles of an (n, 3) id array."""
    tris = np.ascontiguousarray(tris, dtype=np.int64)
    cells = vtk.vtkCellArray()
    offsets = numpy_support.numpy_to_vtk(np.arange(0, 3 * len(tris) + 1, 3, dtype=np.int64), deep=True)
    conn = numpy_support.numpy_to_vtk(tris.ravel(), deep=True)
    cells.SetData(offsets, conn)
    poly.SetPolys(cells)
    return poly


def volume_and_area(pts, tris, with_area=True, chunk=500_000):
    """(signed enclosed volume in mm^3, total area in mm^2 or None) of a triangle mesh.

    The volume (divergence theorem) is positive when a closed mesh's triangles wind counter-clockwise
    seen from outside. Coordinates are centred first: far from the origin the large, cancelling terms
    would lose digits. Works through ``chunk`` triangles at a time to bound the temporaries.
    """
    if len(tris) == 0:
        return 0.0, (0.0 if with_area else None)
    p = pts - pts.mean(axis=0)
    x, y, z = (np.ascontiguousarray(p[:, d]) for d in range(3))
    del p
    volume, area = 0.0, 0.0
    for s in range(0, len(tris), chunk):
        t = tris[s : s + chunk]
        i, j, k = t[:, 0], t[:, 1], t[:, 2]
        xa, ya, za = x[i], y[i], z[i]
        xb, yb, zb = x[j], y[j], z[j]
        xc, yc, zc = x[k], y[k], z[k]
        volume += float(np.sum(xa * (yb * zc - zb * yc) + ya * (zb * xc - xb * zc) + za * (xb * yc - yb * xc)))
        if with_area:
            # Edge vectors from corner a, reusing the gathered coordinates.
            ux, uy, uz = xb - xa, yb - ya, zb - za
            vx, vy, vz = xc - xa, yc - ya, zc - za
            cx, cy, cz = uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx
            area += 0.5 * float(np.sum(np.sqrt(cx * cx + cy * cy + cz * cz)))
    return volume / 6.0, (area if with_area else None)


def signed_volume_mm3(pts, tris):
    """Signed enclosed volume; positive when a closed mesh's normals point out."""
    return volume_and_area(pts, tris, with_area=False)[0]


def _edge_groups(tris, n_points):
    """Sorted edge codes (undirected edge * 2 + direction bit), group starts and group sizes."""
    a = tris.ravel()
    b = np.roll(tris, -1, axis=1).ravel()
    n = np.int64(max(n_points, 1))
    codes = np.minimum(a, b)
    codes *= n
    codes += np.maximum(a, b)
    codes *= 2
    codes += a > b
    del b
    codes.sort()
    edge = codes >> 1
    starts = np.flatnonzero(np.concatenate(([True], edge[1:] != edge[:-1])))
    del edge
    counts = np.diff(np.append(starts, len(codes)))
    return codes, starts, counts


def edge_counts(tris, n_points):
    """(boundary_edges, non_manifold_edges, consistently_oriented) of a triangle mesh.

    An edge used by one triangle is a boundary edge, by more than two a non-manifold edge. A mesh is
    consistently oriented when no directed edge is used twice (neighbours traverse their shared edge
    in opposite directions). One sort of the edges, each coded as (undirected edge, direction bit).
    """
    if len(tris) == 0:
        return 0, 0, True
    codes, _, counts = _edge_groups(tris, n_points)
    consistent = not bool(np.any(codes[1:] == codes[:-1]))
    return int(np.count_nonzero(counts == 1)), int(np.count_nonzero(counts > 2)), consistent


def defect_vertices(tris, n_points):
    """Ids of the vertices on a boundary, non-manifold or inconsistently oriented edge (sorted)."""
    if len(tris) == 0:
        return np.zeros(0, dtype=np.int64)
    codes, starts, counts = _edge_groups(tris, n_points)
    bad = codes[starts[counts != 2]] >> 1
    twice = codes[1:][codes[1:] == codes[:-1]] >> 1
    edges = np.concatenate([bad, twice])
    n = np.int64(max(n_points, 1))
    return np.unique(np.concatenate([edges // n, edges % n]))


def staircase_fraction(polydata, axes=None, tolerance_deg=5.0):
    """Fraction of the surface area whose normal lies within ``tolerance_deg`` of an axis (either sign).

    A staircase (terraces and risers from thick slices or voxel faces) makes the normals cluster on
    the acquisition axes; a smooth anatomical surface spreads them. Compare a model with the ground
    truth's model: the excess is the staircase.

    Parameters
    ----------
    polydata : vtkPolyData
        Triangle mesh.
    axes : array_like, shape (3,) or (n, 3), optional
        Unit directions (rows), e.g. a stack's slice normal, or its row, column and normal; default
        the three LPS axes.
    tolerance_deg : float
        Angle, degrees.
    """
    tris = triangles(polydata)
    if len(tris) == 0:
        return 0.0
    pts = points(polydata)
    a = pts[tris[:, 0]]
    cross = np.cross(pts[tris[:, 1]] - a, pts[tris[:, 2]] - a)
    double_area = np.linalg.norm(cross, axis=1)
    ok = double_area > 0
    normals = cross[ok] / double_area[ok, None]
    ax = np.eye(3) if axes is None else np.atleast_2d(np.asarray(axes, dtype=float))
    ax = ax / np.linalg.norm(ax, axis=1, keepdims=True)
    aligned = np.max(np.abs(normals @ ax.T), axis=1) >= np.cos(np.radians(tolerance_deg))
    return float(double_area[ok][aligned].sum() / double_area.sum())


def count_components(poly):
    """Number of connected pieces of a mesh (sharing vertices)."""
    if poly.GetNumberOfCells() == 0:
        return 0
    f = vtk.vtkPolyDataConnectivityFilter()
    f.SetInputData(poly)
    f.SetExtractionModeToAllRegions()
    f.Update()
    return int(f.GetNumberOfExtractedRegions())


def mesh_facts(polydata):
    """The geometric and topological facts of :func:`mesh_report` that need a pass over the edges.

    Returns
    -------
    dict
        boundary_edges, non_manifold_edges, consistently_oriented, signed_volume_mm3, area_mm2,
        triangles, vertices.
    """
    tris = triangles(polydata)
    pts = points(polydata)
    boundary, non_manifold, consistent = edge_counts(tris, len(pts))
    volume, area = volume_and_area(pts, tris)
    return {
        "triangles": int(len(tris)),
        "vertices": int(len(pts)),
        "boundary_edges": boundary,
        "non_manifold_edges": non_manifold,
        "consistently_oriented": consistent,
        "signed_volume_mm3": volume,
        "area_mm2": area,
    }


def mesh_report(polydata, facts=None):
    """Facts about a triangle mesh, for the log and ``--json``.

    Parameters
    ----------
    polydata : vtkPolyData
        Triangle mesh (mm).
    facts : dict, optional
        :func:`mesh_facts` of the same geometry, when the caller already has them.

    Returns
    -------
    dict
        triangles, vertices, closed (no boundary and no non-manifold edge), boundary_edges,
        non_manifold_edges, consistently_oriented, outward (consistent and positive enclosed volume),
        components, volume_mm3 (enclosed volume; meaningful when closed), area_mm2.
    """
    f = mesh_facts(polydata) if facts is None else facts
    volume = f["signed_volume_mm3"]
    return {
        "triangles": f["triangles"],
        "vertices": f["vertices"],
        "closed": bool(f["triangles"] > 0 and f["boundary_edges"] == 0 and f["non_manifold_edges"] == 0),
        "boundary_edges": f["boundary_edges"],
        "non_manifold_edges": f["non_manifold_edges"],
        "consistently_oriented": f["consistently_oriented"],
        "outward": bool(f["consistently_oriented"] and volume > 0),
        "components": count_components(polydata),
        "volume_mm3": abs(volume),
        "area_mm2": f["area_mm2"],
    }


def add_normals(poly):
    """Point normals from the triangles' own (outward) winding; no splitting, so vertices stay shared."""
    f = vtk.vtkPolyDataNormals()
    f.SetInputData(poly)
    f.SplittingOff()
    f.ConsistencyOff()
    f.AutoOrientNormalsOff()
    f.ComputePointNormalsOn()
    f.ComputeCellNormalsOff()
    f.Update()
    out = vtk.vtkPolyData()
    out.ShallowCopy(f.GetOutput())
    return out


# Distance coincident vertices are pushed apart before writing (mm): far above float32 resolution at a
# few hundred mm (~3e-5 mm), far below anything a printer or a viewer resolves.
_SEPARATION_MM = 1e-3


def coincident_float32_vertices(pts):
    """How many vertices share their float32 position with an earlier one (what STL readers weld)."""
    pts = np.asarray(pts)
    return int(len(pts) - len(np.unique(pts.astype(np.float32), axis=0))) if len(pts) else 0


def separate_coincident_vertices(poly, step_mm=_SEPARATION_MM):
    """A copy of ``poly`` in which distinct vertices that share a float32 position are moved apart.

    Where a thin wall pinches shut, smoothing can bring two sheets of a closed surface onto the very same
    point with different vertex ids: the mesh is manifold in memory, but STL (no shared vertices) and
    readers that weld by position merge those vertices into a non-manifold one. Each extra vertex of such
    a group is moved along its own normal (the sheets' normals point apart) by ``step_mm`` per rank in its
    group. The input itself is returned when nothing coincides.
    """
    pts = points(poly)
    if len(pts) < 2:
        return poly
    out = None
    for attempt in range(1, 4):
        p32 = pts.astype(np.float32)
        _, first, inverse, counts = np.unique(p32, axis=0, return_index=True, return_inverse=True,
                                              return_counts=True)
        inverse = inverse.ravel()
        extra = np.nonzero(counts[inverse] > 1)[0]
        extra = extra[first[inverse[extra]] != extra]  # keep the first vertex of each group in place
        if len(extra) == 0:
            break
        if out is None:
            out = add_normals(shallow_copy(poly))
            normals = numpy_support.vtk_to_numpy(out.GetPointData().GetNormals()).astype(np.float64)
            normals[~np.isfinite(normals).all(axis=1)] = 0.0
        # rank within the group: 1, 2, ... so that three or more vertices end at different places
        order = np.argsort(inverse[extra], kind="stable")
        ranks = np.empty(len(extra))
        groups = inverse[extra][order]
        starts = np.r_[0, np.nonzero(np.diff(groups))[0] + 1]
        ranks[order] = np.arange(len(extra)) - np.repeat(starts, np.diff(np.r_[starts, len(extra)])) + 1
        dirs = normals[extra].copy()
        # A vertex squashed flat by smoothing can have no normal (its faces have no area): move it opposite
        # the normal of the vertex kept in place (the other sheet), or along x when that has none either.
        flat = np.linalg.norm(dirs, axis=1) < 0.5
        if flat.any():
            kept = normals[first[inverse[extra[flat]]]]
            kept[np.linalg.norm(kept, axis=1) < 0.5] = (-1.0, 0.0, 0.0)
            dirs[flat] = -kept
        pts[extra] += dirs * (step_mm * attempt * ranks)[:, None]
    if out is None:
        return poly
    if coincident_float32_vertices(pts):
        LOGGER.warning("model: some vertices still share a float32 position after separating them; "
                       "an STL reader may weld them into a non-manifold vertex")
    out.GetPoints().SetData(numpy_support.numpy_to_vtk(pts, deep=True))
    return out


def shallow_copy(poly):
    out = vtk.vtkPolyData()
    out.ShallowCopy(poly)
    # Field data is shared by a shallow copy; give the copy its own so tags added for a file stay there.
    out.SetFieldData(vtk.vtkFieldData())
    return out


def transform_polydata(poly, matrix3, offset):
    """Apply p -> matrix3 @ p + offset to the points of a vtkPolyData (returns a new one)."""
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, float(matrix3[r][c]))
        m.SetElement(r, 3, float(offset[r]))
    t = vtk.vtkTransform()
    t.SetMatrix(m)
    f = vtk.vtkTransformFilter()  # vtkTransformPolyDataFilter is deprecated from VTK 9.7
    f.SetInputData(poly)
    f.SetTransform(t)
    f.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(f.GetOutput())
    return out


def image_to_vtk(volume, spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0)):
    """A vtkImageData (axis-aligned) holding a [k, j, i] numpy volume."""
    v = np.ascontiguousarray(volume)
    img = vtk.vtkImageData()
    img.SetDimensions(int(v.shape[2]), int(v.shape[1]), int(v.shape[0]))
    img.SetSpacing(*[float(s) for s in spacing_mm])
    img.SetOrigin(*[float(o) for o in origin_mm])
    arr = numpy_support.numpy_to_vtk(v.ravel(), deep=True)
    arr.SetName("values")
    img.GetPointData().SetScalars(arr)
    return img
