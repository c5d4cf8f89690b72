"""The realistic benchmark panel: cases, simulation from a truth volume, position check, scoring.

Every case is a truth volume on a grid and three (or, for the real case, the real three) series read back
from files the way a user's series are read. Truths:

- ``philips``: the real 1 mm Philips axial series of ../shared/data (a plastic skull with the scanner's
  own blur and noise), cropped in-plane to the skull (pixels i 70-449, j 40-469 of 512, all 140 slices:
  the curved head holder around it is left out) and averaged over 2 x 2 pixel blocks: 0.902 x 0.902 x
  1.0 mm, 140 x 215 x 190 = 5.7 M voxels. Series are simulated from it by exact continuous integration of
  the linearly interpolated truth over a centred slice profile (box or Gaussian, FWHM = thickness), in-plane
  on the truth's own lattice (its blur stands for the scanner's), then white noise.
- ``phantom``: the analytic head phantom of ``MultiPlaneFusionLib.simulation`` (scale ``PHANTOM_SCALE``),
  voxel-averaged on a 0.9 mm grid; its series come from the library's analytic simulator (no voxel
  grid involved, 0.8 mm pixels).
- ``real``: the real Philips 5 mm axial and both gantry-tilted series, scored against the ``philips``
  truth (the 1 mm series on the same grid); registration on (they come from two studies ~1 mm apart).

Series are written as DICOM (with SliceThickness) or as NRRD (no thickness record: the reader then takes
the slice step as the thickness) and read back with ``read_stacks``. Each simulated series is checked to
sit where its header says (:func:`position_error`: a sub-voxel shift fitted against the truth must stay
below ``POSITION_TOLERANCE_MM``).

Reconstructions run through the user's path, ``fuse_stacks(read_stacks(paths), FuseOptions(grid=truth
grid, register=...))`` (the CLI's ``fuse --grid-like TRUTH --no-register``). Scores inside the object
(truth > -500 HU for the Philips truth, > -900 HU for the phantom) in the grid minus ``SCORE_MARGIN_MM``
at every face, the holes of every axial slice filled (the hollow plastic skull's inside counts; the head
holder of the Philips series is left out of every score, see :func:`holder_region`): PSNR (dB,
``metrics.psnr``: the truth's range inside the mask), correlation, and the symmetric vertex-to-surface
distance between the 300 HU isosurfaces (mean, p95, mm; the definition of ``metrics.surface_distance``).
Baselines per case: every single series resampled with B-spline, and the average fusion.

PSNR here is lower than on a patient's head for the same blur: the plastic skull is hollow (air inside,
no brain), so most of the object is a 1700 HU air-to-plastic edge. Compare methods within a case.

Use::

    import panel
    rows = panel.run_panel({"default": {}, "tikhonov": {"regularizer": "tikhonov"},
                            "auto-psf": {"psf": "auto"}, "avg-bspline": {"method": "average",
                                                                         "interpolation": "bspline"}})
    panel.print_panel(rows)

An option set is a flat dict: keys that are ``FuseOptions`` fields go there, every other key is passed to
``SrrOptions`` unchanged (so new settings work without touching this file). ``cases`` selects cases by
name (see ``CASES``). ``benchmarks/bench_panel.py`` is the command line (``--sweep``, ``--model``).
"""

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cache_dir, extract_series  # noqa: E402

from MultiPlaneFusionLib import metrics  # noqa: E402
from MultiPlaneFusionLib.grid import Grid  # noqa: E402
from MultiPlaneFusionLib.pipeline import FuseOptions, fuse_stacks  # noqa: E402
from MultiPlaneFusionLib.reading import read_stacks, stack_to_image  # noqa: E402
from MultiPlaneFusionLib.sampling.resample import resample_stack  # noqa: E402
from MultiPlaneFusionLib.stack import Stack  # noqa: E402

PANEL_VERSION = 1  # bump when the simulation changes: cached series are keyed by it
BONE_HU = 300.0
BACKGROUND_HU = -1024.0
POSITION_TOLERANCE_MM = 0.05
SCORE_MARGIN_MM = 3.0
PHILIPS_CROP_PX = {"i": (70, 450), "j": (40, 470)}  # of the 512 x 512 1 mm series, before 2 x 2 blocks
PHILIPS_BLOCK = 2  # the panel's Philips truth: 2 x 2 pixel blocks (0.902 mm); 1 keeps the 0.451 mm pixels
PHANTOM_SCALE = 0.8
PHANTOM_SPACING_MM = 0.9
PHANTOM_PIXEL_MM = 0.8
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_FUSE_FIELDS = {f.name for f in dataclasses.fields(FuseOptions)}


