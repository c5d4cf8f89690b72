"""A stack: one series of parallel 2-D slices, each slice placed by its own position.

Physical space is LPS in millimetres. ``pixels`` is indexed ``[k, j, i]`` (slice, row, column), i.e.
the DICOM convention: ``i`` runs along a row (``row_direction``, ImageOrientationPatient[0:3]) and
``j`` runs down the columns (``column_direction``, ImageOrientationPatient[3:6]).

The centre of pixel ``(k, j, i)`` is::

    p = slice_origins_mm[k] + i * spacing_i * row_direction + j * spacing_j * column_direction

so a gantry-tilted (sheared) series, whose slice origins step along the table and not along the slice
normal, and a series with irregular gaps are both represented exactly. Between slices, positions are
interpolated linearly in the continuous index ``k`` (the sheared lattice), which makes
:meth:`Stack.index_to_physical` and :meth:`Stack.physical_to_index` exact inverses.

A registration result is kept apart from the scanner geometry in ``transform`` (4x4, maps the
stack's scanner coordinates to the reconstruction's patient coordinates); it is the identity until
registration changes it.
"""

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import numpy as np

from .errors import InputError
from .transforms import apply as apply_matrix

# Relative tolerance on slice steps below which a stack counts as regularly spaced.
_STEP_RTOL = 1e-3
# In-plane drift of the slice origin per mm of slice step above which a stack counts as sheared.
_SHEAR_TOL = 1e-3


def orientation_label(normal, oblique_tolerance_deg=10.0):
    """'axial', 'coronal', 'sagittal' or 'oblique' for a slice normal in LPS.

    The label is the patient axis nearest to the normal; ``oblique`` when the angle to that axis
    exceeds ``oblique_tolerance_deg`` (gantry-tilted series of 15-20 degrees are oblique).
    """
    n = np.asarray(normal, dtype=float)
    n = n / np.linalg.norm(n)
    axis = int(np.argmax(np.abs(n)))
    angle = np.degrees(np.arccos(min(1.0, abs(n[axis]))))
    if angle > oblique_tolerance_deg:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass
