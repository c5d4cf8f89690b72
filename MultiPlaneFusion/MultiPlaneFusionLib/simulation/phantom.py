"""An analytic CT head phantom in LPS millimetres, evaluated point by point.

The phantom is a function ``HU(x, y, z)`` built from smooth implicit surfaces, so it can be integrated
over any slice profile or voxel (no voxel grid is involved: simulated acquisitions and the ground truth
are both computed from the same continuous object, which avoids the "inverse crime").

Layout at ``scale=1`` (LPS: +x patient left, +y posterior, +z superior):

- head axis along z, face towards -y, skull centre near the origin; skull outer size about
  150 (L-R) x 185 (A-P) x 168 (S-I) mm, scalp 6 mm, neck down to z = -110 mm;
- skull: an egg-shaped ellipsoidal vault whose thickness varies with direction (about 1.3 mm at the
  temporal squama, 4.6 mm at the vertex, 6.4-6.6 mm frontal and occipital, up to 14 mm at the glabella
  around the frontal sinus) closed below by a stepped skull base (anterior, middle and posterior fossae,
  6 mm thick). Thick bone has two cortical tables (outer 1500 HU, inner 1350 HU) around a diploe
  layer (400 HU); bone thinner than about 2.5 mm is cortical only;
- sutures (sagittal, coronal, lambdoid): 0.9 mm wavy gaps of soft tissue through the full thickness
  of the vault, ending above the skull base so the skull stays ONE connected body;
- foramina: foramen magnum (30 x 34 mm) in the posterior fossa, jugular foramina and foramina ovalia
  in the base, and six 2-5 mm holes through the vault at 0-45 degrees to the surface normal;
- a frontal air sinus inside the thick glabella, opening downwards through a 3 mm frontonasal duct
  (so the sinus is not a closed void inside the bone);
- brain 35 HU with lateral, third and fourth ventricles 5 HU; the cranial cavity reaches the neck
  through the foramen magnum;
- soft tissue 40 HU: scalp, face (with eyes 10 HU, nasal cavity, maxillary sinuses and pharynx as
  air) and neck.

The bone (HU > about 300) is one closed body whose only openings are the foramina, the sutures and
the sinus duct. ``scale`` shrinks every length (thicknesses included) about the origin.
"""

import numpy as np

from ..grid import Grid
from ..progress import Monitor
from ..transforms import rotation_matrix

# ------------------------------------------------------------------------------------- tissue HU
AIR_HU = -1000.0
SOFT_TISSUE_HU = 40.0
BRAIN_HU = 35.0
VENTRICLE_HU = 5.0
EYE_HU = 10.0
CORTICAL_OUTER_HU = 1500.0
CORTICAL_INNER_HU = 1350.0
DIPLOE_HU = 400.0

#: Tissue values of the phantom, HU.
TISSUE_HU = {
    "air": AIR_HU,
    "soft_tissue": SOFT_TISSUE_HU,
    "brain": BRAIN_HU,
    "ventricle": VENTRICLE_HU,
    "eye": EYE_HU,
    "cortical_outer": CORTICAL_OUTER_HU,
    "cortical_inner": CORTICAL_INNER_HU,
    "diploe": DIPLOE_HU,
}

# ------------------------------------------------------------------------- geometry (scale = 1, mm)
# Outer skull surface: an ellipsoid centred at (0, 0, _ZC) whose A-P semi-axis differs in front of
# and behind the centre (an egg: the occiput bulges more than the forehead). The two halves meet
# with a continuous normal at y = 0.
_A = 75.0  # L-R semi-axis
_B_FRONT = 88.0  # A-P semi-axis, anterior half (y < 0)
_B_BACK = 97.0  # A-P semi-axis, posterior half (y > 0)
_C = 98.0  # S-I semi-axis
_ZC = 10.0
_SCALP_MM = 6.0

