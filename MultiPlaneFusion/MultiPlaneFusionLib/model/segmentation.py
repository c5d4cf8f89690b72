"""The bone mask: threshold, then cleanup (thin structures, islands, cavities).

All work happens inside the bounding box of the thresholded voxels (plus a one-voxel margin), so
memory follows the bone, not the field of view. Morphology uses Euclidean distance maps in mm
(SimpleITK's Maurer transform with the image spacing), so radii are physical on anisotropic grids.
Connectivity: the mask is 26-connected (face, edge or corner) and the background 6-connected, the
complementary pair under which an isosurface's pieces and the mask's pieces agree.
"""

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..progress import Monitor


def image_array(image):
    """The voxels of a 3-D scalar SimpleITK image as float32 [k, j, i] (a view when already float32)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"a bone model needs a 3-D scalar volume, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    if image.GetPixelID() == sitk.sitkFloat32:
        return sitk.GetArrayViewFromImage(image)
    return sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))


def voxel_volume_mm3(image):
    """Volume of one voxel in mm^3 (spacing and direction; exact for sheared directions too)."""
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return float(abs(np.linalg.det(d)) * np.prod(image.GetSpacing()))


def bounding_box(mask, margin=0):
    """Slices (k, j, i) of the smallest box holding every True voxel, grown by ``margin`` voxels and
    clipped to the array; None when the mask is empty."""
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other))
        if idx.size == 0:
            return None
        slices.append(slice(max(0, int(idx[0]) - margin), min(mask.shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(slices)


def _mask_image(array, spacing, direction):
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction])
    return img


def _distance_mm(mask_img):
    """Euclidean distance (mm) from every voxel to the nearest voxel of ``mask_img`` (<= 0 inside)."""
    return sitk.SignedMaurerDistanceMap(mask_img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)


def select_islands(mask_img, islands="region", min_voxels=0, gap_mm=10.0, fragment_voxels=0):
    """Keep the connected (26-connected) pieces of a mask that the island mode asks for.

    - 'region': the largest piece and, transitively, every piece of at least ``fragment_voxels``
      whose nearest voxel lies within ``gap_mm`` of a kept piece (mandible, vertebrae, fragments that
      a coarse resolution disconnected); pieces farther away (head holder, table) and smaller ones
      (noise) are dropped.
    - 'largest': the largest piece only.
    - 'all': every piece of at least ``min_voxels`` voxels.

    Returns
    -------
    (uint8 SimpleITK image, dict)
        The kept mask and counts: pieces found, kept.
    """
    labels = sitk.ConnectedComponent(mask_img, True)
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SetSortByObjectSize(True)
    if islands == "all" and min_voxels > 1:
        relabel.SetMinimumObjectSize(int(min_voxels))
    labels = relabel.Execute(labels)
    found = int(relabel.GetOriginalNumberOfObjects())
    info = {"pieces_found": found}
    if islands == "largest" or (islands == "region" and found <= 1):
        kept_img = labels == 1
        kept = min(found, 1)
    elif islands == "region":
        sizes = relabel.GetSizeOfObjectsInPixels()  # label l has sizes[l - 1] voxels
        candidates = {lab for lab in range(2, found + 1) if sizes[lab - 1] >= max(1, fragment_voxels)}
        kept_labels = {1}
        kept_img = labels == 1
        while candidates:
            stats = sitk.LabelStatisticsImageFilter()
            stats.Execute(_distance_mm(kept_img), labels)
            near = {lab for lab in candidates if stats.GetMinimum(lab) <= gap_mm}
            if not near:
                break
            kept_labels |= near
            candidates -= near
            for lab in near:
                kept_img = kept_img | (labels == lab)
        kept = len(kept_labels)
        far = sorted(candidates)
        info["pieces_dropped_far"] = len(far)
        info["dropped_far_voxels"] = int(sum(sizes[lab - 1] for lab in far))
    else:
        kept_img = labels > 0
        kept = int(relabel.GetNumberOfObjects())
    info["pieces_kept"] = kept
    return sitk.Cast(kept_img, sitk.sitkUInt8), info


def remove_thin(mask_img, radius_mm, islands="region", min_voxels=0, **region):
    """Drop thin structures reaching farther than ``radius_mm`` from the main body.

    1. Opening by a ball of ``radius_mm`` (erosion then dilation, through distance maps in mm): what
       is thinner than about 2 x radius disappears, thin bridges to the scanner table break.
    2. The main body: the pieces of the opened mask that :func:`select_islands` keeps (``islands`` and
       ``min_voxels``; ``region`` holds its ``gap_mm`` and ``fragment_voxels``).
    3. The original mask is restored within ``radius_mm`` of the main body, so its surface detail
       (which the opening rounded off) comes back; thin parts extending farther are removed.

    Bone thinner than 2 x radius that reaches farther than the radius from thicker bone is removed
    too: keep the radius small (1-2 mm detaches a table or head holder).
    """
    inside = sitk.Cast(mask_img == 0, sitk.sitkUInt8)
    depth = _distance_mm(inside)  # > 0 in the mask: distance to the nearest background voxel
    core = sitk.Cast(depth > radius_mm, sitk.sitkUInt8)
    if not int(sitk.GetArrayViewFromImage(core).any()):
        return sitk.Image(mask_img.GetSize(), sitk.sitkUInt8), {"thin_removed_all": True}
    opened = sitk.Cast((_distance_mm(core) <= radius_mm) & (mask_img > 0), sitk.sitkUInt8)
    main, _ = select_islands(opened, islands, min_voxels, **region)
    kept = sitk.Cast((_distance_mm(main) <= radius_mm) & (mask_img > 0), sitk.sitkUInt8)
    kept.CopyInformation(mask_img)
    return kept, {"thin_removed_all": False}


def segment(image, lo, hi, islands="region", min_island_mm3=0.0, fill_cavities=False, remove_thin_mm=0.0,
            monitor=None, array=None, island_gap_mm=10.0, fragment_min_mm3=20.0):
    """The cleaned bone mask of ``image`` for the inclusive range [lo, hi].

    Parameters
    ----------
    image : SimpleITK.Image
        3-D scalar volume (LPS, any spacing and direction).
    lo, hi : float
        Inclusive intensity range (HU for CT).
    islands, min_island_mm3, fill_cavities, remove_thin_mm, island_gap_mm, fragment_min_mm3
        Cleanup, see :class:`~MultiPlaneFusionLib.model.options.ModelOptions`.
    monitor : progress.Monitor, optional
        Reports stage "segment".
    array : ndarray, optional
        ``image`` as float32 [k, j, i], when the caller already holds it.

    Returns
    -------
    (ndarray bool, tuple of slices, dict)
        The mask inside its bounding box (plus a margin of one voxel where the volume allows), the
        box's slices into the full [k, j, i] array, and statistics (voxels, volume_mm3, pieces).

    Raises
    ------
    InputError
        When no voxel lies in [lo, hi], or the cleanup leaves nothing.
    """
    monitor = Monitor.wrap(monitor)
    a = image_array(image) if array is None else array
    monitor.report("segment", 0.0)
    raw = (a >= lo) & (a <= hi)
    box = bounding_box(raw, margin=1)
    if box is None:
        raise InputError(
            f"no voxel lies within the threshold {lo:g}..{hi:g} (the volume ranges "
            f"{float(np.nanmin(a)):g}..{float(np.nanmax(a)):g}): choose another range"
        )
    raw = raw[box]
    monitor.report("segment", 0.15)
    spacing, direction = image.GetSpacing(), image.GetDirection()
    vox_mm3 = voxel_volume_mm3(image)
    min_voxels = int(np.ceil(min_island_mm3 / vox_mm3)) if min_island_mm3 > 0 else 0
    region = {"gap_mm": float(island_gap_mm), "fragment_voxels": int(np.ceil(fragment_min_mm3 / vox_mm3))}
    mask_img = _mask_image(raw, spacing, direction)
    stats = {"threshold_voxels": int(np.count_nonzero(raw))}
    del raw
    if remove_thin_mm > 0:
        mask_img, thin = remove_thin(mask_img, remove_thin_mm, islands=islands, min_voxels=min_voxels, **region)
        stats.update(thin)
    monitor.report("segment", 0.5)
    mask_img, pieces = select_islands(mask_img, islands, min_voxels, **region)
    stats.update(pieces)
    monitor.report("segment", 0.75)
    if fill_cavities:
        before = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask_img)))
        mask_img = sitk.BinaryFillhole(mask_img, fullyConnected=False, foregroundValue=1)
        stats["cavity_voxels_filled"] = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask_img))) - before
    mask = sitk.GetArrayFromImage(mask_img).astype(bool)
    n = int(np.count_nonzero(mask))
    if n == 0:
        raise InputError(
            f"nothing is left of the {lo:g}..{hi:g} mask after the cleanup: lower --min-island-mm3 "
            "or --remove-thin-mm"
        )
    stats.update(voxels=n, volume_mm3=n * vox_mm3)
    monitor.report("segment", 1.0)
    return mask, box, stats


def full_mask_image(mask, box, image):
    """The cropped mask put back on the grid of ``image`` as a uint8 SimpleITK image (0/1)."""
    size = image.GetSize()
    full = np.zeros((size[2], size[1], size[0]), dtype=np.uint8)
    full[box] = mask
    out = sitk.GetImageFromArray(full)
    out.CopyInformation(image)
    return out
