"""Thick-slice CT acquisitions of the analytic head phantom.

Every pixel is the integral of the ANALYTIC phantom over the pixel footprint and the slice
sensitivity profile, estimated with a stratified set of sub-samples (no voxel grid and none of the
reconstruction's operators are involved, so tests and benchmarks do not commit the "inverse crime").
A mild in-plane Gaussian blur imitates the reconstruction kernel, then white Gaussian noise is added.

Geometry follows :class:`~MultiPlaneFusionLib.stack.Stack`: the centre of pixel ``(k, j, i)`` is
``slice_origins_mm[k] + i * di * row + j * dj * column``; slice ``k`` integrates along the slice normal
``row x column`` around that plane.
"""

import numpy as np
from pydicom.uid import generate_uid

from ..errors import InputError
from ..progress import Monitor
from ..stack import Stack
from ..transforms import apply as apply_matrix
from .phantom import phantom_bounds_mm, phantom_hu_xyz

# Standard DICOM ImageOrientationPatient of untilted series: (row, column) direction cosines.
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# In-plane blur imitating a standard CT reconstruction kernel, FWHM in pixels.
_KERNEL_FWHM_PX = 1.2
# Half span of the sampled Gaussian slice profile, in sigmas (the tails beyond hold 1.2 % of it).
_GAUSS_HALF_SPAN_SIGMA = 2.5
# Plastic-number (R2) low-discrepancy sequence for the in-plane sub-sample offsets.
_PLASTIC = 1.324717957244746


def orientation_frame(orientation="axial", tilt_deg=0.0):
    """Row, column and slice-step directions of a simulated series.

    Parameters
    ----------
    orientation : {'axial', 'coronal', 'sagittal'} or array_like, shape (3, 3)
        A standard plane, or a direction matrix whose columns are row, column and normal (LPS).
    tilt_deg : float
        Gantry tilt: row and column are rotated about the L-R (x) axis by this angle (Philips sign
        convention: an axial series gets column = (0, cos t, sin t)), while the slice step keeps the
        untilted normal (the table direction), which makes the stack sheared.

    Returns
    -------
    row, column, step : ndarray, shape (3,)
        Unit vectors.
    """
    if isinstance(orientation, str):
        key = orientation.lower()
        if key not in ORIENTATIONS:
            raise InputError(f"orientation must be axial, coronal, sagittal or a 3x3 matrix, not '{orientation}'")
        row, col = (np.asarray(v, dtype=float) for v in ORIENTATIONS[key])
    else:
        m = np.asarray(orientation, dtype=float)
        if m.shape != (3, 3) or not np.allclose(m.T @ m, np.eye(3), atol=1e-6):
            raise InputError("an orientation matrix must be 3x3 with orthonormal columns (row, column, normal)")
        row, col = m[:, 0], m[:, 1]
    step = np.cross(row, col)
    tilt = float(tilt_deg)
    if abs(tilt) >= 60.0:
        raise InputError(f"gantry tilt must be below 60 degrees, got {tilt}")
    if tilt:
        c, s = np.cos(np.radians(tilt)), np.sin(np.radians(tilt))
        rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
        row, col = rot @ row, rot @ col
    return row, col, step


def profile_samples(profile, thickness_mm, n):
    """Offsets (mm) along the slice normal and weights of ``n`` sub-planes integrating a slice profile.

    Midpoint rule on equal strata: over the thickness for the box profile; over +-2.5 sigma for the
    Gaussian (FWHM = thickness), weighted by the Gaussian. Equal spacing (rather than equal-weight
    quantiles) keeps the gaps between sub-planes small in the tails too, so an oblique edge does not
    show up as separate ghost copies.

    Returns
    -------
    offsets_mm, weights : ndarray, shape (n,)
        Weights sum to 1.
    """
    strata = (np.arange(n) + 0.5) / n - 0.5
    if profile == "gaussian":
        sigma = thickness_mm / _FWHM_PER_SIGMA
        s = strata * (2 * _GAUSS_HALF_SPAN_SIGMA * sigma)
        w = np.exp(-0.5 * (s / sigma) ** 2)
    elif profile == "box":
        s = strata * thickness_mm
        w = np.ones(n)
    else:
        raise InputError(f"slice profile must be 'gaussian' or 'box', not '{profile}'")
    return s, w / w.sum()