# Skull base: the top of the cranial floor steps down from the anterior to the posterior fossa; the
# floor slab is _FLOOR_MM thick below that surface.
_FLOOR_Z_ANT = -18.0
_FLOOR_Z_MID = -38.0
_FLOOR_Z_POST = -54.0
_FLOOR_Y_ANT_MID = -30.0
_FLOOR_Y_MID_POST = 0.0
_FLOOR_BLEND_MM = 3.0
_SELLA_RISE_MM = 10.0  # the central middle fossa (sphenoid body) is higher than its lateral parts
_SELLA_HALF_WIDTH_MM = 14.0
_FLOOR_MM = 6.0
_FLOOR_TOP_MAX = _FLOOR_Z_ANT
_FLOOR_BOTTOM_MIN = _FLOOR_Z_POST - _FLOOR_MM

# Vault thickness: a base value plus von Mises bumps on the unit sphere of the ellipsoid's
# normalised coordinates, exp((u . c - 1) / width).
_T_BASE = 4.6
_T_MIN = 1.2
_T_MAX = 15.5
_GLABELLA_DIR = np.array([0.0, -1.0, -0.163])
_T_BUMPS = [
    # amplitude (mm), centre direction (normalised coordinates), angular width
    (-3.3, np.array([1.0, 0.0, -0.12]), 0.14),  # left temporal squama (thin)
    (-3.3, np.array([-1.0, 0.0, -0.12]), 0.14),  # right temporal squama (thin)
    (2.0, np.array([0.0, 1.0, 0.05]), 0.12),  # occipital (thick)
    (1.8, np.array([0.0, -1.0, 0.35]), 0.12),  # frontal (thick)
]
_SINUS_BUMP = (8.5, _GLABELLA_DIR, 0.02)  # glabella, housing the frontal sinus
# Largest thickness without the glabella bump: points deeper than this are inside the inner table
# unless they lie in the glabella's cone.
_T_GENERAL_MAX = 6.8
_GLABELLA_CONE_COS = 0.9

# Sutures: half width and the amplitude / period of their waviness.
_SUTURE_HALF_MM = 0.45
_SUTURE_WAVE_MM = 0.45
_SUTURE_PERIOD_MM = 7.0
_CORONAL_TILT_DEG = 18.0  # descends forwards from bregma
_LAMBDOID_TILT_DEG = 18.0  # descends forwards from lambda
_CORONAL_END_Z = -8.0  # sutures stop above the skull base: the skull stays one connected body
_LAMBDOID_END_Z = -28.0
_SAGITTAL_MIN_Z = 40.0

# Ventricles (centre, semi-axes), mm.
_VENTRICLES = [
    ((11.0, -2.0, 28.0), (5.0, 27.0, 7.0)),  # left lateral ventricle, body and frontal horn
    ((-11.0, -2.0, 28.0), (5.0, 27.0, 7.0)),
    ((15.0, 30.0, 20.0), (4.0, 12.0, 5.0)),  # occipital horns
    ((-15.0, 30.0, 20.0), (4.0, 12.0, 5.0)),
    ((0.0, 4.0, 8.0), (2.0, 12.0, 9.0)),  # third ventricle
    ((0.0, 36.0, -36.0), (6.0, 4.0, 6.0)),  # fourth ventricle
]
_VENTRICLE_BOX = (np.array([-20.0, -30.0, -43.0]), np.array([20.0, 43.0, 36.0]))