# ----------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One panel case: a truth and three simulated series (or the real series for truth 'real')."""

    name: str
    truth: str  # 'philips', 'phantom' or 'real'
    profile: str = "box"  # 'box' or 'gaussian' (FWHM = thickness)
    thickness_mm: float = 4.0
    step_mm: float = 4.0
    noise_hu: float = 15.0
    fmt: str = "dicom"  # 'dicom' (with SliceThickness) or 'nrrd' (no thickness)
    seed: int = 0
    truth_block: int = 2  # philips: in-plane block of the 1 mm series' pixels averaged into one truth pixel

    @property
    def register(self):
        return self.truth == "real"

    @property
    def simulated(self):
        return self.truth != "real"

    def key(self):
        fields = dataclasses.asdict(self)
        if fields["truth_block"] == PHILIPS_BLOCK:  # the keys (series caches) of the panel's own cases unchanged
            del fields["truth_block"]
        text = json.dumps([PANEL_VERSION, fields, PHILIPS_CROP_PX, PHANTOM_SCALE,
                           PHANTOM_SPACING_MM, PHANTOM_PIXEL_MM], sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


CASES = [
    # Three held-out-like cases (4 mm box, 3 mm box without a thickness tag, 5 mm Gaussian) on the 1 mm truth.
    Case("P 4mm/4 box 15HU dcm", "philips", "box", 4.0, 4.0, 15.0, "dicom", 11),
    Case("P 3mm/2.5 box 25HU nrrd", "philips", "box", 3.0, 2.5, 25.0, "nrrd", 12),
    Case("P 5mm/4 gauss 20HU dcm", "philips", "gaussian", 5.0, 4.0, 20.0, "dicom", 13),
    Case("P 5mm/5 gauss 10HU nrrd", "philips", "gaussian", 5.0, 5.0, 10.0, "nrrd", 14),
    # The analytic phantom (hard-edged bone of 1000+ HU).
    Case("A 4mm/3 gauss 5HU nrrd", "phantom", "gaussian", 4.0, 3.0, 5.0, "nrrd", 15),
    Case("A 3mm/3 box 30HU dcm", "phantom", "box", 3.0, 3.0, 30.0, "dicom", 16),
    # The real 5 mm axial + gantry-tilted series against the real 1 mm series.
    Case("R 5mm + tilts (real)", "real"),
]


def get_cases(names=None):
    """The cases named in ``names`` (exact names, or substrings), all when None."""
    if not names:
        return list(CASES)
    out = []
    for n in names:
        hit = [c for c in CASES if c.name == n] or [c for c in CASES if n.lower() in c.name.lower()]
        if not hit:
            raise KeyError(f"no panel case matches '{n}'")
        out.extend(c for c in hit if c not in out)
    return out


# ---------------------------------------------------------------------------------------------- truths
_TRUTHS = {}


def block_means(pixels, block):
    """``pixels`` (slices, rows, columns) averaged over ``block`` x ``block`` in-plane blocks (the rows and columns
    beyond the last whole block dropped), float32."""
    nk, nj, ni = pixels.shape
    p = pixels[:, :nj // block * block, :ni // block * block].astype(np.float64)
    return p.reshape(nk, nj // block, block, ni // block, block).mean(axis=(2, 4)).astype(np.float32)


def philips_truth(block=PHILIPS_BLOCK):
    """(volume, grid): the real 1 mm series cropped to the skull, ``block`` x ``block`` in-plane block means
    (see top; 1: the series' own 0.451 mm pixels)."""
    key = "philips" if block == PHILIPS_BLOCK else f"philips{block}"
    if key not in _TRUTHS:
        (s,) = read_stacks([extract_series("philips_axial_1mm")])
        (i0, i1), (j0, j1) = PHILIPS_CROP_PX["i"], PHILIPS_CROP_PX["j"]
        v = block_means(s.pixels[:, j0:j1, i0:i1], block)
        di, dj = s.pixel_spacing_mm
        d = np.stack([s.row_direction, s.column_direction, s.normal], axis=1)
        half = (block - 1) / 2.0  # a block's centre, in the series' pixels from its first one
        origin = (s.slice_origins_mm[0] + (i0 + half) * di * s.row_direction
                  + (j0 + half) * dj * s.column_direction)
        grid = Grid(shape=v.shape, spacing_mm=(block * di, block * dj, s.slice_step_mm),
                    origin_mm=tuple(float(x) for x in origin), direction=tuple(float(x) for x in d.ravel()))
        _TRUTHS[key] = (v, grid)
    return _TRUTHS[key]


def phantom_truth_volume():
    """(volume, grid): the analytic phantom voxel-averaged (2^3 sub-points) on its 0.9 mm grid."""
    if "phantom" not in _TRUTHS:
        from MultiPlaneFusionLib.simulation import phantom_grid, phantom_truth

        grid = phantom_grid(PHANTOM_SPACING_MM, PHANTOM_SCALE)
        _TRUTHS["phantom"] = (phantom_truth(grid, PHANTOM_SCALE, supersample=2), grid)
    return _TRUTHS["phantom"]


def truth_for(case):
    return phantom_truth_volume() if case.truth == "phantom" else philips_truth(case.truth_block)


def holder_region(volume, grid, dilate_mm=3.0):
    """Voxels within ``dilate_mm`` of the head holder: the parts above 200 HU that are not the skull (the
    largest connected piece) and touch the crop's left, right or posterior face."""
    lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((volume > 200).astype(np.uint8)),
                                                         True))
    sizes = np.bincount(lab.ravel())
    if len(sizes) < 3:
        return np.zeros(volume.shape, dtype=bool)
    skull = int(np.argmax(sizes[1:])) + 1
    touching = set(np.unique(lab[:, :, 0])) | set(np.unique(lab[:, :, -1])) | set(np.unique(lab[:, -1, :]))
    touching -= {0, skull}
    holder = np.isin(lab, sorted(touching)).astype(np.uint8)
    radius = [int(math.ceil(dilate_mm / s)) for s in grid.spacing_mm]
    return sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(holder), radius)) > 0