def _subsample_pattern(profile, thickness_mm, n):
    """Sub-sample offsets ``(s_mm, weight, u_px, v_px)``, one per sub-plane: ``s`` across the profile,
    ``(u, v)`` inside the pixel, so ``n`` evaluations integrate pixel area and profile jointly.

    ``n`` is rounded up to even. The sub-planes at ``s`` and ``-s`` (equal weights) get opposite
    in-plane offsets, so the weighted mean offset is exactly zero (no sub-pixel shift of the image);
    the heaviest pairs take the first points of a 2-D low-discrepancy (R2) sequence, a small
    least-norm correction makes the weighted correlation of ``s`` with ``u`` and ``v`` exactly zero
    (the sampled point-spread function is not sheared) and a gain matches the weighted in-plane
    variance to the pixel box's 1/12 px^2 where the offsets stay inside the pixel.
    """
    n += n % 2
    s, w = profile_samples(profile, thickness_mm, n)
    half = n // 2
    lower = np.arange(half)[::-1]  # lower-side member of each pair, heaviest (innermost) first
    seq = np.arange(1, half + 1)  # (the sequence's point 0 is the pixel centre: skip it)
    a = np.stack([np.mod(0.5 + seq / _PLASTIC, 1.0) - 0.5, np.mod(0.5 + seq / _PLASTIC**2, 1.0) - 0.5], axis=1)
    ws = w[lower] * s[lower]
    if np.any(ws):
        a -= np.outer(ws, ws @ a) / float(ws @ ws)
    # Match the weighted second moment of the pixel box (1/12 px^2) where the pixel allows it.
    var = 2 * (w[lower][:, None] * a**2).sum(axis=0)
    gain = np.sqrt(np.divide(1.0 / 12.0, var, out=np.ones(2), where=var > 0))
    a *= np.minimum(gain, 0.5 / np.maximum(np.abs(a).max(axis=0), 1e-12))
    uv = np.zeros((n, 2))
    uv[lower] = a
    uv[n - 1 - lower] = -a
    return s, w, uv[:, 0], uv[:, 1]


def _gaussian_taps(fwhm_px):
    """Normalised 1-D Gaussian kernel (float32) of the given FWHM in pixels, +-3 sigma."""
    sigma = fwhm_px / _FWHM_PER_SIGMA
    r = max(1, int(np.ceil(3 * sigma)))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _blur_slice(image, taps):
    """Separable blur of one 2-D slice along j and i with edges replicated."""
    r = len(taps) // 2
    out = image
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for t, wt in enumerate(taps):
            acc += wt * (p[t : t + n] if axis == 0 else p[:, t : t + n])
        out = acc
    return out


_BOX_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]


def _slab_box_extent(corners, centres, row, col, normal, half_mm):
    """In-plane (i, j) extents, relative to each slice centre, of the box parts inside the slabs.

    The box (8 corners ordered as binary xyz) cut by the slab ``|normal . (p - centre_k)| <= half_mm``
    is a convex polytope; its extremes along row and column are at box corners inside the slab or
    where box edges cross the slab faces. Returns ((i_min, i_max), (j_min, j_max)) over all slices,
    or the whole box's extents when no slab meets it.
    """
    pts = []
    level = corners @ normal  # (8,)
    for c in centres:
        c_level = float(c @ normal)
        inside = np.abs(level - c_level) <= half_mm
        cand = [corners[inside]]
        for a, b in _BOX_EDGES:
            da = level[b] - level[a]
            if abs(da) < 1e-12:
                continue
            for face in (c_level - half_mm, c_level + half_mm):
                t = (face - level[a]) / da
                if 0.0 <= t <= 1.0:
                    cand.append((corners[a] + t * (corners[b] - corners[a]))[None, :])
        p = np.concatenate(cand, axis=0) - c
        if len(p):
            pts.append(np.stack([p @ row, p @ col], axis=1))
    if not pts:
        rel = [(corners - c) @ np.stack([row, col], axis=1) for c in centres]
        pts = rel
    p = np.concatenate(pts, axis=0)
    return (p[:, 0].min(), p[:, 0].max()), (p[:, 1].min(), p[:, 1].max())


