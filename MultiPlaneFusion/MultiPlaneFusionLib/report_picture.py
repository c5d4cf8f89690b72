"""``report.png``: one picture that says what went in and what came out.

For the axial, coronal and sagittal planes through the centre of the bone, the input series that sees
that plane best (its slices most parallel to it) is shown beside the fused volume, each labelled with the
series description and orientation; a rendering of the bone model and a table of per-stack facts
(orientation, thickness, registration motion, self-check figure when the summary has one) complete it.

matplotlib (a bare Figure, Agg, no display) draws the figure and VTK renders the model offscreen; both are imported
here only. matplotlib is not one of the library's dependencies (it comes with the vtk wheel and with
Slicer): without it :func:`write_report_picture` logs a warning and writes nothing.
"""

import logging
import os
import sys

import numpy as np

from .grid import Grid
from .sampling.resample import resample_stack
from .writing import atomic_path

log = logging.getLogger("MultiPlaneFusionLib")

# Patient axes (LPS) of the three anatomical planes' normals.
PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _plane_grid(grid, axis, index):
    """A one-voxel-thick grid: the plane ``index`` of grid axis ``axis`` (0 = i, 1 = j, 2 = k)."""
    shape = list(grid.shape)  # (nk, nj, ni)
    shape[2 - axis] = 1
    origin = np.asarray(grid.origin_mm, float) + grid.direction_matrix[:, axis] * grid.spacing_mm[axis] * index
    return Grid(tuple(shape), grid.spacing_mm, tuple(float(v) for v in origin), grid.direction)


def _take(volume, axis, index):
    return np.take(volume, index, axis=2 - axis)


def _best_stack(stacks, normal):
    """Index of the stack whose slice normal (registration applied) is most parallel to ``normal``."""
    scores = []
    for s in stacks:
        scores.append((abs(float(s.world_normal @ normal)), -min(s.pixel_spacing_mm)))
    return max(range(len(stacks)), key=lambda n: scores[n])


def _window(values, modality):
    if str(modality).upper() == "CT":
        return -400.0, 1400.0  # a bone-and-soft-tissue window, in HU
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _centre_index(grid, centre_mm):
    """(i, j, k) voxel of the grid nearest to ``centre_mm``, clipped into the grid."""
    k, j, i = grid.physical_to_index(np.asarray(centre_mm, float))
    size = grid.shape[::-1]
    return [int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip((i, j, k), size)]


def _render_model(polydata, size=(600, 600)):
    """An RGB array of the model rendered offscreen with VTK, or None when rendering is unavailable."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        # No display (a server, CI): ask VTK for its EGL window first. Its default, X, would print a
        # "bad X server connection" warning on the console before falling back to EGL by itself.
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    try:
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(polydata)
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(0.92, 0.86, 0.72)
        renderer = vtk.vtkRenderer()
        renderer.AddActor(actor)
        renderer.SetBackground(1.0, 1.0, 1.0)
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.AddRenderer(renderer)
        window.SetSize(*size)
        camera = renderer.GetActiveCamera()
        # LPS: look from the patient's front (-P is anterior), head up (+S)
        camera.SetPosition(0, -1, 0)
        camera.SetFocalPoint(0, 0, 0)
        camera.SetViewUp(0, 0, 1)
        camera.Azimuth(-30)
        camera.Elevation(15)
        renderer.ResetCamera()
        window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.Update()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
        window.Finalize()
        return rgb
    except Exception as e:  # no OpenGL context on this machine: the picture goes without it
        log.warning("report picture: the model could not be rendered (%s)", e)
        return None


def _motion_by_stack(summary):
    """{stack index: (translation mm, rotation deg)} of the last registration report of each stack."""
    motion = {}
    for r in summary.get("registration") or []:
        try:
            t = float(np.linalg.norm(r.get("translation_mm") or [0, 0, 0]))
            motion[int(r["index"])] = (t, float(r.get("rotation_angle_deg") or 0.0))
        except (KeyError, TypeError, ValueError):
            continue
    return motion


def _self_check(stack_summary):
    """A short text for the stack's self-check figure, if the summary carries one (else '-')."""
    value = stack_summary.get("self_check")
    if isinstance(value, dict):
        for key, v in value.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return f"{key} {v:.3g}"
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3g}"
    return "-"


def _srr_self_check(summary, n):
    """The srr self-check of stack ``n`` as 'RMS fused / best single' (HU), or None when it did not run."""
    check = (summary.get("reconstruction") or {}).get("self_check") or {}
    per = check.get("per_stack") or []
    r = per[n] if n < len(per) else None
    if not isinstance(r, dict) or r.get("best_single_rms") is None:
        return None
    if r.get("fusion_beats_best_single"):
        verdict = ""
    else:
        verdict = " on par" if r.get("verdict") == "on par" else " WORSE"
    return f"{r['fusion_rms_where_best_single_covers']:.0f} / {r['best_single_rms']:.0f}{verdict}"