def scored_region(case):
    """Voxels of the truth grid that are scored at all (the Philips truth: all but the head holder)."""
    truth, grid = truth_for(case)
    if case.truth == "phantom":
        return None
    key = f"region{case.truth_block}"
    if key not in _TRUTHS:
        _TRUTHS[key] = ~holder_region(truth, grid)
    return _TRUTHS[key]


def object_threshold(case):
    """HU above which a truth voxel is inside the scored object."""
    return -900.0 if case.truth == "phantom" else -500.0


# ---------------------------------------------------------------------------------- slice-profile kernels
def _lambda_cdf(x):
    """Integral of the linear-interpolation hat Lambda from -inf to x."""
    x = np.clip(np.asarray(x, dtype=float), -1.0, 1.0)
    return np.where(x < 0, 0.5 * (x + 1) ** 2, 1.0 - 0.5 * (1 - x) ** 2)


def _gauss_ramp(a, sigma):
    """E[max(S - a, 0)] for S ~ N(0, sigma^2)."""
    z = np.asarray(a, dtype=float) / sigma
    phi = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    return sigma * phi - np.asarray(a, dtype=float) * (1.0 - cdf)


def profile_kernel(d, profile, width_vox):
    """Weight of truth sample ``n`` for a slice centred at ``u``, at offsets ``d = n - u`` (voxels).

    The exact integral of the linearly interpolated truth against the slice profile: ``K(d) = int p(s)
    Lambda(s - d) ds`` with ``p`` a box of ``width_vox`` or a Gaussian of FWHM ``width_vox`` ('point':
    ``p`` a delta, i.e. linear interpolation). ``K`` is even in ``d``, so the slice is centred on ``u``
    for any ratio of thickness to truth spacing (no half-voxel shift as with an even-length box filter).
    """
    d = np.asarray(d, dtype=float)
    if profile == "point" or width_vox <= 0:
        return np.maximum(0.0, 1.0 - np.abs(d))
    if profile == "box":
        w = float(width_vox)
        return (_lambda_cdf(0.5 * w - d) - _lambda_cdf(-0.5 * w - d)) / w
    if profile == "gaussian":
        sigma = float(width_vox) / _FWHM_PER_SIGMA
        return _gauss_ramp(d - 1, sigma) - 2 * _gauss_ramp(d, sigma) + _gauss_ramp(d + 1, sigma)
    raise ValueError(f"profile must be box, gaussian or point, not '{profile}'")


def kernel_radius_vox(profile, width_vox):
    if profile == "gaussian":
        return 4.0 * width_vox / _FWHM_PER_SIGMA + 1.0
    return 0.5 * width_vox + 1.0


def sampling_matrix(positions_vox, n, profile, width_vox, kernel=None):
    """Dense (len(positions), n) weights: row m integrates a 1-D signal of ``n`` samples around
    ``positions_vox[m]``; samples beyond the ends are the end samples (edge replicated); rows sum to 1.
    ``kernel(d, profile, width_vox)`` replaces :func:`profile_kernel` (tests use a shifted one)."""
    kernel = kernel or profile_kernel
    r = kernel_radius_vox(profile, width_vox)
    w = np.zeros((len(positions_vox), n))
    for m, u in enumerate(positions_vox):
        taps = np.arange(int(math.floor(u - r)), int(math.ceil(u + r)) + 1)
        k = kernel(taps - u, profile, width_vox)
        np.add.at(w[m], np.clip(taps, 0, n - 1), k)
    return w / w.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------ simulation from a volume
def _axis_of(grid, v):
    """(grid axis 0=i/1=j/2=k, sign) parallel to LPS direction ``v``; ValueError if none is."""
    c = grid.direction_matrix.T @ np.asarray(v, dtype=float)
    a = int(np.argmax(np.abs(c)))
    if abs(abs(c[a]) - 1.0) > 1e-6:
        raise ValueError("series axes must be parallel to the truth grid's axes")
    return a, (1 if c[a] > 0 else -1)


def slice_positions_vox(n_vox, spacing_mm, step_mm, offset_vox=0.0):
    """Slice centres (truth voxel units, increasing) spanning the truth's extent, centred on it."""
    length = (n_vox - 1) * spacing_mm
    n = int(math.floor(length / step_mm + 1e-9)) + 1
    return 0.5 * (n_vox - 1) + offset_vox + (np.arange(n) - 0.5 * (n - 1)) * (step_mm / spacing_mm)