class Stack:
    """One series of parallel slices with exact per-slice geometry.

    Attributes
    ----------
    pixels : ndarray, float32, shape (n_slices, rows, columns)
        Intensities (HU for CT), indexed ``[k, j, i]``.
    slice_origins_mm : ndarray, shape (n_slices, 3)
        LPS centre of pixel ``(j=0, i=0)`` of every slice (DICOM ImagePositionPatient), sorted so
        that the offset along the slice normal increases with ``k``.
    row_direction, column_direction : ndarray, shape (3,)
        Unit vectors of increasing ``i`` and increasing ``j`` (DICOM ImageOrientationPatient).
    pixel_spacing_mm : (float, float)
        Spacing along ``i`` and along ``j`` (note: DICOM PixelSpacing lists ``j`` first).
    thickness_mm : float
        Slice thickness (DICOM SliceThickness, else the median slice step).
    in_plane_fwhm_factor : float or None
        In-plane PSF of the reconstruction's model for this stack: Gaussian FWHM / pixel spacing. None (as
        read): ``sampling.psf.IN_PLANE_FWHM_FACTOR``; set on the copies the operators get when the width is
        estimated from the data (``SliceProfile.apply``).
    acquisition : str
        How a CT series was scanned, from its header: "sequenced" (step-and-shoot axial scanning),
        "spiral" (helical), or "" when unknown (MR, volume files). Sets the nominal slice profile
        (``sampling.psf.nominal_profile``).
    """

    pixels: np.ndarray
    slice_origins_mm: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing_mm: Tuple[float, float]
    thickness_mm: float
    modality: str = "OT"
    description: str = ""
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    source: str = ""
    transform: np.ndarray = field(default_factory=lambda: np.eye(4))
    in_plane_fwhm_factor: Optional[float] = None
    acquisition: str = ""

    def __post_init__(self):
        self.pixels = np.asarray(self.pixels, dtype=np.float32)
        if self.pixels.ndim != 3 or min(self.pixels.shape) < 1:
            raise InputError(f"a stack needs a 3-D pixel array, got shape {self.pixels.shape}")
        self.slice_origins_mm = np.asarray(self.slice_origins_mm, dtype=float).reshape(-1, 3)
        if len(self.slice_origins_mm) != self.pixels.shape[0]:
            raise InputError("a stack needs one slice origin per slice")
        row = np.asarray(self.row_direction, dtype=float)
        col = np.asarray(self.column_direction, dtype=float)
        row = row / np.linalg.norm(row)
        # Re-orthogonalise: DICOM stores IOP with ~7 digits.
        col = col - row * float(row @ col)
        col = col / np.linalg.norm(col)
        self.row_direction, self.column_direction = row, col
        self.pixel_spacing_mm = (float(self.pixel_spacing_mm[0]), float(self.pixel_spacing_mm[1]))
        if min(self.pixel_spacing_mm) <= 0:
            raise InputError(f"pixel spacing must be positive, got {self.pixel_spacing_mm}")
        self.thickness_mm = float(self.thickness_mm)
        if not self.thickness_mm > 0:
            raise InputError(f"slice thickness must be positive, got {self.thickness_mm}")
        self.transform = np.asarray(self.transform, dtype=float).reshape(4, 4)
        if self.in_plane_fwhm_factor is not None:
            f = float(self.in_plane_fwhm_factor)
            if not (f > 0 and np.isfinite(f)):
                raise InputError(f"in-plane PSF width factor must be positive, got {self.in_plane_fwhm_factor}")
            self.in_plane_fwhm_factor = f
        offsets = self.slice_offsets_mm
        if len(offsets) > 1 and np.any(np.diff(offsets) <= 0):
            raise InputError(
                f"slices of '{self.description or self.source}' are not sorted along the normal "
                "or two slices share a position"
            )

    # ----------------------------------------------------------------------------- basic geometry
    @property
    def shape(self):
        """(n_slices, rows, columns)."""
        return self.pixels.shape

    @property
    def normal(self):
        """Unit slice normal, row x column (right-handed with the index axes)."""
        n = np.cross(self.row_direction, self.column_direction)
        return n / np.linalg.norm(n)

    @property
    def slice_offsets_mm(self):
        """Offset of every slice along the normal, relative to slice 0; shape (n_slices,)."""
        return (self.slice_origins_mm - self.slice_origins_mm[0]) @ self.normal

    @property
    def slice_steps_mm(self):
        """Distances between consecutive slices along the normal; shape (n_slices - 1,)."""
        return np.diff(self.slice_offsets_mm)

    @property
    def slice_step_mm(self):
        """Median slice step along the normal (the thickness when there is one slice)."""
        steps = self.slice_steps_mm
        return float(np.median(steps)) if len(steps) else self.thickness_mm

    @property
    def has_gaps(self):
        """True when slice steps differ (irregular spacing, missing slices)."""
        steps = self.slice_steps_mm
        if len(steps) < 2:
            return False
        return bool(np.ptp(steps) > _STEP_RTOL * max(float(np.median(steps)), 1e-6))

    @property
    def shear_per_mm(self):
        """In-plane drift of the slice origin per mm along the normal, as (along i, along j) in mm/mm.

        Zero for an ordinary stack; ``tan(tilt)`` in size for a gantry-tilted series.
        """
        if len(self.slice_origins_mm) < 2:
            return np.zeros(2)
        d = self.slice_origins_mm - self.slice_origins_mm[0]
        t = self.slice_offsets_mm
        # Least-squares slope of in-plane drift against normal offset (robust to gaps).
        inplane = np.stack([d @ self.row_direction, d @ self.column_direction], axis=1)
        return inplane.T @ t / float(t @ t)

    @property
    def is_sheared(self):
        return bool(np.linalg.norm(self.shear_per_mm) > _SHEAR_TOL)

    @property
    def tilt_deg(self):
        """Angle between the slice step and the slice normal (gantry tilt), degrees."""
        return float(np.degrees(np.arctan(np.linalg.norm(self.shear_per_mm))))

    @property
    def is_regular(self):
        """True when slice origins lie on one line with equal steps (an affine index->LPS map)."""
        if len(self.slice_origins_mm) < 3:
            return True
        d = np.diff(self.slice_origins_mm, axis=0)
        return bool(np.max(np.linalg.norm(d - d.mean(axis=0), axis=1)) <= _STEP_RTOL * np.linalg.norm(d[0]))

    @property
    def world_normal(self):
        """Unit slice normal in patient space, the registration ``transform`` applied; shape (3,)."""
        n = self.transform[:3, :3] @ self.normal
        return n / np.linalg.norm(n)

    @property
    def orientation(self):
        """'axial', 'coronal', 'sagittal' or 'oblique', from the slice normal (after registration)."""
        return orientation_label(self.world_normal)

    @property
    def n_voxels(self):
        return int(self.pixels.size)

    # ---------------------------------------------------------------------------- index <-> LPS
    def _origin_at(self, k):
        """Slice origin at continuous slice index k (linear between slices, extrapolated outside)."""
        k = np.asarray(k, dtype=float)
        n = len(self.slice_origins_mm)
        if n == 1:
            return self.slice_origins_mm[0] + k[..., None] * self.thickness_mm * self.normal
        k0 = np.clip(np.floor(k), 0, n - 2).astype(int)
        f = (k - k0)[..., None]
        o = self.slice_origins_mm
        return o[k0] * (1 - f) + o[k0 + 1] * f

    def index_to_scanner(self, k, j, i):
        """Scanner-space LPS (mm) of continuous indices; arrays broadcast; returns shape (..., 3)."""
        j = np.asarray(j, dtype=float)[..., None]
        i = np.asarray(i, dtype=float)[..., None]
        di, dj = self.pixel_spacing_mm
        return self._origin_at(k) + i * di * self.row_direction + j * dj * self.column_direction

    def index_to_physical(self, k, j, i):
        """Patient-space LPS (mm, registration applied) of continuous indices; shape (..., 3)."""
        return apply_matrix(self.transform, self.index_to_scanner(k, j, i))

    def physical_to_index(self, points):
        """Continuous (k, j, i) of patient-space LPS points; inverse of :meth:`index_to_physical`.

        ``points`` has shape (..., 3); returns three arrays of shape (...). Outside the slice range,
        ``k`` is extrapolated with the first/last step.
        """
        p = apply_matrix(np.linalg.inv(self.transform), points)
        t = (p - self.slice_origins_mm[0]) @ self.normal
        offsets = self.slice_offsets_mm
        n = len(offsets)
        if n == 1:
            k = t / self.thickness_mm
        else:
            k = np.interp(t, offsets, np.arange(n, dtype=float))
            lo = t < offsets[0]
            hi = t > offsets[-1]
            k = np.where(lo, (t - offsets[0]) / (offsets[1] - offsets[0]), k)
            k = np.where(hi, n - 1 + (t - offsets[-1]) / (offsets[-1] - offsets[-2]), k)
        r = p - self._origin_at(k)
        di, dj = self.pixel_spacing_mm
        return k, (r @ self.column_direction) / dj, (r @ self.row_direction) / di

    def ijk_to_lps_affine(self):
        """4x4 affine from (i, j, k, 1) to patient LPS for a regular stack (may be non-orthogonal).

        Raises InputError for a stack with irregular slice steps, which has no affine.
        """
        if not self.is_regular:
            raise InputError(f"'{self.description or self.source}' has irregular slice gaps; no affine")
        di, dj = self.pixel_spacing_mm
        o = self.slice_origins_mm
        step = (o[-1] - o[0]) / (len(o) - 1) if len(o) > 1 else self.thickness_mm * self.normal
        m = np.eye(4)
        m[:3, 0] = self.row_direction * di
        m[:3, 1] = self.column_direction * dj
        m[:3, 2] = step
        m[:3, 3] = o[0]
        return self.transform @ m

    def corners_mm(self):
        """Patient LPS of the 8 outer corners of the sampled region (pixel edges, first/last slice
        +- half a step); shape (8, 3)."""
        nk, nj, ni = self.shape
        half_k = 0.5 * self.thickness_mm / self.slice_step_mm if nk == 1 else 0.5
        ks = np.array([-half_k, nk - 1 + half_k])
        js = np.array([-0.5, nj - 0.5])
        is_ = np.array([-0.5, ni - 0.5])
        kk, jj, ii = np.meshgrid(ks, js, is_, indexing="ij")
        return self.index_to_physical(kk.ravel(), jj.ravel(), ii.ravel())

    def with_transform(self, transform):
        """A copy sharing the pixels, with another registration transform."""
        return replace(self, transform=np.asarray(transform, dtype=float))

    def summary(self):
        """A dict of the facts `inspect` prints and `--json` records."""
        steps = self.slice_steps_mm
        return {
            "description": self.description,
            "source": self.source,
            "modality": self.modality,
            "acquisition": self.acquisition or None,
            "orientation": self.orientation,
            "matrix": [int(self.shape[2]), int(self.shape[1]), int(self.shape[0])],
            "pixel_spacing_mm": [round(v, 6) for v in self.pixel_spacing_mm],
            "thickness_mm": round(self.thickness_mm, 6),
            "slice_step_min_mm": round(float(steps.min()), 4) if len(steps) else None,
            "slice_step_max_mm": round(float(steps.max()), 4) if len(steps) else None,
            "gaps": self.has_gaps,
            "sheared": self.is_sheared,
            "tilt_deg": round(self.tilt_deg, 3),
            "series_uid": self.series_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
        }


