"""DICOM series into stacks, every slice placed by its own ImagePositionPatient.

No series reader that assumes slices step along the normal is used: gantry-tilted series step along the
table (a sheared stack) and some series have irregular gaps; both are kept exactly as acquired.
"""

import logging
import os
from collections import defaultdict

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from ..errors import InputError
from ..stack import Stack

log = logging.getLogger("MultiPlaneFusionLib")

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1-.7.4
_STRUCTURED_REPORT = "1.2.840.10008.5.1.4.1.1.88"  # SR, incl. radiation dose reports
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.481",  # RT objects
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF/CDA
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # registration, segmentation, surface
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)


def _skip_reason(ds):
    """Why a DICOM dataset cannot be a slice of a stack, or None when it can."""
    sop = str(ds.get("SOPClassUID", ""))
    if sop.startswith(_SECONDARY_CAPTURE):
        return "secondary capture"
    if sop.startswith(_STRUCTURED_REPORT):
        return "structured report (e.g. a dose report)"
    if sop.startswith(_NON_IMAGE_PREFIXES):
        return f"not an image (SOP class {sop})"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return "no pixel data (directory record or non-image object)"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame (enhanced) image: not supported yet, export it as single-frame slices"
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds or ds.get(tag) in (None, ""):
            return f"no {tag} (no patient geometry)"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "colour image"
    return None


def scan_folder(folder):
    """Group the DICOM files under ``folder`` (recursively) into series.

    Returns ``(groups, skipped)``: ``groups`` is a list of lists of ``(path, header)`` (one per series and
    orientation, in a stable order) and ``skipped`` a list of ``(path, reason)``. Every skipped file's
    reason is logged.
    """
    groups = defaultdict(list)
    skipped = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                ds = pydicom.dcmread(path, defer_size="4 KB")  # headers; pixel data stays on disk
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
                skipped.append((path, "not a DICOM file"))
                continue
            reason = _skip_reason(ds)
            if reason is not None:
                skipped.append((path, reason))
                continue
            iop = np.round(np.asarray([float(v) for v in ds.ImageOrientationPatient]), 3)
            key = (
                str(ds.get("SeriesInstanceUID", "")),
                tuple(iop),
                int(ds.Rows),
                int(ds.Columns),
                tuple(round(float(v), 5) for v in ds.PixelSpacing),
            )
            groups[key].append((path, ds))
    for path, reason in skipped:
        log.info("skipped %s: %s", path, reason)
    ordered = sorted(groups.values(), key=lambda g: (int(g[0][1].get("SeriesNumber", 0) or 0), g[0][0]))
    return ordered, skipped


def _split_duplicates(files, normal):
    """Split a group whose slices repeat positions (several echoes/acquisitions in one series)."""
    positions = [round(float(np.asarray(ds.ImagePositionPatient, float) @ normal), 3) for _, ds in files]
    if len(set(positions)) == len(positions):
        return [files]
    sub = defaultdict(list)
    for path, ds in files:
        key = (str(ds.get("EchoNumbers", "")), str(ds.get("AcquisitionNumber", "")),
               str(ds.get("TemporalPositionIdentifier", "")))
        sub[key].append((path, ds))
    out = []
    for key in sorted(sub):
        seen, kept = set(), []
        for path, ds in sub[key]:
            pos = round(float(np.asarray(ds.ImagePositionPatient, float) @ normal), 3)
            if pos in seen:
                log.warning("skipped %s: duplicate slice position in its series", path)
                continue
            seen.add(pos)
            kept.append((path, ds))
        out.append(kept)
    return out


def _pixels(path, ds_header):
    """Stored pixel values of one file as float64, decoded by pydicom or, failing that, by GDCM.

    pydicom needs plugins (pylibjpeg, gdcm) for compressed transfer syntaxes; SimpleITK's GDCM reader
    handles JPEG, JPEG-LS, JPEG 2000 and RLE with nothing else installed (the case inside Slicer).
    """
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as first:  # noqa: BLE001 - any decoder failure falls back to GDCM
        try:
            img = sitk.ReadImage(path)
        except RuntimeError:
            raise InputError(f"cannot decode the pixels of '{path}': {first}") from None
        # GDCM applies the rescale itself; return the final values and flag it.
        return sitk.GetArrayFromImage(img).reshape(int(ds_header.Rows), int(ds_header.Columns)), True
    return np.asarray(arr), False