def simulate_from_volume(volume, grid, orientation, thickness_mm, step_mm, profile="box", noise_hu=0.0,
                         seed=0, offset_vox=0.0, kernel=None, description=None, study_uid=None,
                         frame_of_reference_uid=None):
    """One thick-slice series of a truth volume, its slices parallel to one of the grid's planes.

    Parameters
    ----------
    volume : ndarray, shape grid.shape
        Truth (HU).
    grid : Grid
        Its grid; the series' row, column and normal must be parallel to grid axes.
    orientation : {'axial', 'coronal', 'sagittal'}
        DICOM standard orientation (coronal: row +x, column -z; sagittal: row +y, column -z).
    thickness_mm, step_mm : float
        Slice profile width (box width or Gaussian FWHM) and slice step along the normal.
    profile : {'box', 'gaussian'}
    noise_hu : float
        Standard deviation of white Gaussian noise added to every pixel.
    offset_vox : float
        Extra offset of the slice lattice along the normal, truth voxels.
    kernel : callable, optional
        Replaces :func:`profile_kernel` (a deliberately wrong kernel for the negative control of tests).

    Returns
    -------
    Stack
        Pixels on the truth's in-plane lattice; slice ``m`` is the exact integral of the linearly
        interpolated truth over the profile centred on the slice position its header gives.
    """
    row, col = (np.asarray(v, dtype=float) for v in ORIENTATIONS[orientation])
    normal = np.cross(row, col)
    (ar, sr), (ac, sc), (an, sn) = _axis_of(grid, row), _axis_of(grid, col), _axis_of(grid, normal)
    sp = np.asarray(grid.spacing_mm, dtype=float)
    n_ax = np.asarray(grid.shape[::-1])  # sizes along grid axes i, j, k
    u = slice_positions_vox(int(n_ax[an]), sp[an], float(step_mm), offset_vox)
    if sn < 0:
        u = u[::-1]  # slices ordered along the series normal
    w = sampling_matrix(u, int(n_ax[an]), profile, float(thickness_mm) / sp[an], kernel).astype(np.float32)
    ax = 2 - an  # numpy axis of grid axis an
    out = np.moveaxis(np.tensordot(w, np.asarray(volume, dtype=np.float32), axes=([1], [ax])), 0, ax)
    pix = np.transpose(out, (2 - an, 2 - ac, 2 - ar))
    if sc < 0:
        pix = pix[:, ::-1, :]
    if sr < 0:
        pix = pix[:, :, ::-1]
    pix = np.ascontiguousarray(pix, dtype=np.float32)
    if noise_hu:
        pix += np.float32(noise_hu) * np.random.default_rng(seed).standard_normal(pix.shape, dtype=np.float32)
    origins = []
    for uk in u:
        c = np.zeros(3)
        c[an] = uk
        c[ar] = 0.0 if sr > 0 else n_ax[ar] - 1
        c[ac] = 0.0 if sc > 0 else n_ax[ac] - 1
        origins.append(grid.index_to_physical(c[2], c[1], c[0]))
    return Stack(
        pixels=pix, slice_origins_mm=np.array(origins), row_direction=row, column_direction=col,
        pixel_spacing_mm=(sp[ar], sp[ac]), thickness_mm=float(thickness_mm), modality="CT",
        description=description or f"SIM {orientation.upper()} {thickness_mm:g}MM",
        study_uid=study_uid or generate_uid(), series_uid=generate_uid(),
        frame_of_reference_uid=frame_of_reference_uid or generate_uid(), source="simulated",
    )


def simulate_case_stacks(case):
    """The three simulated series of ``case`` (axial, coronal, sagittal), in memory."""
    study, frame = generate_uid(), generate_uid()
    stacks = []
    for n, o in enumerate(("axial", "coronal", "sagittal")):
        desc = f"PANEL {o.upper()} {case.thickness_mm:g}MM {case.profile.upper()}"
        if case.truth == "phantom":
            from MultiPlaneFusionLib.simulation import simulate_stack

            s = simulate_stack(o, thickness_mm=case.thickness_mm, slice_step_mm=case.step_mm,
                               pixel_spacing_mm=PHANTOM_PIXEL_MM, scale=PHANTOM_SCALE, profile=case.profile,
                               noise_hu=case.noise_hu, seed=case.seed * 10 + n, description=desc,
                               study_uid=study, frame_of_reference_uid=frame)
        else:
            vol, grid = philips_truth(case.truth_block)
            s = simulate_from_volume(vol, grid, o, case.thickness_mm, case.step_mm, case.profile, case.noise_hu,
                                     seed=case.seed * 10 + n, description=desc, study_uid=study,
                                     frame_of_reference_uid=frame)
        stacks.append(s)
    return stacks


def write_series(stack, path, fmt, series_number=1):
    """Write a stack as a DICOM series folder (``fmt='dicom'``) or one NRRD file (no thickness record);
    returns the path to give ``read_stacks``."""
    path = Path(path)
    if fmt == "dicom":
        from MultiPlaneFusionLib.simulation import write_dicom_series

        write_dicom_series(stack, path, series_number=series_number)
        return path
    if fmt == "nrrd":
        path = path.with_suffix(".nrrd")
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(stack_to_image(stack), str(path), True)
        return path
    raise ValueError(f"format must be dicom or nrrd, not '{fmt}'")


def nrrd_header(path):
    """The text header of an NRRD file (up to the blank line)."""
    with open(path, "rb") as f:
        head = f.read(8192)
    return head.split(b"\n\n", 1)[0].decode("latin-1")


def case_paths(case, root=None):
    """Paths of the case's series files (simulated and written once into the cache, then reused)."""
    if case.truth == "real":
        return [extract_series(n) for n in ("philips_axial_5mm", "philips_tilt_minus18", "philips_tilt_plus16")]
    root = Path(root or cache_dir() / "panel") / f"{case.truth}-{case.key()}"
    done = root / ".complete"
    if done.exists():
        return series_paths(root, case.fmt)
    if root.exists():
        shutil.rmtree(root)
    paths = write_case_series(simulate_case_stacks(case), root, case.fmt)
    done.write_text(json.dumps(dataclasses.asdict(case)))
    return paths


