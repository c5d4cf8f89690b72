"""Write a :class:`~MultiPlaneFusionLib.stack.Stack` as a real DICOM series (one file per slice).

Used by tests and the ``demo`` command to produce inputs for the reader: CT Image Storage with the
exact per-slice geometry of the stack (ImagePositionPatient = ``slice_origins_mm[k]``), int16 storage
with RescaleSlope/Intercept, optional lossless compression, plus two kinds of file a reader must skip
(a Secondary Capture image and a LOCALIZER scout).
"""

import datetime
import os

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from ..errors import OutputError
from ..writing import make_folder

# Stored values are int16; the CT convention of intercept -1024 keeps air near 0.
_CT_INTERCEPT = -1024.0
_INT16_MIN, _INT16_MAX = -32768, 32767
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _ds(value):
    """A DS value (16 characters at most) as close as DICOM allows to ``value``."""
    return DSfloat(float(value), auto_format=True)


def _ds_list(values):
    return [_ds(v) for v in np.asarray(values, dtype=float).ravel()]


def rescale_for(pixels, modality="CT"):
    """(slope, intercept) mapping ``pixels`` to int16 with ``value = stored * slope + intercept``.

    CT: intercept -1024 and slope 1 (0.5 HU quantisation) unless the range does not fit, then the
    smallest slope that fits. Other modalities: centred intercept and a slope spreading the range
    over most of int16.
    """
    v = np.asarray(pixels, dtype=float)
    lo, hi = float(np.min(v)), float(np.max(v))
    if modality == "CT":
        intercept = _CT_INTERCEPT
        needed = max(1.0, (hi - intercept) / _INT16_MAX, (intercept - lo) / -_INT16_MIN)
    else:
        intercept = float(_ds(0.5 * (lo + hi)))
        needed = max((hi - lo) / 60000.0, 1e-6)
    return _round_up_3_digits(needed), float(intercept)


def _round_up_3_digits(value):
    """Smallest number with 3 significant digits >= value (exact in DS, so the range still fits)."""
    e = 10.0 ** (np.floor(np.log10(value)) - 2)
    return float(np.ceil(value / e - 1e-9) * e)


def _signed_tilt_deg(stack):
    """Gantry tilt for GantryDetectorTilt: signed (Philips convention, column z = sin(tilt)) for a
    tilt about the L-R axis, else the unsigned angle between slice step and normal."""
    tilt = stack.tilt_deg
    row, col = stack.row_direction, stack.column_direction
    if abs(abs(row[0]) - 1.0) < 1e-6 and abs(col[1]) > abs(col[2]):  # an axial series tilted about x
        return float(np.degrees(np.arctan2(col[2] * np.sign(col[1]), abs(col[1]))))
    return tilt


def _base_dataset(sop_class, *, study_uid, series_uid, frame_uid, patient_name, modality, description,
                  series_number, patient_id="PHANTOM0001"):
    now = datetime.datetime.now()
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "MultiPlaneFusion simulator"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "HEAD PHANTOM"
    ds.SeriesDescription = description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    if frame_uid:
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    return ds


def _file_meta(ds, transfer_syntax):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta


def _set_int16_pixels(ds, stored):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()


def _check_encoder(transfer_syntax):
    """Raise NotImplementedError unless pydicom can encode ``transfer_syntax`` here."""
    from pydicom.pixels import get_encoder

    try:
        encoder = get_encoder(transfer_syntax)
    except NotImplementedError as exc:
        raise NotImplementedError(f"pydicom has no encoder for {transfer_syntax.name}") from exc
    if not encoder.is_available:
        missing = "; ".join(str(m) for m in encoder.missing_dependencies) or "no plugin"
        raise NotImplementedError(f"no encoder installed for {transfer_syntax.name} ({missing})")


