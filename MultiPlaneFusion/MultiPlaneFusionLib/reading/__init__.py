"""Reading series into stacks: DICOM folders and trees, and volume files."""

import os

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..grid import Grid, grid_from_image
from .dicom import read_dicom_folder, scan_folder
from .volume_file import read_image, read_volume_stack, stack_from_image

__all__ = [
    "read_dicom_folder",
    "read_grid_source",
    "read_image",
    "read_stacks",
    "read_volume",
    "scan_folder",
    "stack_from_image",
    "stack_to_image",
]


def _read_one(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"'{path}' does not exist")
    if os.path.isdir(path):
        return read_dicom_folder(path)
    return [read_volume_stack(path)]


def read_stacks(paths):
    """All stacks found in ``paths`` (DICOM series folders, folder trees, volume files), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    stacks = []
    for p in paths:
        stacks.extend(_read_one(p))
    return stacks


def stack_to_image(stack):
    """A SimpleITK image of a regular, unsheared stack in scanner space (what a series reader gives).

    Raises InputError for a sheared or gappy stack: those have no exact orthonormal image; resample them
    onto a grid instead.
    """
    if stack.is_sheared or not stack.is_regular:
        raise InputError(
            f"'{stack.description}' is {'sheared (gantry tilt)' if stack.is_sheared else 'irregularly spaced'}: "
            "it has no exact image grid; resample it onto a grid first"
        )
    img = sitk.GetImageFromArray(stack.pixels)
    img.SetSpacing((*stack.pixel_spacing_mm, stack.slice_step_mm))
    img.SetOrigin([float(v) for v in stack.slice_origins_mm[0]])
    d = np.stack([stack.row_direction, stack.column_direction, stack.normal], axis=1)
    img.SetDirection([float(v) for v in d.ravel()])
    return img


def read_volume(path):
    """A SimpleITK image from a volume file or a DICOM folder holding one regular series."""
    path = os.fspath(path)
    if os.path.isdir(path):
        stacks = read_dicom_folder(path)
        if len(stacks) != 1:
            raise InputError(f"'{path}' holds {len(stacks)} series; give the folder of exactly one")
        return stack_to_image(stacks[0])
    if not os.path.exists(path):
        raise InputError(f"'{path}' does not exist")
    return read_image(path)


def read_grid_source(path) -> Grid:
    """Exactly the grid of an existing volume (``--grid-like``): volume file or regular DICOM series."""
    return grid_from_image(read_volume(path))