# Soft tissue outside the vault ellipsoid: neck (elliptic cylinder), face and nose (ellipsoids).
_NECK_CENTRE_XY = (0.0, 12.0)
_NECK_SEMI_XY = (48.0, 55.0)
_NECK_Z = (-110.0, -30.0)
_FACE = ((0.0, -45.0, -45.0), (62.0, 55.0, 55.0))
_NOSE = ((0.0, -96.0, -32.0), (11.0, 18.0, 20.0))
# Inside the face, below the anterior skull base: eyes and air spaces.
_EYES = [((32.0, -76.0, -40.0), (12.0, 12.0, 12.0)), ((-32.0, -76.0, -40.0), (12.0, 12.0, 12.0))]
_FACE_AIR = [
    ((0.0, -72.0, -45.0), (9.0, 22.0, 16.0)),  # nasal cavity
    ((24.0, -62.0, -55.0), (11.0, 14.0, 13.0)),  # maxillary sinuses
    ((-24.0, -62.0, -55.0), (11.0, 14.0, 13.0)),
]
_PHARYNX_XY = (0.0, -18.0)
_PHARYNX_RADIUS = 7.0
_PHARYNX_TOP_Z = -58.0

# Tight box of the head (scale 1) and the air added around it by phantom_bounds_mm.
_HEAD_LO = np.array([-81.0, -114.0, -110.0])
_HEAD_HI = np.array([81.0, 103.0, 114.0])
_AIR_PAD_MM = 6.0

# Points per chunk of the vectorised evaluation (bounds the temporaries to a few tens of MB).
_CHUNK = 1 << 19


# --------------------------------------------------------------------------- derived constants
def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _outer_surface_point(direction_normalised):
    """Point of the outer skull surface along a direction of the normalised coordinates, and the
    outward unit normal there."""
    n = _unit(direction_normalised)
    b = _B_FRONT if n[1] < 0 else _B_BACK
    p = np.array([_A * n[0], b * n[1], _ZC + _C * n[2]])
    normal = _unit([p[0] / _A**2, p[1] / b**2, (p[2] - _ZC) / _C**2])
    return p, normal


def _rotate(v, axis, angle_deg):
    """Vector v rotated about ``axis`` by ``angle_deg`` (right-hand rule)."""
    return rotation_matrix(axis, angle_deg) @ np.asarray(v, dtype=float)


def _vault_hole(direction, radius_mm, tilt_deg):
    """A cylindrical hole through the vault: anchor on the outer surface, axis tilted off the normal."""
    p, normal = _outer_surface_point(direction)
    # Tilt about an axis perpendicular to the normal (normal x z, or normal x x near the vertex).
    side = np.cross(normal, [0.0, 0.0, 1.0])
    if np.linalg.norm(side) < 0.3:
        side = np.cross(normal, [1.0, 0.0, 0.0])
    axis = _unit(_rotate(normal, side, tilt_deg))
    return p, axis, radius_mm, 20.0


def _base_hole(x, y, *, radius_mm, tilt_deg):
    """A hole through the skull base around (x, y), axis tilted from vertical about the x axis."""
    axis = _unit(_rotate(np.array([0.0, 0.0, 1.0]), [1.0, 0.0, 0.0], tilt_deg))
    p = np.array([x, y, _FLOOR_Z_POST - 0.5 * _FLOOR_MM if y > 0 else _FLOOR_Z_MID - 0.5 * _FLOOR_MM])
    return p, axis, radius_mm, 14.0


_HOLES = [
    _vault_hole([0.12, 0.45, 0.88], 1.0, 20.0),  # parietal foramina
    _vault_hole([-0.12, 0.45, 0.88], 1.0, -15.0),
    _vault_hole([0.80, 0.55, -0.25], 1.5, 35.0),  # mastoid foramen
    _vault_hole([-0.35, -0.92, 0.05], 1.25, 30.0),  # supraorbital foramen
    _vault_hole([0.97, -0.15, 0.15], 2.5, 45.0),  # 5 mm oblique hole through the thin temporal wall
    _vault_hole([-0.6, 0.2, 0.77], 2.0, 0.0),  # 4 mm hole straight through the right parietal
    _base_hole(24.0, 14.0, radius_mm=3.5, tilt_deg=15.0),  # jugular foramina
    _base_hole(-24.0, 14.0, radius_mm=3.5, tilt_deg=-10.0),
    _base_hole(22.0, -14.0, radius_mm=2.5, tilt_deg=20.0),  # foramina ovalia
    _base_hole(-22.0, -14.0, radius_mm=2.5, tilt_deg=20.0),
]
_FORAMEN_MAGNUM = ((0.0, 28.0), (15.0, 17.0))  # centre (x, y), semi-axes (x, y)

