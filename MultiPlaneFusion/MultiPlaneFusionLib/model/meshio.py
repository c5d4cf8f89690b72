"""Model files (STL, OBJ, PLY, VTP): writing and reading them (the mesh itself: :mod:`.mesh`).

Meshes in memory are LPS millimetres. ``ras=True`` flips x and y on the way out (and back in), which
keeps the triangle winding (the flip is a rotation by 180 degrees about z), so normals stay outward.
Every file says its coordinate system the way 3D Slicer reads it: ``SPACE=LPS`` / ``SPACE=RAS`` in the
STL header, an OBJ/PLY comment, or a VTP field-data string.
"""

import logging
import os
import shutil
import tempfile

import vtk

from ..errors import InputError, OutputError
from ..writing import atomic_path
from .mesh import (
    add_normals,
    coincident_float32_vertices,
    mesh_report,
    points,
    separate_coincident_vertices,
    shallow_copy,
    transform_polydata,
)

MODEL_EXTENSIONS = (".stl", ".obj", ".ply", ".vtp")
_LPS_TO_RAS = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))

LOGGER = logging.getLogger("MultiPlaneFusionLib")


def model_format(path):
    """'stl', 'obj', 'ply' or 'vtp' from the extension; OutputError otherwise."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in MODEL_EXTENSIONS:
        raise OutputError(
            f"unsupported model format '{ext or os.path.basename(os.fspath(path))}': "
            f"use one of {', '.join(MODEL_EXTENSIONS)}"
        )
    return ext[1:]


def _prepend_line(path, line):
    """Put one text line in front of a file (through a temporary file in the same folder)."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".header.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            out.write(line.encode("ascii") + b"\n")
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write(poly, tmp, fmt, space):
    if fmt == "stl":
        w = vtk.vtkSTLWriter()
        w.SetFileTypeToBinary()
        w.SetHeader(f"SPACE={space} MultiPlaneFusion model, mm")
    elif fmt == "obj":
        w = vtk.vtkOBJWriter()
    elif fmt == "ply":
        w = vtk.vtkPLYWriter()
        w.SetFileTypeToBinary()
        w.AddComment(f"SPACE={space}")
    else:
        w = vtk.vtkXMLPolyDataWriter()
        w.SetDataModeToAppended()
        w.SetCompressorTypeToZLib()
        w.EncodeAppendedDataOff()
        tag = vtk.vtkStringArray()
        tag.SetName("SPACE")
        tag.InsertNextValue(space)
        poly.GetFieldData().AddArray(tag)
    w.SetFileName(tmp)
    w.SetInputData(poly)
    if not w.Write():
        raise OutputError(f"the {fmt.upper()} writer failed on '{tmp}'")
    if fmt == "obj":
        _prepend_line(tmp, f"# SPACE={space} MultiPlaneFusion model, mm")


def write_model(polydata, path, ras=False):
    """Write a closed LPS mesh to ``path`` atomically (format from the extension).

    Parameters
    ----------
    polydata : vtkPolyData
        Triangle mesh in LPS mm.
    path : str or PathLike
        ``.stl`` (binary), ``.obj``, ``.ply`` (binary) or ``.vtp``.
    ras : bool
        Write RAS coordinates (x and y negated) instead of LPS.

    Returns
    -------
    dict
        :func:`mesh_report` of the written mesh plus path, format, space and bytes.

    Raises
    ------
    OutputError
        Unsupported extension, unwritable location or a failing writer (nothing is left behind).
    """
    fmt = model_format(path)
    space = "RAS" if ras else "LPS"
    out = transform_polydata(polydata, _LPS_TO_RAS, (0.0, 0.0, 0.0)) if ras else shallow_copy(polydata)
    out = separate_coincident_vertices(out)
    if fmt != "stl" and out.GetPointData().GetNormals() is None:
        out = add_normals(out)
    with atomic_path(path) as tmp:
        _write(out, tmp, fmt, space)
    report = mesh_report(polydata)
    # the report is the mesh's; this says whether a reader welding by position sees the same topology
    report.update(path=os.path.abspath(os.fspath(path)), format=fmt, space=space, bytes=os.path.getsize(path),
                  coincident_vertices_in_file=coincident_float32_vertices(points(out)))
    return report


# ----------------------------------------------------------------------------------------- reading
def read_model(path, ras=False):
    """Read a model file back as an LPS triangle mesh.

    ``ras=True`` says the file holds RAS coordinates; they are flipped back to LPS. STL vertices are
    merged (STL stores every triangle's corners separately), so a closed mesh reads back closed.
    """
    fmt = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if not os.path.isfile(path):
        raise InputError(f"model file '{path}' does not exist")
    if fmt == "stl":
        r = vtk.vtkSTLReader()
        r.MergingOn()
    elif fmt == "obj":
        r = vtk.vtkOBJReader()
    elif fmt == "ply":
        r = vtk.vtkPLYReader()
    elif fmt == "vtp":
        r = vtk.vtkXMLPolyDataReader()
    else:
        raise InputError(f"unsupported model format '.{fmt}': use one of {', '.join(MODEL_EXTENSIONS)}")
    r.SetFileName(os.fspath(path))
    r.Update()
    poly = vtk.vtkPolyData()
    poly.DeepCopy(r.GetOutput())
    if poly.GetNumberOfCells() == 0:
        raise InputError(f"model file '{path}' holds no triangles")
    if ras:
        poly = transform_polydata(poly, _LPS_TO_RAS, (0.0, 0.0, 0.0))
    return poly