def _rigid_inverse(motion):
    m = np.asarray(motion, dtype=float).reshape(4, 4)
    r = m[:3, :3]
    if not np.allclose(r.T @ r, np.eye(3), atol=1e-6) or np.linalg.det(r) <= 0:
        raise InputError("motion must be a rigid 4x4 transform (rotation and translation)")
    return np.linalg.inv(m)


def simulate_stack(
    orientation="axial",
    thickness_mm=4.0,
    slice_step_mm=None,
    pixel_spacing_mm=0.8,
    scale=1.0,
    profile="gaussian",
    noise_hu=15.0,
    seed=0,
    tilt_deg=0.0,
    motion=None,
    slice_offsets_mm=None,
    fov_mm=None,
    description=None,
    subsamples=None,
    study_uid=None,
    frame_of_reference_uid=None,
    monitor=None,
):
    """Simulate one thick-slice CT series of the analytic head phantom.

    Parameters
    ----------
    orientation : {'axial', 'coronal', 'sagittal'} or array_like, shape (3, 3)
        Slice plane: the standard DICOM orientations (axial IOP [1,0,0,0,1,0], coronal
        [1,0,0,0,0,-1], sagittal [0,1,0,0,0,-1]) or a direction matrix with columns row, column,
        normal (oblique series).
    thickness_mm : float
        Slice thickness: FWHM of the Gaussian profile or width of the box profile.
    slice_step_mm : float, optional
        Distance between slice positions along the step direction (default: the thickness).
    pixel_spacing_mm : float or (float, float)
        Pixel spacing along i (row direction) and j (column direction).
    scale : float
        Phantom size factor (1 = adult head).
    profile : {'gaussian', 'box'}
        Slice sensitivity profile along the slice normal.
    noise_hu : float
        Standard deviation of the white Gaussian noise added last, HU.
    seed : int
        Seed of the noise generator.
    tilt_deg : float
        Gantry tilt: image planes rotated about the L-R axis, slice positions still stepping along
        the untilted normal (the table), so the stack is sheared with ``Stack.tilt_deg == |tilt|``.
    motion : array_like, shape (4, 4), optional
        Rigid patient motion in LPS applied before imaging: the material point at ``x`` (phantom
        frame) sits at ``motion @ x`` during this acquisition, so the pixel at scanner position ``p``
        shows the phantom at ``inv(motion) @ p``. The stack's geometry ignores it (transform stays
        the identity); a perfect registration finds ``stack.transform == inv(motion)``.
    slice_offsets_mm : array_like, optional
        Explicit slice positions along the step direction in mm (sorted on output); gives irregular
        gaps. Slice k's plane crosses the step-direction line through the phantom box centre ``c`` at
        ``c + (offsets[k] - c . step) * step``: for an axial series (tilted or not) the plane crosses
        that table line at z = offsets[k]; untilted, it is the plane at distance offsets[k] from the
        origin along the normal. Default: regular steps covering the phantom.
    fov_mm : float or (float, float), optional
        In-plane field of view along (i, j) in mm, centred on the table line through the phantom box
        centre. Default: just covers the (moved) phantom box within every slice's profile.
    description : str, optional
        SeriesDescription (default e.g. 'SIM AXIAL 4MM').
    subsamples : int, optional
        Phantom evaluations per pixel (sub-planes across the profile, each at another in-plane
        offset). Default ``max(8, ceil(4 * thickness_mm))``.
    study_uid, frame_of_reference_uid : str, optional
        Share these between stacks; generated when omitted.
    monitor : progress.Monitor, optional
        Receives ``report("simulate", fraction)`` per slice (and may cancel).

    Returns
    -------
    Stack
        float32 HU pixels ``[k, j, i]``, modality 'CT', new SeriesInstanceUID.
    """
    monitor = Monitor.wrap(monitor)
    thickness_mm = float(thickness_mm)
    if not thickness_mm > 0:
        raise InputError(f"slice thickness must be positive, got {thickness_mm}")
    di, dj = (float(v) for v in np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=float), (2,)))
    if min(di, dj) <= 0:
        raise InputError(f"pixel spacing must be positive, got {pixel_spacing_mm}")
    row, col, step_dir = orientation_frame(orientation, tilt_deg)
    normal = np.cross(row, col)
    lo, hi = phantom_bounds_mm(scale)
    centre = 0.5 * (lo + hi)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    # The default slice range and FOV follow the patient as positioned (moved); the table line
    # stays through the unmoved box centre.
    inv = np.eye(4) if motion is None else _rigid_inverse(motion)
    moved = np.linalg.inv(inv)
    moved_corners = apply_matrix(moved, corners)

    # Slice positions along the step direction (mm from the LPS origin).
    cos_step = float(normal @ step_dir)
    if slice_offsets_mm is None:
        step = thickness_mm if slice_step_mm is None else float(slice_step_mm)
        if not step > 0:
            raise InputError(f"slice step must be positive, got {step}")
        reach = moved_corners @ normal
        s_lo = centre @ step_dir + (reach.min() - centre @ normal) / cos_step
        s_hi = centre @ step_dir + (reach.max() - centre @ normal) / cos_step
        n = int(np.floor((s_hi - s_lo) / step + 1e-9)) + 1
        positions = 0.5 * (s_lo + s_hi) + (np.arange(n) - 0.5 * (n - 1)) * step
    else:
        positions = np.sort(np.asarray(slice_offsets_mm, dtype=float).ravel())
        if positions.size == 0 or np.any(np.diff(positions) <= 0):
            raise InputError("slice_offsets_mm must hold at least one position and no duplicates")
    # Image centres move with the table through the head box centre.
    centres = centre[None, :] + (positions - centre @ step_dir)[:, None] * step_dir[None, :]

    n_sub = int(subsamples) if subsamples else max(8, int(np.ceil(4.0 * thickness_mm)))
    s_mm, weights, u_px, v_px = _subsample_pattern(profile, thickness_mm, n_sub)

    # In-plane field of view (i along row, j along column), relative to each slice's centre.
    if fov_mm is None:
        # The part of the (moved) phantom box each slab sees, so tilted series get no wasted FOV.
        rel_i, rel_j = _slab_box_extent(moved_corners, centres, row, col, normal, float(np.max(np.abs(s_mm))))
        ni = int(np.ceil((rel_i[1] - rel_i[0]) / di)) + 1
        nj = int(np.ceil((rel_j[1] - rel_j[0]) / dj)) + 1
        start_i = 0.5 * (rel_i[0] + rel_i[1]) - 0.5 * (ni - 1) * di
        start_j = 0.5 * (rel_j[0] + rel_j[1]) - 0.5 * (nj - 1) * dj
    else:
        fi, fj = (float(v) for v in np.broadcast_to(np.asarray(fov_mm, dtype=float), (2,)))
        ni, nj = max(1, int(round(fi / di))), max(1, int(round(fj / dj)))
        start_i, start_j = -0.5 * (ni - 1) * di, -0.5 * (nj - 1) * dj
    origins = centres + start_i * row[None, :] + start_j * col[None, :]
    rot, shift = inv[:3, :3], inv[:3, 3]

    # Phantom-frame positions: motion^-1 applied to the in-plane lattice, the sub-sample offsets
    # and the slice origins separately (it is affine), then summed by broadcasting.
    jj, ii = np.meshgrid(np.arange(nj, dtype=float), np.arange(ni, dtype=float), indexing="ij")
    lattice = (ii[..., None] * (di * row) + jj[..., None] * (dj * col)) @ rot.T
    lattice = [lattice[..., d].astype(np.float32) for d in range(3)]  # per LPS axis, (nj, ni)
    sub_off = (u_px[:, None] * di * row + v_px[:, None] * dj * col + s_mm[:, None] * normal) @ rot.T
    origin_ph = origins @ rot.T + shift
    w32 = weights.astype(np.float32)

    taps = _gaussian_taps(_KERNEL_FWHM_PX)
    rng = np.random.default_rng(seed)
    pixels = np.empty((len(positions), nj, ni), dtype=np.float32)
    for k in range(len(positions)):
        base = (origin_ph[k][None, :] + sub_off).astype(np.float32)  # (n_sub, 3)
        xyz = [lattice[d][None, :, :] + base[:, d, None, None] for d in range(3)]  # (n_sub, nj, ni)
        image = _blur_slice(np.tensordot(w32, phantom_hu_xyz(*xyz, scale=scale), axes=1), taps)
        if noise_hu:
            # White noise after the kernel blur, drawn slice by slice (float32 keeps memory low).
            image += np.float32(noise_hu) * rng.standard_normal((nj, ni), dtype=np.float32)
        pixels[k] = image
        monitor.report("simulate", (k + 1) / len(positions))

    if description is None:
        name = orientation.upper() if isinstance(orientation, str) else "OBLIQUE"
        description = f"SIM {name} {thickness_mm:g}MM" + (f" TILT {tilt_deg:g}" if tilt_deg else "")
    return Stack(
        pixels=pixels,
        slice_origins_mm=origins,
        row_direction=row,
        column_direction=col,
        pixel_spacing_mm=(di, dj),
        thickness_mm=thickness_mm,
        modality="CT",
        description=description,
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        frame_of_reference_uid=frame_of_reference_uid or generate_uid(),
        source="simulated",
    )