def stack_from_affine(pixels, affine_ijk_to_lps, thickness_mm=None, **kwargs):
    """Build a stack from a ``[k, j, i]`` array and a 4x4 (i, j, k) -> LPS affine.

    The affine's first two columns give the in-plane axes and spacings; its third column is the slice
    step, which need not be along the normal (that is a sheared stack).
    """
    a = np.asarray(affine_ijk_to_lps, dtype=float)
    di = float(np.linalg.norm(a[:3, 0]))
    dj = float(np.linalg.norm(a[:3, 1]))
    row, col = a[:3, 0] / di, a[:3, 1] / dj
    nk = np.asarray(pixels).shape[0]
    normal = np.cross(row, col)
    step = a[:3, 2]
    if float(step @ normal) < 0:  # keep the offsets increasing along row x column
        pixels = np.asarray(pixels)[::-1]
        origin = a[:3, 3] + (nk - 1) * step
        step = -step
    else:
        origin = a[:3, 3]
    origins = origin[None, :] + np.arange(nk)[:, None] * step[None, :]
    if thickness_mm is None:
        thickness_mm = abs(float(step @ normal)) if nk > 1 else float(np.linalg.norm(step))
    return Stack(pixels, origins, row, col, (di, dj), thickness_mm, **kwargs)


def check_reference(stacks, reference):
    """Raise InputError unless ``reference`` indexes one of ``stacks`` (the grid axes, registration target)."""
    if not 0 <= reference < len(stacks):
        raise InputError(f"reference stack {reference} does not exist (there are {len(stacks)} stacks)")


def scanner_centre_mm(stack):
    """Scanner-space centre of a stack's sampled region (mean of its 8 corners), shape (3,)."""
    return stack.with_transform(np.eye(4)).corners_mm().mean(axis=0)