# Frontal sinus: an air ellipsoid at mid-depth of the glabella and its duct down to the face.
_GLABELLA_POINT, _GLABELLA_NORMAL = _outer_surface_point(_GLABELLA_DIR)
_SINUS_CENTRE = _GLABELLA_POINT - 6.5 * _GLABELLA_NORMAL
_SINUS_SEMI = np.array([13.0, 3.2, 8.0])
_DUCT_RADIUS = 1.6

# Sutures: plane anchors and normals.
_BREGMA = np.array([0.0, -20.0, _ZC + _C * np.sqrt(1.0 - (20.0 / _B_FRONT) ** 2)])
_LAMBDA = np.array([0.0, 72.0, _ZC + _C * np.sqrt(1.0 - (72.0 / _B_BACK) ** 2)])
_CORONAL_NORMAL = np.array([0.0, np.cos(np.radians(_CORONAL_TILT_DEG)), -np.sin(np.radians(_CORONAL_TILT_DEG))])
_LAMBDOID_NORMAL = np.array([0.0, np.cos(np.radians(_LAMBDOID_TILT_DEG)), -np.sin(np.radians(_LAMBDOID_TILT_DEG))])


# ------------------------------------------------------------------------------------ public API
def phantom_bounds_mm(scale=1.0):
    """LPS box enclosing the head plus 6 mm of air on every side.

    Parameters
    ----------
    scale : float
        Size factor of the phantom (1 = adult).

    Returns
    -------
    lo, hi : ndarray, shape (3,)
        Corners of the box in mm.
    """
    s = float(scale)
    return (_HEAD_LO - _AIR_PAD_MM) * s, (_HEAD_HI + _AIR_PAD_MM) * s


def head_phantom_hu(points_lps_mm, scale=1.0):
    """CT numbers of the analytic head phantom at LPS points.

    Parameters
    ----------
    points_lps_mm : array_like, shape (..., 3)
        LPS positions in mm.
    scale : float
        Size factor (1 = adult); every length of the phantom is multiplied by it.

    Returns
    -------
    ndarray, float32, shape points.shape[:-1]
        HU at each point (-1000 outside the head).
    """
    p = np.asarray(points_lps_mm)
    if p.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., 3), got {p.shape}")
    flat = p.reshape(-1, 3)
    return phantom_hu_xyz(flat[:, 0], flat[:, 1], flat[:, 2], scale).reshape(p.shape[:-1])