def _table_rows(summary):
    motion = _motion_by_stack(summary)
    rows = []
    for n, s in enumerate(summary.get("stacks") or []):
        check = _srr_self_check(summary, n)
        t, r = motion.get(n, (None, None))
        moved = "reference" if n == 0 else ("-" if t is None else f"{t:.1f} mm, {r:.1f} deg")
        tilt = float(s.get("tilt_deg") or 0.0)
        rows.append([
            str(n), str(s.get("description") or "?")[:26], str(s.get("orientation") or "?")
            + (f" tilt {tilt:+.1f}" if s.get("sheared") else ""),
            f"{float(s.get('thickness_mm') or 0):.3g}",
            "x".join(f"{float(v):.3g}" for v in s.get("pixel_spacing_mm") or []), moved, check or _self_check(s),
        ])
    return rows


def write_report_picture(path, result, model_polydata=None, title=None):
    """Write the report picture of a fusion (``FusionResult``) and its bone model to ``path`` (.png).

    Returns the absolute path written, or None when matplotlib is missing (a warning is logged)."""
    try:
        # Figure without pyplot: no GUI backend is chosen or changed (safe inside Slicer); PNG goes through Agg.
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("report picture skipped: matplotlib is not installed")
        return None
    import SimpleITK as sitk

    grid = result.grid
    fused = sitk.GetArrayViewFromImage(result.image)
    stacks = result.stacks
    modality = stacks[0].modality if stacks else ""
    if model_polydata is not None and model_polydata.GetNumberOfPoints() > 0:
        b = model_polydata.GetBounds()
        centre = [(b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2]
    else:
        centre = grid.index_to_physical(*(np.asarray(grid.shape) - 1) / 2.0)
    centre_ijk = _centre_index(grid, centre)
    lo, hi = _window(np.asarray(fused), modality)

    import matplotlib

    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#28406a")  # where the input series does not reach
    fig = Figure(figsize=(13.5, 13.5), dpi=100)
    gs = fig.add_gridspec(4, 3, height_ratios=[1, 1, 1, 0.55], hspace=0.25, wspace=0.08)
    for row, (plane, lps_axis) in enumerate(PLANES):
        # the grid axis closest to this plane's normal
        axis = int(np.argmax(np.abs(grid.direction_matrix[lps_axis, :])))
        normal = np.zeros(3)
        normal[lps_axis] = 1.0
        index = centre_ijk[axis]
        fused_plane = np.squeeze(_take(np.asarray(fused), axis, index))
        best = _best_stack(stacks, normal)
        values, covered = resample_stack(stacks[best], _plane_grid(grid, axis, index), "linear")
        input_plane = np.where(np.squeeze(covered), np.squeeze(values), np.nan)
        s = stacks[best]
        for col, (img, label) in enumerate((
            (input_plane, f"input #{best}: {s.description or os.path.basename(s.source)}\n"
                          f"{s.orientation}, {s.thickness_mm:.3g} mm slices"),
            (fused_plane, f"fused ({result.summary.get('method', '')}, "
                          f"{grid.spacing_mm[0]:.3g} mm isotropic)"),
        )):
            ax = fig.add_subplot(gs[row, col])
            ax.imshow(_display(img, axis), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{plane} - {label}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    ax = fig.add_subplot(gs[0:3, 2])
    rgb = _render_model(model_polydata) if model_polydata is not None else None
    if rgb is not None:
        ax.imshow(rgb)
        n_tri = model_polydata.GetNumberOfPolys()
        ax.set_title(f"bone model ({n_tri:,} triangles), seen from front-right", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no model rendering", ha="center", va="center")
    ax.axis("off")
    ax = fig.add_subplot(gs[3, :])
    ax.axis("off")
    rows = _table_rows(result.summary)
    if rows:
        # Column widths follow the contents, and the two long headings take two lines, so no text overlaps.
        table = ax.table(cellText=rows, loc="center", cellLoc="left",
                         colWidths=[0.04, 0.22, 0.15, 0.08, 0.1, 0.17, 0.2],
                         colLabels=["#", "series", "orientation", "thick. mm", "pixel mm", "registration\nmotion",
                                    "self-check RMS, HU\n(fused / best single)"])
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        table.scale(1.0, 1.3)
        for c in range(len(rows[0])):
            cell = table[0, c]
            cell.set_height(2 * cell.get_height())
    fig.suptitle(title or "MultiPlaneFusion report: best input series (left), fused volume (middle), bone model "
                 "(right)\nplanes through the centre of the bone; blue: not covered by that series", fontsize=13)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return os.path.abspath(path)


def _display(plane, axis):
    """Plane array turned for viewing: rows of the array are the plane's second in-plane axis."""
    a = np.asarray(plane, dtype=float)
    # np.take dropped ``axis``; the remaining array axes are in (k, j, i) order minus the dropped one.
    # Axial (k dropped) keeps rows = j; coronal/sagittal keep rows = k, shown head up (k increases
    # towards the head for a standard axial-referenced grid, so flip vertically).
    return a if axis == 2 else a[::-1, :]