def acquisition_type(ds):
    """'sequenced', 'spiral' or '' (unknown, or not CT) from a CT header (see :func:`acquisition_from_values`)."""
    return acquisition_from_values(ds.get("Modality", ""), ds.get("AcquisitionType", ""),
                                   ds.get("SpiralPitchFactor", ""), ds.get("ScanOptions", ""))


def acquisition_from_values(modality, acquisition_type, spiral_pitch_factor, scan_options):
    """'sequenced', 'spiral' or '' from the header values (strings, or None when absent): AcquisitionType
    (0018,9302), else a SpiralPitchFactor (0018,9311, helical scans only), else ScanOptions (0018,0022: HELIX
    / AXIAL on many scanners). Only CT has these."""
    if str(modality or "").strip().upper() != "CT":
        return ""
    kind = str(acquisition_type or "").strip().upper()
    if kind in ("SEQUENCED", "SPIRAL"):
        return kind.lower()
    if str(spiral_pitch_factor if spiral_pitch_factor is not None else "").strip():
        return "spiral"
    options = str(scan_options or "").upper()
    if any(w in options for w in ("HELIX", "HELICAL", "SPIRAL")):
        return "spiral"
    if "AXIAL" in options or "SEQUENCE" in options:
        return "sequenced"
    return ""


def read_series(files, description_hint=""):
    """Read one grouped series (list of ``(path, header)``) into a :class:`Stack`.

    Slices are sorted along the normal; every slice keeps its own position. Values are rescaled with
    each slice's RescaleSlope/Intercept (HU for CT).
    """
    first = files[0][1]
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    files = sorted(files, key=lambda f: float(np.asarray(f[1].ImagePositionPatient, float) @ normal))
    nk = len(files)
    rows, cols = int(first.Rows), int(first.Columns)
    pixels = np.empty((nk, rows, cols), dtype=np.float32)
    origins = np.empty((nk, 3))
    for k, (path, ds) in enumerate(files):
        arr, rescaled = _pixels(path, ds)
        if arr.shape != (rows, cols):
            raise InputError(f"'{path}' has {arr.shape} pixels, its series has {(rows, cols)}")
        if not rescaled:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            arr = arr.astype(np.float64) * slope + intercept
        pixels[k] = arr
        origins[k] = [float(v) for v in ds.ImagePositionPatient]
    offsets = (origins - origins[0]) @ normal
    steps = np.diff(offsets)
    thickness = float(first.get("SliceThickness", 0) or 0)
    if not thickness > 0:
        thickness = float(np.median(steps)) if len(steps) else 1.0
    dj, di = (float(v) for v in first.PixelSpacing)  # DICOM lists row spacing (along j) first
    desc = str(first.get("SeriesDescription", "") or description_hint or os.path.basename(os.path.dirname(files[0][0])))
    return Stack(
        pixels=pixels,
        slice_origins_mm=origins,
        row_direction=row,
        column_direction=col,
        pixel_spacing_mm=(di, dj),
        thickness_mm=thickness,
        modality=str(first.get("Modality", "OT") or "OT"),
        description=desc,
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        source=os.path.dirname(files[0][0]),
        acquisition=acquisition_type(first),
    )


def read_dicom_folder(folder):
    """All stacks in a DICOM folder or folder tree (one per series and orientation).

    Raises InputError when the folder holds no usable image series; the reasons files were skipped are
    logged and summarised in the message.
    """
    groups, skipped = scan_folder(folder)
    stacks = []
    for files in groups:
        iop = np.asarray([float(v) for v in files[0][1].ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        for part in _split_duplicates(files, normal / np.linalg.norm(normal)):
            if len(part) < 2:
                desc = str(part[0][1].get("SeriesDescription", "")) or part[0][0]
                log.warning("skipped series '%s' in %s: a single slice is not a stack", desc, folder)
                skipped.append((part[0][0], "single-slice series"))
                continue
            stacks.append(read_series(part))
    if not stacks:
        if not skipped:
            raise InputError(f"'{folder}' is empty: no files found")
        reasons = sorted({r for _, r in skipped})
        raise InputError(
            f"no usable DICOM image series in '{folder}' ({len(skipped)} files skipped: {'; '.join(reasons)})"
        )
    return stacks
