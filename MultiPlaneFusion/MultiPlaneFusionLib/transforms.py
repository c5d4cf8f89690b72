"""Geometry on the ground floor: 4x4 matrices applied to points, rotations, rigid maps, boxes, stack frames.

Every layer (grid, registration, reconstruction, the Slicer boundary) uses these instead of its own copy.
All matrices are 4x4 homogeneous maps of LPS points in millimetres, ``p' = M[:3, :3] @ p + M[:3, 3]``.
"""

import numpy as np


def rotation_matrix(axis, angle_deg):
    """3x3 rotation by ``angle_deg`` about the unit vector ``axis`` (right-hand rule)."""
    a = np.asarray(axis, dtype=float)
    n = np.linalg.norm(a)
    if n == 0 or angle_deg == 0:
        return np.eye(3)
    a = a / n
    t = np.radians(angle_deg)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def rigid_matrix(rotation_vector_deg=(0.0, 0.0, 0.0), translation_mm=(0.0, 0.0, 0.0), centre_mm=(0.0, 0.0, 0.0)):
    """4x4 rigid map: rotate about ``centre_mm`` by the rotation vector (axis * angle, degrees), then translate.

    ``p' = R (p - c) + c + t``.
    """
    v = np.asarray(rotation_vector_deg, dtype=float)
    r = rotation_matrix(v, float(np.linalg.norm(v)))
    c = np.asarray(centre_mm, dtype=float)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, dtype=float)
    return m


def rotation_vector_deg(matrix):
    """Rotation vector (unit axis times angle, degrees) of the rotation part of a 3x3 or 4x4 matrix."""
    r = np.asarray(matrix, dtype=float)[:3, :3]
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    w = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    s = np.linalg.norm(w)
    if s < 1e-12:
        return np.zeros(3)
    return w / s * np.degrees(angle)


def describe_motion(matrix, centre_mm):
    """How a rigid map moves an object centred at ``centre_mm``.

    Returns a dict: ``translation_mm`` (displacement of the centre, LPS, 3 values), ``rotation_deg``
    (rotation vector, axis times angle in degrees, about L, P, S), ``rotation_angle_deg`` (its length).
    """
    m = np.asarray(matrix, dtype=float)
    c = np.asarray(centre_mm, dtype=float)
    shift = m[:3, :3] @ c + m[:3, 3] - c
    rv = rotation_vector_deg(m)
    return {
        "translation_mm": [float(v) for v in shift],
        "rotation_deg": [float(v) for v in rv],
        "rotation_angle_deg": float(np.linalg.norm(rv)),
    }


def apply(matrix, points):
    """Map points of shape (..., 3) through a 4x4 matrix."""
    m = np.asarray(matrix, dtype=float).reshape(4, 4)
    return np.asarray(points, dtype=float) @ m[:3, :3].T + m[:3, 3]


def stack_frame(stack):
    """Orthonormal patient-space axes of a stack after its registration transform, shape (3, 3).

    Columns: row direction, column direction, slice normal (row x column). A rigid transform keeps them
    orthonormal; QR removes the round-off while keeping each axis's sense (QR alone may flip signs).
    """
    r = np.asarray(stack.transform, dtype=float)[:3, :3]
    axes = np.stack([r @ stack.row_direction, r @ stack.column_direction, r @ stack.normal], axis=1)
    q, rr = np.linalg.qr(axes)
    return q * np.sign(np.diag(rr))[None, :]


def target_registration_error(estimated, true, points):
    """Mean distance (mm) between ``points`` mapped by two 4x4 transforms (e.g. the 8 corners of a box)."""
    return float(np.mean(np.linalg.norm(apply(estimated, points) - apply(true, points), axis=-1)))


def box_corners(lo_mm, hi_mm):
    """The 8 corners of an axis-aligned box, shape (8, 3)."""
    lo = np.asarray(lo_mm, dtype=float)
    hi = np.asarray(hi_mm, dtype=float)
    return np.array([[(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