def _save(ds, path, transfer_syntax):
    """Save with file meta; compress for encapsulated transfer syntaxes."""
    if transfer_syntax in _UNCOMPRESSED:
        _file_meta(ds, transfer_syntax)
    else:
        _file_meta(ds, ExplicitVRLittleEndian)
        ds.compress(transfer_syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def _prepare_folder(folder):
    folder = os.fspath(folder)
    make_folder(folder, "folder")
    return folder


def write_dicom_series(
    stack, folder, series_number=1, study_uid=None, patient_name="PHANTOM^HEAD", transfer_syntax=None,
    patient_id="PHANTOM0001",
):
    """Write one DICOM file per slice of ``stack`` into ``folder`` (created), named IM00001.dcm, ...

    Parameters
    ----------
    stack : Stack
        Pixels ``[k, j, i]`` in HU (CT) or any unit; its geometry and UIDs are written as they are.
    folder : str or path
        Output folder; created if missing.
    series_number : int
        SeriesNumber.
    study_uid : str, optional
        StudyInstanceUID overriding ``stack.study_uid`` (a new one if both are empty).
    patient_name : str
        PatientName.
    transfer_syntax : pydicom UID, optional
        None for Explicit VR Little Endian; Implicit VR Little Endian; or a lossless compressed syntax
        pydicom can encode here (RLE Lossless natively, JPEG 2000 Lossless with pylibjpeg-openjpeg,
        JPEG-LS Lossless with pyjpegls).
    patient_id : str
        PatientID (cohort tests write several patients).

    Returns
    -------
    list of str
        Paths written, in slice order.

    Raises
    ------
    NotImplementedError
        When no encoder for ``transfer_syntax`` is available.
    OutputError
        When the folder cannot be created or a file cannot be written.
    """
    transfer_syntax = pydicom.uid.UID(transfer_syntax or ExplicitVRLittleEndian)
    if transfer_syntax not in _UNCOMPRESSED:
        _check_encoder(transfer_syntax)
    folder = _prepare_folder(folder)
    modality = stack.modality if stack.modality in ("CT", "MR") else "CT"
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    study_uid = study_uid or stack.study_uid or generate_uid()
    series_uid = stack.series_uid or generate_uid()
    frame_uid = stack.frame_of_reference_uid or generate_uid()
    slope, intercept = rescale_for(stack.pixels, modality)
    di, dj = stack.pixel_spacing_mm
    normal = stack.normal
    steps = np.linalg.norm(np.diff(stack.slice_origins_mm, axis=0), axis=1)
    regular = stack.is_regular and len(steps) > 0
    tilted = stack.is_sheared
    paths = []
    for k in range(stack.shape[0]):
        ds = _base_dataset(
            sop_class,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            patient_name=patient_name,
            modality=modality,
            description=stack.description,
            series_number=series_number,
            patient_id=patient_id,
        )
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = _ds_list(stack.slice_origins_mm[k])
        ds.ImageOrientationPatient = _ds_list(np.concatenate([stack.row_direction, stack.column_direction]))
        # DICOM PixelSpacing is [row spacing (between rows, along j), column spacing (along i)].
        ds.PixelSpacing = [_ds(dj), _ds(di)]
        ds.SliceThickness = _ds(stack.thickness_mm)
        if regular:
            # Distance between consecutive positions (along the table for a tilted series, as
            # Philips writes it).
            ds.SpacingBetweenSlices = _ds(float(np.mean(steps)))
        if tilted:
            ds.GantryDetectorTilt = _ds(_signed_tilt_deg(stack))
        ds.SliceLocation = _ds(float(stack.slice_origins_mm[k] @ normal))
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = _ds(120)
            ds.WindowCenter = _ds(40)
            ds.WindowWidth = _ds(400)
        stored = np.rint((stack.pixels[k].astype(np.float64) - intercept) / slope)
        _set_int16_pixels(ds, np.clip(stored, _INT16_MIN, _INT16_MAX).astype(np.int16))
        path = os.path.join(folder, f"IM{k + 1:05d}.dcm")
        try:
            _save(ds, path, transfer_syntax)
        except OSError as exc:
            raise OutputError(f"cannot write '{path}': {exc.strerror}") from exc
        paths.append(path)
    return paths


def write_secondary_capture(folder, study_uid=None, filename="SC00001.dcm"):
    """Write one Secondary Capture image (e.g. a screenshot) that a series reader must skip.

    Returns the path written.
    """
    folder = _prepare_folder(folder)
    ds = _base_dataset(
        SecondaryCaptureImageStorage,
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        frame_uid=None,
        patient_name="PHANTOM^HEAD",
        modality="OT",
        description="SCREEN CAPTURE",
        series_number=99,
    )
    ds.SOPInstanceUID = generate_uid()
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstanceNumber = 1
    yy, xx = np.mgrid[0:64, 0:64]
    _set_int16_pixels(ds, ((xx + yy) * 8).astype(np.int16))
    path = os.path.join(folder, filename)
    _save(ds, path, ExplicitVRLittleEndian)
    return path


def write_localizer(folder, stack=None, scale=1.0, filename="LOC00001.dcm", pixel_spacing_mm=2.0):
    """Write one CT scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER) that a series reader must skip.

    The image is the mean HU of the phantom along A-P on a coronal plane through the head, with a
    valid coronal geometry. When ``stack`` is given, the scout shares its study, series and frame of
    reference (scanners do put the scout into the axial series folder), which is the hard case for a
    reader.

    Returns the path written.
    """
    from .phantom import head_phantom_hu, phantom_bounds_mm

    folder = _prepare_folder(folder)
    lo, hi = phantom_bounds_mm(scale)
    s = float(pixel_spacing_mm)
    xs = np.arange(lo[0], hi[0] + 1e-9, s)
    zs = np.arange(hi[2], lo[2] - 1e-9, -s)  # column direction is -z (feet down in the image)
    ys = np.arange(lo[1], hi[1] + 1e-9, s)
    pts = np.stack(np.meshgrid(zs, ys, xs, indexing="ij"), axis=-1)[..., ::-1]  # (z, y, x) -> xyz
    scout = head_phantom_hu(pts, scale).mean(axis=1)  # average along y: (nz, nx)
    if stack is not None:
        study, series, frame = stack.study_uid, stack.series_uid, stack.frame_of_reference_uid
    else:
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
    ds = _base_dataset(
        CTImageStorage,
        study_uid=study or generate_uid(),
        series_uid=series or generate_uid(),
        frame_uid=frame or generate_uid(),
        patient_name="PHANTOM^HEAD",
        modality="CT",
        description="SCOUT",
        series_number=1,
    )
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 1000
    centre_y = 0.5 * (lo[1] + hi[1])
    ds.ImagePositionPatient = _ds_list([xs[0], centre_y, zs[0]])
    ds.ImageOrientationPatient = _ds_list([1, 0, 0, 0, 0, -1])
    ds.PixelSpacing = [_ds(s), _ds(s)]
    ds.SliceThickness = _ds(hi[1] - lo[1])
    slope, intercept = rescale_for(scout, "CT")
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "HU"
    _set_int16_pixels(ds, np.rint((scout - intercept) / slope).astype(np.int16))
    path = os.path.join(folder, filename)
    _save(ds, path, ExplicitVRLittleEndian)
    return path
