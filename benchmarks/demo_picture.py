"""Render the README picture from a demo output folder (offscreen VTK; no display needed).

Usage: python benchmarks/demo_picture.py DEMO_OUTDIR docs/demo.png

Panels, left to right: a sagittal cut of the axial 4 mm series alone (staircase across slices), the same
cut of the average of the three series (blurred), of the super-resolution fusion, of the ground truth,
and the bone model rendered in 3D.
"""

import os
import sys

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from MultiPlaneFusionLib.grid import grid_from_image
from MultiPlaneFusionLib.model import read_model
from MultiPlaneFusionLib.reading import read_stacks
from MultiPlaneFusionLib.reconstruction import fuse_average, resample_stack


def window(img, lo=-200.0, hi=1400.0):
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def render_model(path, size):
    poly = read_model(path)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputData(poly)
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(0.93, 0.89, 0.80)
    ren = vtk.vtkRenderer()
    ren.AddActor(actor)
    ren.SetBackground(1, 1, 1)
    cam = ren.GetActiveCamera()
    # LPS: look from the left-anterior side, head up (+z is superior).
    cam.SetPosition(-1, -1.2, 0.35)
    cam.SetFocalPoint(0, 0, 0)
    cam.SetViewUp(0, 0, 1)
    ren.ResetCamera()
    cam.Zoom(1.3)
    win = vtk.vtkRenderWindow()
    win.SetOffScreenRendering(1)
    win.AddRenderer(ren)
    win.SetSize(size, size)
    win.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(win)
    grab.Update()
    out = grab.GetOutput()
    w, h, _ = out.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
    return rgb


def main(outdir, png):
    fused = sitk.ReadImage(os.path.join(outdir, "fused.nrrd"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(outdir, "truth.nrrd")))
    grid = grid_from_image(fused)
    stacks = read_stacks([os.path.join(outdir, "dicom", o) for o in ("axial", "coronal", "sagittal")])
    axial, _ = resample_stack(stacks[0], grid, "bspline")
    average = fuse_average(stacks, grid).volume
    srr = sitk.GetArrayFromImage(fused)
    i = grid.shape[2] // 2 + grid.shape[2] // 8  # a sagittal cut through the parietal wall
    panels = [window(v[::-1, :, i]) for v in (axial, average, srr, truth)]  # superior at the top
    zoom = max(1, int(np.ceil(300 / panels[0].shape[0])))
    panels = [np.repeat(np.repeat(p, zoom, axis=0), zoom, axis=1) for p in panels]
    h = panels[0].shape[0]
    model = render_model(os.path.join(outdir, "bone.stl"), h)
    row = np.concatenate([np.repeat(p[..., None], 3, axis=2) for p in panels] + [model], axis=1)
    img = vtk.vtkImageData()
    img.SetDimensions(row.shape[1], row.shape[0], 1)
    arr = numpy_support.numpy_to_vtk(np.ascontiguousarray(row[::-1]).reshape(-1, 3), deep=True)
    img.GetPointData().SetScalars(arr)
    w = vtk.vtkPNGWriter()
    w.SetFileName(png)
    w.SetInputData(img)
    w.Write()
    print(f"wrote {png}: axial-only | average | srr | truth | model")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
