"""Volume files (NRRD, NIfTI, MHA, anything SimpleITK reads) into stacks."""

import os

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..stack import stack_from_affine


def read_image(path):
    """Read a volume file with SimpleITK; one-line InputError when it cannot."""
    try:
        img = sitk.ReadImage(os.fspath(path))
    except RuntimeError:
        raise InputError(f"'{path}' is not a volume file SimpleITK can read") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"'{path}' has {img.GetNumberOfComponentsPerPixel()} components per voxel; need a scalar volume"
        )
    if img.GetDimension() != 3 or min(img.GetSize()) < 2:
        raise InputError(
            f"'{path}' is a {img.GetDimension()}-D image of size {img.GetSize()}; a stack must be a 3-D volume"
        )
    return img


def guess_modality(image_or_array, declared=None):
    """'CT', 'MR' or 'OT' from metadata, else CT when values reach below -500 (Hounsfield air)."""
    if declared:
        return declared
    arr = image_or_array if isinstance(image_or_array, np.ndarray) else sitk.GetArrayViewFromImage(image_or_array)
    return "CT" if float(np.percentile(arr[:: max(1, arr.shape[0] // 8)], 1)) < -500 else "OT"


def stack_from_image(img, source="", description=None):
    """A stack from a 3-D SimpleITK image.

    The slice axis is the image axis with the coarsest spacing (the acquisition's through-plane axis for
    a thick-slice series, whatever order the file stores it in); the third axis on a tie. The slice
    thickness is that spacing (a volume file carries no other record of it).
    """
    spacing = np.asarray(img.GetSpacing(), dtype=float)
    slice_axis = 2 if np.isclose(spacing.max(), spacing[2]) else int(np.argmax(spacing))
    inplane = [a for a in range(3) if a != slice_axis]
    d = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    for col, axis in enumerate(inplane + [slice_axis]):
        affine[:3, col] = d[:, axis] * spacing[axis]
    affine[:3, 3] = img.GetOrigin()
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # [axis2, axis1, axis0]
    # numpy axis for image axis a is 2 - a; order the array as [slice, in-plane 2nd, in-plane 1st].
    arr = np.transpose(arr, (2 - slice_axis, 2 - inplane[1], 2 - inplane[0]))
    declared = img.GetMetaData("0008|0060").strip() if img.HasMetaDataKey("0008|0060") else None
    name = description or os.path.basename(os.fspath(source))
    return stack_from_affine(
        arr, affine, thickness_mm=float(spacing[slice_axis]), modality=guess_modality(arr, declared),
        description=name, source=os.fspath(source),
    )


def read_volume_stack(path):
    """One stack from a volume file."""
    return stack_from_image(read_image(path), source=path)