def series_paths(root, fmt):
    """Where :func:`write_case_series` puts the axial, coronal and sagittal series under ``root``."""
    suffix = ".nrrd" if fmt == "nrrd" else ""
    return [Path(root) / (n + suffix) for n in ("axial", "coronal", "sagittal")]


def write_case_series(stacks, root, fmt):
    """Write a case's three series (axial, coronal, sagittal order) under ``root``; their paths."""
    paths = series_paths(root, fmt)
    for n, (s, p) in enumerate(zip(stacks, paths)):
        write_series(s, p, fmt, series_number=n + 1)
    return paths


# --------------------------------------------------------------------------------------- position check
def _series_axis_positions(stack, grid):
    """Per stack axis (k, j, i): (grid axis, positions in grid voxel units along it)."""
    d = grid.direction_matrix
    sp = np.asarray(grid.spacing_mm, dtype=float)
    o = np.asarray(grid.origin_mm, dtype=float)
    (ar, _), (ac, _), (an, _) = (_axis_of(grid, stack.row_direction), _axis_of(grid, stack.column_direction),
                                 _axis_of(grid, stack.normal))
    origins = stack.slice_origins_mm
    di, dj = stack.pixel_spacing_mm
    nk, nj, ni = stack.shape

    def coord(points, a):
        return ((np.asarray(points) - o) @ d[:, a]) / sp[a]

    u_k = coord(origins, an)
    u_j = coord(origins[0] + np.arange(nj)[:, None] * dj * stack.column_direction, ac)
    u_i = coord(origins[0] + np.arange(ni)[:, None] * di * stack.row_direction, ar)
    drift = np.abs(coord(origins, ac) - coord(origins[:1], ac)).max() + np.abs(
        coord(origins, ar) - coord(origins[:1], ar)).max()
    if drift > 1e-3:
        raise ValueError("position check needs an unsheared stack whose slices share the in-plane lattice")
    return [(an, u_k), (ac, u_j), (ar, u_i)]


def _transfer(f, profile, width_vox):
    if profile == "box":
        return np.sinc(f * width_vox)
    if profile == "gaussian":
        sigma = width_vox / _FWHM_PER_SIGMA
        return np.exp(-2.0 * (np.pi * sigma * f) ** 2)
    return np.ones_like(f)


def _contract(arr, axes, a, mat):
    """Contract grid axis ``a`` of ``arr`` (whose numpy axes are the grid axes ``axes``) with ``mat``
    (n_out, n); the result's first axis is the new one."""
    out = np.tensordot(mat, arr, axes=([1], [axes.index(a)]))
    return out, [a] + [g for g in axes if g != a]