def simulate_orthogonal_stacks(
    thickness_mm=4.0, pixel_spacing_mm=0.8, scale=1.0, noise_hu=15.0, seed=0, motions=None, **kw
):
    """Axial, coronal and sagittal thick-slice series of the phantom in one study and frame of reference.

    Parameters are those of :func:`simulate_stack` (``kw`` is passed on, e.g. ``profile`` or
    ``monitor``); the three noise realisations use seeds ``seed``, ``seed + 1`` and ``seed + 2``.
    ``motions`` optionally gives one rigid patient motion (4x4 or None) per series, in the order
    axial, coronal, sagittal (see ``motion`` in :func:`simulate_stack`).

    Returns
    -------
    list of Stack
        ``[axial, coronal, sagittal]``.
    """
    study = kw.pop("study_uid", None) or generate_uid()
    frame = kw.pop("frame_of_reference_uid", None) or generate_uid()
    monitor = Monitor.wrap(kw.pop("monitor", None))
    if motions is None:
        motions = [kw.pop("motion", None)] * 3
    elif len(motions) != 3:
        raise InputError(f"motions must hold one transform (or None) per series, got {len(motions)}")
    stacks = []
    for n, name in enumerate(("axial", "coronal", "sagittal")):
        stacks.append(
            simulate_stack(
                name,
                thickness_mm=thickness_mm,
                pixel_spacing_mm=pixel_spacing_mm,
                scale=scale,
                noise_hu=noise_hu,
                seed=seed + n,
                motion=motions[n],
                study_uid=study,
                frame_of_reference_uid=frame,
                monitor=monitor.sub("simulate", n / 3.0, (n + 1) / 3.0),
                **kw,
            )
        )
    return stacks