def phantom_hu_xyz(x_mm, y_mm, z_mm, scale=1.0):
    """:func:`head_phantom_hu` for coordinates given as three broadcastable arrays (LPS mm).

    Faster when the caller builds coordinates per axis: no (..., 3) packing is needed.

    Returns
    -------
    ndarray, float32, shape of the broadcast coordinates
    """
    x, y, z = np.broadcast_arrays(np.asarray(x_mm), np.asarray(y_mm), np.asarray(z_mm))
    shape = x.shape
    x, y, z = x.reshape(-1), y.reshape(-1), z.reshape(-1)
    out = np.empty(x.size, dtype=np.float32)
    inv_scale = np.float32(1.0 / float(scale))
    for start in range(0, x.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        # Contiguous float32 copies at scale 1 (the evaluation is written for the adult size).
        xs, ys, zs = (np.asarray(v[part], dtype=np.float32) * inv_scale for v in (x, y, z))
        out[part] = _evaluate(xs, ys, zs)
    return out.reshape(shape)


def phantom_grid(spacing_mm, scale=1.0, margin_mm=5.0):
    """An axial-aligned grid (identity direction) covering the head plus ``margin_mm`` of air.

    Parameters
    ----------
    spacing_mm : float or sequence of 3 floats
        Voxel spacing (si, sj, sk) in mm.
    scale : float
        Phantom size factor.
    margin_mm : float
        Air added around the tight head box, mm.

    Returns
    -------
    Grid
        Grid centred on the head box.
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)).copy()
    if np.any(sp <= 0):
        raise ValueError(f"spacing must be positive, got {spacing_mm}")
    lo = _HEAD_LO * scale - margin_mm
    hi = _HEAD_HI * scale + margin_mm
    n = np.ceil((hi - lo) / sp - 1e-9).astype(int) + 1
    origin = 0.5 * (lo + hi) - 0.5 * (n - 1) * sp
    return Grid(
        shape=(int(n[2]), int(n[1]), int(n[0])),
        spacing_mm=tuple(float(v) for v in sp),
        origin_mm=tuple(float(v) for v in origin),
    )


def phantom_truth(grid, scale=1.0, supersample=2, monitor=None):
    """The phantom averaged over every voxel of ``grid``: the ideal image on that grid.

    Each voxel is the mean of ``supersample**3`` points on a regular sub-lattice of the voxel.

    Parameters
    ----------
    grid : Grid
        Target grid (any direction).
    scale : float
        Phantom size factor.
    supersample : int
        Sub-points per voxel along each axis.
    monitor : progress.Monitor, optional
        Receives ``report("phantom", fraction)`` per slab (and may cancel).

    Returns
    -------
    ndarray, float32, shape grid.shape
        Mean HU per voxel, indexed [k, j, i].
    """
    monitor = Monitor.wrap(monitor)
    s = max(1, int(supersample))
    sub = (np.arange(s) + 0.5) / s - 0.5
    nk, nj, ni = grid.shape
    a = grid.index_to_lps_affine
    step_i, step_j, step_k = a[:3, 0], a[:3, 1], a[:3, 2]
    # In-slab lattice of voxel centres relative to voxel (k0, 0, 0), one array per LPS axis.
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    plane = [(ii * step_i[d] + jj * step_j[d]).astype(np.float32) for d in range(3)]
    slab = max(1, int(_CHUNK * 4 // max(1, nj * ni)))
    out = np.empty(grid.shape, dtype=np.float32)
    offsets = [oi * step_i + oj * step_j + ok * step_k for ok in sub for oj in sub for oi in sub]
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        base = a[:3, 3] + np.arange(k0, k1)[:, None] * step_k  # (nslab, 3)
        acc = np.zeros((k1 - k0, nj, ni), dtype=np.float32)
        for off in offsets:
            shift = (base + off).astype(np.float32)
            acc += phantom_hu_xyz(*(plane[d][None] + shift[:, d, None, None] for d in range(3)), scale=scale)
        out[k0:k1] = acc / len(offsets)
        monitor.report("phantom", k1 / nk)
    return out


# --------------------------------------------------------------------------------- evaluation
def _quad(x, y, z, centre, semi):
    """Normalised quadratic form of an axis-aligned ellipsoid (< 1 inside)."""
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2


def _vault_coordinates(x, y, z):
    """Normalised ellipsoid coordinates, their norm f, and the approximate signed distance (mm,
    negative inside) to the outer skull surface: (f - 1) / |grad f|, accurate near the surface."""
    inv_b = np.where(y < 0, np.float32(1.0 / _B_FRONT), np.float32(1.0 / _B_BACK))
    ex = x * np.float32(1.0 / _A)
    ey = y * inv_b
    ez = (z - np.float32(_ZC)) * np.float32(1.0 / _C)
    ex2, ey2, ez2 = ex * ex, ey * ey, ez * ez
    f = np.sqrt(ex2 + ey2 + ez2)
    # f * |grad f| = |(ex / a, ey / b, ez / c)|
    g = np.sqrt(ex2 * np.float32(1.0 / _A**2) + ey2 * (inv_b * inv_b) + ez2 * np.float32(1.0 / _C**2))
    # |grad f| = g / f lies between 1/_C and 1/_A; the floor keeps the centre finite.
    grad = np.maximum(g / np.maximum(f, np.float32(1e-6)), np.float32(1.0 / max(_A, _B_BACK, _C)))
    d = (f - 1.0) / grad
    return ex, ey, ez, f, d


def _floor_top(x, y):
    """z of the top of the cranial floor (mm) as a smooth stepped function of (x, y)."""
    z_mid = _FLOOR_Z_MID + _SELLA_RISE_MM * np.exp(-((x / np.float32(_SELLA_HALF_WIDTH_MM)) ** 2))
    w = np.float32(_FLOOR_BLEND_MM)
    s_post = 1.0 / (1.0 + np.exp(np.clip((y - np.float32(_FLOOR_Y_MID_POST)) / w, -30, 30)))
    s_ant = 1.0 / (1.0 + np.exp(np.clip((y - np.float32(_FLOOR_Y_ANT_MID)) / w, -30, 30)))
    return np.float32(_FLOOR_Z_POST) + (z_mid - np.float32(_FLOOR_Z_POST)) * s_post + (_FLOOR_Z_ANT - z_mid) * s_ant


def _thickness(ux, uy, uz):
    """Vault thickness (mm) for unit directions of the normalised coordinates."""
    t = np.full(ux.shape, _T_BASE, dtype=np.float32)
    for amp, c, w in _T_BUMPS + [_SINUS_BUMP]:
        c = _unit(c).astype(np.float32)
        cosang = ux * c[0] + uy * c[1] + uz * c[2]
        t += np.float32(amp) * np.exp((cosang - 1.0) / np.float32(w))
    return np.clip(t, _T_MIN, _T_MAX)


def _in_holes(x, y, z):
    """True where a point lies inside a foramen (bone there is replaced by soft tissue)."""
    hit = np.zeros(x.shape, dtype=bool)
    for p, axis, r, half in _HOLES:
        p, axis = p.astype(np.float32), axis.astype(np.float32)  # keep the arithmetic in float32
        dx, dy, dz = x - p[0], y - p[1], z - p[2]
        along = dx * axis[0] + dy * axis[1] + dz * axis[2]
        perp2 = dx * dx + dy * dy + dz * dz - along * along
        hit |= (perp2 < r * r) & (np.abs(along) < half)
    return hit


def _wave(v):
    return np.float32(_SUTURE_WAVE_MM) * np.sin(v * np.float32(2 * np.pi / _SUTURE_PERIOD_MM))


def _plane_offset(y, z, anchor, normal):
    """Signed distance (mm) to a plane containing the x axis direction (normal has no x part)."""
    return (y - np.float32(anchor[1])) * np.float32(normal[1]) + (z - np.float32(anchor[2])) * np.float32(normal[2])


def _in_sutures(x, y, z):
    """True inside the sagittal, coronal or lambdoid suture gaps (to be applied to bone points)."""
    s_cor = _plane_offset(y, z, _BREGMA, _CORONAL_NORMAL)
    s_lam = _plane_offset(y, z, _LAMBDA, _LAMBDOID_NORMAL)
    hit = (np.abs(s_cor + _wave(x)) < _SUTURE_HALF_MM) & (z > _CORONAL_END_Z)
    hit |= (np.abs(s_lam + _wave(x)) < _SUTURE_HALF_MM) & (z > _LAMBDOID_END_Z)
    hit |= (np.abs(x + _wave(y)) < _SUTURE_HALF_MM) & (s_cor > 0) & (s_lam < 0) & (z > _SAGITTAL_MIN_Z)
    return hit


def _outside_vault_body(x, y, z):
    """Soft-tissue body outside the scalp shell: neck, face, nose."""
    nx, ny = _NECK_CENTRE_XY
    sx, sy = _NECK_SEMI_XY
    body = (((x - nx) / sx) ** 2 + ((y - ny) / sy) ** 2 < 1) & (z > _NECK_Z[0]) & (z < _NECK_Z[1])
    front = np.flatnonzero(~body & (y < -40.0) & (z < 0.0))
    if front.size:
        fx, fy, fz = x[front], y[front], z[front]
        body[front] = (_quad(fx, fy, fz, *_FACE) < 1) | (_quad(fx, fy, fz, *_NOSE) < 1)
    return body


def _face_features(x, y, z):
    """HU of eyes and air spaces below the anterior skull base, NaN elsewhere."""
    out = np.full(x.shape, np.nan, dtype=np.float32)
    for centre, semi in _EYES:
        out[_quad(x, y, z, centre, semi) < 1] = EYE_HU
    for centre, semi in _FACE_AIR:
        out[_quad(x, y, z, centre, semi) < 1] = AIR_HU
    px, py = _PHARYNX_XY
    out[((x - px) ** 2 + (y - py) ** 2 < _PHARYNX_RADIUS**2) & (z < _PHARYNX_TOP_Z)] = AIR_HU
    return out


def _evaluate(x, y, z):
    """HU at points (x, y, z): contiguous float32 arrays of shape (n,), phantom coordinates at scale 1."""
    hu = np.full(x.size, AIR_HU, dtype=np.float32)
    lo, hi = _HEAD_LO, _HEAD_HI
    inside = (x > lo[0]) & (x < hi[0]) & (y > lo[1]) & (y < hi[1]) & (z > lo[2]) & (z < hi[2])
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return hu
    x, y, z = x[idx], y[idx], z[idx]
    val = np.full(idx.size, AIR_HU, dtype=np.float32)
    ex, ey, ez, f, d = _vault_coordinates(x, y, z)

    # Soft-tissue body: scalp shell around the vault (its lower part is the skull base region),
    # plus neck, face and nose.
    body = d <= _SCALP_MM
    rest = np.flatnonzero(~body)
    if rest.size:
        body[rest] = _outside_vault_body(x[rest], y[rest], z[rest])
    val[body] = SOFT_TISSUE_HU

    # Skull and cranial cavity: inside the outer surface and above the lowest floor bottom.
    cand = np.flatnonzero((d <= 0) & (z >= _FLOOR_BOTTOM_MIN))
    if cand.size:
        val[cand] = _skull_and_cavity(x[cand], y[cand], z[cand], ex[cand], ey[cand], ez[cand], f[cand], d[cand])

    # Eyes and air spaces of the face, all in soft tissue below the anterior skull base.
    in_face_box = (y < _PHARYNX_XY[1] + _PHARYNX_RADIUS) & (z < _FLOOR_Z_ANT - _FLOOR_MM)
    face = np.flatnonzero((val == SOFT_TISSUE_HU) & in_face_box)
    if face.size:
        fv = _face_features(x[face], y[face], z[face])
        ok = ~np.isnan(fv)
        val[face[ok]] = fv[ok]
    hu[idx] = val
    return hu


def _skull_and_cavity(x, y, z, ex, ey, ez, f, d):
    """HU of points inside the outer skull surface (d <= 0) and above the lowest floor bottom."""
    m = x.size
    val = np.full(m, SOFT_TISSUE_HU, dtype=np.float32)
    # Floor surfaces only matter below the highest floor top.
    z_top = np.full(m, -1e4, dtype=np.float32)
    low = np.flatnonzero(z < _FLOOR_TOP_MAX + 0.01)
    if low.size:
        z_top[low] = _floor_top(x[low], y[low])
    z_bot = z_top - np.float32(_FLOOR_MM)

    # Thickness only where the inner table may be: within _T_GENERAL_MAX of the outer surface or in
    # the glabella's cone (where the sinus bump makes the bone thicker).
    g = _unit(_GLABELLA_DIR)
    inv_f = 1.0 / np.maximum(f, np.float32(1e-6))
    ux, uy, uz = ex * inv_f, ey * inv_f, ez * inv_f
    near = (d >= -_T_GENERAL_MAX) | ((ux * g[0] + uy * g[1] + uz * g[2] > _GLABELLA_CONE_COS) & (d >= -_T_MAX))
    t = np.full(m, np.inf, dtype=np.float32)  # +inf: certainly deeper than the inner table
    ni = np.flatnonzero(near)
    if ni.size:
        t[ni] = _thickness(ux[ni], uy[ni], uz[ni])
    inner = np.where(near, d < -t, True)
    cavity = inner & (z > z_top)
    bone = ~cavity & (z >= z_bot)

    cav = np.flatnonzero(cavity)
    if cav.size:
        val[cav] = BRAIN_HU
        vlo, vhi = _VENTRICLE_BOX
        cx, cy, cz = x[cav], y[cav], z[cav]
        sel = np.flatnonzero(
            (cx > vlo[0]) & (cx < vhi[0]) & (cy > vlo[1]) & (cy < vhi[1]) & (cz > vlo[2]) & (cz < vhi[2])
        )
        if sel.size:
            sx, sy, sz = cx[sel], cy[sel], cz[sel]
            vent = np.zeros(sel.size, dtype=bool)
            for centre, semi in _VENTRICLES:
                vent |= _quad(sx, sy, sz, centre, semi) < 1
            val[cav[sel[vent]]] = VENTRICLE_HU

    b = np.flatnonzero(bone)
    if b.size:
        val[b] = _bone_hu(x[b], y[b], z[b], d[b], t[b], z_top[b], z_bot[b])
    return val


def _bone_hu(x, y, z, d, t, z_top, z_bot):
    """HU of points inside the bone body: tables, diploe, foramina, sutures, frontal sinus."""
    # Distances to the three kinds of bone surface: outer (vault), floor bottom, cavity.
    depth_out = -d
    floor_dist = z - z_bot
    # Deep points (t = +inf) are inside the inner table: only the floor top bounds the cavity there.
    finite = np.isfinite(t)
    cav_dist = np.where(finite, np.maximum(d + np.where(finite, t, 0), z_top - z), z_top - z)
    t_eff = np.where(finite, t, np.float32(_FLOOR_MM))
    table = np.float32(0.9) + np.float32(0.14) * np.minimum(t_eff, np.float32(8.0))
    outer_side = np.minimum(depth_out, floor_dist) < cav_dist
    val = np.where(outer_side, np.float32(CORTICAL_OUTER_HU), np.float32(CORTICAL_INNER_HU))
    diploe = (depth_out > table) & (cav_dist > table) & (floor_dist > table)
    val[diploe] = DIPLOE_HU

    # Frontal sinus and its duct (air), inside the glabella.
    near_sinus = (y < _SINUS_CENTRE[1] + 12.0) & (np.abs(x) < _SINUS_SEMI[0] + 1.0)
    sel = np.flatnonzero(near_sinus & (z < _SINUS_CENTRE[2] + 9.0))
    if sel.size:
        sx, sy, sz = x[sel], y[sel], z[sel]
        air = _quad(sx, sy, sz, _SINUS_CENTRE, _SINUS_SEMI) < 1
        air |= ((sx - _SINUS_CENTRE[0]) ** 2 + (sy - _SINUS_CENTRE[1]) ** 2 < _DUCT_RADIUS**2) & (sz < _SINUS_CENTRE[2])
        val[sel[air]] = AIR_HU

    # Foramina and sutures: soft tissue through the bone (the foramen magnum holds the brainstem).
    (fx, fy), (ax, ay) = _FORAMEN_MAGNUM
    magnum = (((x - fx) / ax) ** 2 + ((y - fy) / ay) ** 2 < 1) & (z < _FLOOR_Z_MID)
    val[magnum] = BRAIN_HU
    val[_in_holes(x, y, z)] = SOFT_TISSUE_HU
    val[_in_sutures(x, y, z)] = SOFT_TISSUE_HU
    return val