def position_error(stack, truth, grid, profile, thickness_mm, iterations=4, margin_mm=None):
    """Shift (mm) between where a series' header puts its slices and where its content sits.

    The truth is blurred by the nominal profile along the series' normal and evaluated exactly at the
    pixel centres the header gives, shifted by ``d`` along each of the series' axes, through its Fourier
    series (symmetric padding, a zero-phase transfer function, a direct evaluation at the continuous
    positions: independent of the simulators' spatial kernels and interpolation). Gauss-Newton fits
    ``d`` together with a gain and an offset to the series' pixels (those at least ``margin_mm``, default
    half the thickness + 2 mm, inside the truth's extent). Any symmetric mismatch of blur (scanner
    kernel, interpolation, box against Gaussian) leaves the fitted shift unbiased; a kernel that is not
    centred shows up as its off-centre.

    Returns
    -------
    dict
        ``normal_mm``, ``column_mm``, ``row_mm`` (content minus header along the series' normal, column
        and row), ``shift_mm`` (their norm), ``gain``, ``offset_hu``, ``rms_residual_hu``, ``samples``,
        ``ok`` (shift below POSITION_TOLERANCE_MM).
    """
    sp = np.asarray(grid.spacing_mm, dtype=float)
    axes = _series_axis_positions(stack, grid)
    n_ax = np.asarray(grid.shape[::-1])
    margin_mm = 0.5 * thickness_mm + 2.0 if margin_mm is None else margin_mm
    pad = [int(math.ceil(thickness_mm / sp[a])) + 6 for a in range(3)]  # per grid axis
    widths = []
    for a_np in range(3):  # numpy axis a_np is grid axis 2 - a_np
        a = 2 - a_np
        extra = (grid.shape[a_np] + 2 * pad[a] + 1) % 2  # odd padded length: no Nyquist term
        widths.append((pad[a], pad[a] + extra))
    x = np.pad(np.asarray(truth, dtype=np.float32), widths, mode="symmetric")
    spec = np.fft.fftn(x).astype(np.complex64)
    del x
    # Evaluation matrices per series axis: E[m, f] = H(f) exp(2 pi i f (u_m + pad)) / N.
    mats, keep = [], []
    for s_axis, (a, u) in enumerate(axes):
        n_pad = spec.shape[2 - a]
        f = np.fft.fftfreq(n_pad)
        h = _transfer(f, profile if s_axis == 0 else "point", thickness_mm / sp[a])
        mats.append((a, u + pad[a], f, h / n_pad))
        m = margin_mm / sp[a]
        keep.append((u >= m) & (u <= n_ax[a] - 1 - m))
    y = stack.pixels.astype(np.float64)
    sel = keep[0][:, None, None] & keep[1][None, :, None] & keep[2][None, None, :]
    if not sel.any():
        raise ValueError("no pixel of the series lies inside the truth")
    d = np.zeros(3)
    gain, offset = 1.0, 0.0

    order = [mats[0][0], mats[1][0], mats[2][0]]  # grid axes of the series' (normal, column, row)
    for _ in range(iterations):
        e, de = [], []
        for s_axis, (_a, uu, f, h) in enumerate(mats):
            ph = np.exp(2j * np.pi * np.outer(uu + d[s_axis], f))
            e.append((ph * h[None, :]).astype(np.complex64))
            de.append((ph * (2j * np.pi * f * h)[None, :]).astype(np.complex64))
        # the normal axis first (largest reduction), shared by the model and two derivatives
        y0, ax0 = _contract(spec, [2, 1, 0], order[0], e[0])
        y1, _ = _contract(spec, [2, 1, 0], order[0], de[0])

        def rest(arr, m1, m2, ax0=ax0):
            t, ax = _contract(arr, ax0, order[1], m1)
            t, ax = _contract(t, ax, order[2], m2)
            return np.real(np.transpose(t, [ax.index(g) for g in order]))

        model = rest(y0, e[1], e[2])
        jac = [rest(y1, e[1], e[2]), rest(y0, de[1], e[2]), rest(y0, e[1], de[2])]
        mv = model[sel].astype(np.float64)
        cols = [gain * j[sel].astype(np.float64) for j in jac] + [mv, np.ones_like(mv)]
        jm = np.stack(cols, axis=1)
        r = y[sel] - (gain * mv + offset)
        step = np.linalg.lstsq(jm, r, rcond=None)[0]
        d += step[:3]
        gain += step[3]
        offset += step[4]
        if np.max(np.abs(step[:3])) < 1e-5:
            break
    res = y[sel] - (gain * mv + offset)
    mm = [d[s] * sp[axes[s][0]] for s in range(3)]
    # d moves the evaluation along +grid axis; express along the series' own directions
    signs = [_axis_of(grid, v)[1] for v in (stack.normal, stack.column_direction, stack.row_direction)]
    normal_mm, column_mm, row_mm = (mm[s] * signs[s] for s in range(3))
    shift = float(np.sqrt(normal_mm**2 + column_mm**2 + row_mm**2))
    return {"normal_mm": float(normal_mm), "column_mm": float(column_mm), "row_mm": float(row_mm),
            "shift_mm": shift, "gain": float(gain), "offset_hu": float(offset),
            "rms_residual_hu": float(np.sqrt(np.mean(res**2))), "samples": int(sel.sum()),
            "ok": bool(shift <= POSITION_TOLERANCE_MM)}


def check_case_positions(case, stacks=None):
    """:func:`position_error` of each series of a simulated case as read back from its files."""
    truth, grid = truth_for(case)
    cached = None
    if stacks is None:
        paths = case_paths(case)
        cached = Path(paths[0]).parent / "positions.json"
        if cached.exists():
            return json.loads(cached.read_text())
        stacks = read_stacks(paths)
    out = [{"series": s.description, "thickness_read_mm": s.thickness_mm,
            **position_error(s, truth, grid, case.profile, case.thickness_mm)} for s in stacks]
    if cached is not None:
        cached.write_text(json.dumps(out))
    return out


# --------------------------------------------------------------------------------------------- scoring
def filled_mask(mask):
    """``mask`` with the holes of every axial slice (numpy axis 0) filled: the inside of a hollow skull."""
    out = np.empty_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        out[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(mask[k].astype(np.uint8)))) > 0
    return out


class SurfaceDistance:
    """:func:`MultiPlaneFusionLib.metrics.surface_distance` against one fixed reference surface, faster:
    the same symmetric vertex-to-surface distances (exact closest points on the triangles), found with
    static cell locators (the reference's built once) instead of vtkDistancePolyDataFilter's."""

    def __init__(self, reference):
        self.reference = reference
        self.locator = self._locator(reference)

    @staticmethod
    def _locator(poly):
        import vtk

        loc = vtk.vtkStaticCellLocator()
        loc.SetDataSet(poly)
        loc.BuildLocator()
        return loc

    @staticmethod
    def _one_way(points_poly, locator):
        import vtk
        from vtk.util import numpy_support

        pts = numpy_support.vtk_to_numpy(points_poly.GetPoints().GetData()).astype(float).tolist()
        out = np.empty(len(pts))
        cp, cid, sid, d2 = [0.0, 0.0, 0.0], vtk.reference(0), vtk.reference(0), vtk.reference(0.0)
        find = locator.FindClosestPoint
        for n, p in enumerate(pts):
            find(p, cp, cid, sid, d2)
            out[n] = float(d2)
        return np.sqrt(out)

    def __call__(self, test):
        if min(test.GetNumberOfCells(), self.reference.GetNumberOfCells()) == 0:
            return {"mean": float("inf"), "p95": float("inf"), "max": float("inf"), "n": 0}
        d = np.concatenate([self._one_way(test, self.locator), self._one_way(self.reference, self._locator(test))])
        return {"mean": float(d.mean()), "p95": float(np.percentile(d, 95)), "max": float(d.max()), "n": int(d.size)}


class Scorer:
    """Scores volumes on a truth grid: inside the object, away from the grid's faces (see top)."""

    def __init__(self, truth, grid, object_hu, margin_mm=SCORE_MARGIN_MM, region=None):
        sp = np.asarray(grid.spacing_mm, dtype=float)
        m = [int(math.ceil(margin_mm / sp[2 - a])) for a in range(3)]  # per numpy axis
        self.box = tuple(slice(m[a], grid.shape[a] - m[a]) for a in range(3))
        origin = grid.index_to_physical(m[0], m[1], m[2])
        shape = tuple(grid.shape[a] - 2 * m[a] for a in range(3))
        self.grid = Grid(shape=shape, spacing_mm=grid.spacing_mm, origin_mm=tuple(float(v) for v in origin),
                         direction=grid.direction)
        self.full_grid = grid
        # Outside ``region`` (e.g. the head holder) every volume is set to air: no surface, no score there.
        self.region = None if region is None else np.ascontiguousarray(region[self.box])
        self.truth = self._restrict(truth)
        self.mask = filled_mask(self.truth > object_hu)
        self.surface = metrics.iso_surface(self.truth, BONE_HU, self.grid)
        self.distance = SurfaceDistance(self.surface)

    def _restrict(self, volume):
        v = np.array(np.asarray(volume)[self.box], dtype=np.float32)
        if self.region is not None:
            v[~self.region] = BACKGROUND_HU
        return v

    def __call__(self, volume):
        v = self._restrict(volume)
        d = self.distance(metrics.iso_surface(v, BONE_HU, self.grid))
        return {"psnr_db": metrics.psnr(v, self.truth, self.mask),
                "correlation": metrics.correlation(v, self.truth, self.mask),
                "dice": metrics.dice(v > BONE_HU, self.truth > BONE_HU),
                "surface_mean_mm": d["mean"], "surface_p95_mm": d["p95"]}


# ---------------------------------------------------------------------------------------------- runner
def hybrid_scaled(factor):
    """Overrides of the default hybrid prior with both of its shares (Tikhonov and Huber) scaled by ``factor``."""
    from MultiPlaneFusionLib.reconstruction.options import DEFAULT_ALPHA, DEFAULT_HUBER_ALPHA

    return {"regularizer": "hybrid", "alpha": round(DEFAULT_ALPHA["hybrid"] * factor, 6),
            "huber_alpha": round(DEFAULT_HUBER_ALPHA * factor, 6)}


def split_options(overrides):
    """(FuseOptions keyword arguments, SrrOptions keyword arguments) of a flat option set."""
    fuse = {k: v for k, v in overrides.items() if k in _FUSE_FIELDS and k != "srr"}
    srr = {k: v for k, v in overrides.items() if k not in _FUSE_FIELDS}
    srr.update(overrides.get("srr") or {})
    return fuse, srr


def fuse_options(overrides, grid, register):
    """The FuseOptions of an option set on ``grid`` (the CLI's ``--grid-like``)."""
    from MultiPlaneFusionLib.reconstruction.options import SrrOptions

    fuse, srr = split_options(overrides)
    fuse.setdefault("method", "srr")
    fuse.setdefault("register", register)
    return FuseOptions(grid=grid, srr=SrrOptions(**srr) if fuse["method"] == "srr" else None, **fuse)


def _small_info(info):
    """The JSON-friendly, small part of a reconstruction's info dict."""
    out = {}
    for k, v in (info or {}).items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple, dict)) and len(json.dumps(v, default=str)) < 4000:
            out[k] = json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return out


def run_fusion(paths, grid, overrides, register):
    """(volume, seconds, summary) of one fusion through the user's path; seconds exclude reading."""
    stacks = read_stacks(paths)
    opts = fuse_options(overrides, grid, register)
    t = time.perf_counter()
    result = fuse_stacks(stacks, opts)
    seconds = time.perf_counter() - t
    return sitk.GetArrayFromImage(result.image), seconds, result


class PreparedCase:
    """A case ready to run: its series' paths, truth, grid and scorer."""

    def __init__(self, case, check_positions=True, log=print):
        self.case = case
        t = time.perf_counter()
        self.paths = case_paths(case)
        self.truth, self.grid = truth_for(case)
        self.scorer = Scorer(self.truth, self.grid, object_threshold(case), region=scored_region(case))
        self.positions = check_case_positions(case) if (check_positions and case.simulated) else []
        self.prepare_s = time.perf_counter() - t
        for p in self.positions:
            log(f"  position {p['series']}: normal {p['normal_mm']:+.4f} column {p['column_mm']:+.4f} "
                f"row {p['row_mm']:+.4f} mm (|.| {p['shift_mm']:.4f}, {'ok' if p['ok'] else 'FAILED'}), "
                f"thickness read {p['thickness_read_mm']:g} mm")


def baseline_rows(prep, log=print):
    """Rows of the baselines: each single series resampled with B-spline, and the average fusion."""
    rows = []
    vol, t, res = run_fusion(prep.paths, prep.grid, {"method": "average"}, prep.case.register)
    rows.append({"case": prep.case.name, "kind": "baseline", "method": "average", "seconds": t, **prep.scorer(vol)})
    for n, s in enumerate(res.stacks):  # registered stacks when the case registers
        t0 = time.perf_counter()
        v, covered = resample_stack(s, prep.grid, "bspline")
        v[~covered] = BACKGROUND_HU
        rows.append({"case": prep.case.name, "kind": "baseline", "method": f"single {n} {s.description[:22]}",
                     "seconds": time.perf_counter() - t0, **prep.scorer(v)})
    for r in rows:
        log(_row_text(r))
    return rows


def option_row(prep, name, overrides, log=print):
    vol, t, res = run_fusion(prep.paths, prep.grid, overrides, prep.case.register)
    row = {"case": prep.case.name, "kind": "option", "method": name, "seconds": t, **prep.scorer(vol),
           "options": {k: (v if isinstance(v, (bool, int, float, str)) or v is None else str(v))
                       for k, v in overrides.items()},
           "info": _small_info(res.summary.get("reconstruction"))}
    log(_row_text(row))
    return row


def _row_text(r):
    return (f"  {r['case']:<26} {r['method']:<32} PSNR {r['psnr_db']:6.2f}  corr {r['correlation']:.4f}  "
            f"surf {r['surface_mean_mm']:.3f} / {r['surface_p95_mm']:.3f} mm  {r['seconds']:6.1f} s")


def run_panel(option_sets, cases=None, baselines=True, check_positions=True, log=print):
    """Run every option set (name -> flat dict of overrides, see top) on every case.

    Returns
    -------
    list of dict
        One row per (case, method): case, kind ('baseline' | 'option' | 'position'), method, psnr_db,
        correlation, dice, surface_mean_mm, surface_p95_mm, seconds (fusion only), and for option sets
        the options and the reconstruction's info. Position-check rows carry the shifts.
    """
    rows = []
    for case in get_cases(cases) if (cases is None or isinstance(cases[0], str)) else cases:
        log(f"== {case.name}")
        prep = PreparedCase(case, check_positions, log)
        rows.extend({"case": case.name, "kind": "position", **p} for p in prep.positions)
        if baselines:
            rows.extend(baseline_rows(prep, log))
        for name, overrides in option_sets.items():
            rows.append(option_row(prep, name, overrides, log))
    return rows


def summarise(rows):
    """Per (case, option set): difference to the best baseline (PSNR dB) and ratio to its surface mean."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        base = [r for r in rows if r["case"] == case and r["kind"] == "baseline"]
        if not base:
            continue
        best_db = max(r["psnr_db"] for r in base)
        best_mm = min(r["surface_mean_mm"] for r in base)
        for r in rows:
            if r["case"] == case and r["kind"] in ("baseline", "option"):
                r["vs_best_db"] = r["psnr_db"] - best_db
                r["vs_best_surface"] = r["surface_mean_mm"] / best_mm if best_mm > 0 else None
        out.append({"case": case, "best_baseline_db": best_db, "best_baseline_surface_mm": best_mm})
    return out


def table_rows(rows, all_singles=False):
    """The rows printed: per case the best single series (by PSNR), the average, then each option set."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        singles = [r for r in mine if r["kind"] == "baseline" and r["method"].startswith("single")]
        if singles and not all_singles:
            best = max(singles, key=lambda r: r["psnr_db"])
            singles = [{**best, "method": "best single " + best["method"][7:]}]
        out.extend(singles)
        out.extend(r for r in mine if r["kind"] == "baseline" and r["method"] == "average")
        out.extend(r for r in mine if r["kind"] == "option")
    return out


TABLE_COLUMNS = [
    ("case", "case", ""),
    ("method", "method", ""),
    ("psnr_db", "PSNR dB", ".2f"),
    ("correlation", "corr", ".4f"),
    ("surface_mean_mm", "surf mean mm", ".3f"),
    ("surface_p95_mm", "surf p95 mm", ".3f"),
    ("seconds", "time s", ".1f"),
    ("vs_best_db", "vs best dB", "+.2f"),
    ("vs_best_surface", "surf / best", ".2f"),
]


def print_panel(rows, all_singles=False, title="panel"):
    """Print ONE table with every case (see :func:`table_rows`), then the position checks."""
    from common import markdown_table, print_table

    summarise(rows)
    shown = table_rows(rows, all_singles)
    print_table(f"{title} (PSNR / corr inside the object; 300 HU surface distance; vs best = against the best "
                "baseline of the case: PSNR difference, surface ratio)", shown, TABLE_COLUMNS)
    print()
    print(markdown_table(shown, TABLE_COLUMNS))
    pos = [r for r in rows if r["kind"] == "position"]
    if pos:
        print_table("position check (content minus header, mm)", pos,
                    [("case", "case", ""), ("series", "series", ""), ("normal_mm", "normal", "+.4f"),
                     ("column_mm", "column", "+.4f"), ("row_mm", "row", "+.4f"), ("shift_mm", "|shift|", ".4f"),
                     ("thickness_read_mm", "thickness read", "g"), ("ok", "ok", "")])
    return shown
