"""The point-spread function (PSF) of a thick-slice stack: its sizes, its 1-D weights, and the slice profiles.

**The PSF.** A sample of a stack is the integral of the image against the PSF centred on the pixel centre,
oriented with the slice: Gaussian in-plane, FWHM = ``IN_PLANE_FWHM_FACTOR`` (1.2) x pixel spacing
(NiftyMIC/SVRTK/MIALSRTK's convention, see the constant), and through-plane either Gaussian of
FWHM = slice thickness or a box (a slab of the slice thickness: slab-averaged MPR reformats).
:func:`psf_sigma_mm` gives the sizes, :func:`psf_rows` the weights of samples against the interpolation basis of
a 1-D lattice, which every operator builds its banded matrices from
(:mod:`MultiPlaneFusionLib.reconstruction.banded`).

**The image between the nodes** (``IMAGE_BASIS``). A PSF row integrates the PSF against the continuous image
the node values stand for. With Keys' cubic convolution (a = -0.5, the default) the row's second moment is
the PSF's own at every sub-node position (the kernel reproduces quadratics): the model is as wide as the
PSF says wherever a sample falls. The nodes' linear interpolant (the default until 2026-12-06) adds the hat's
variance, which depends on the position: none for a point sample on a node, a quarter of a node squared
half-way between two. A narrow model was then a point sample for series lying on the grid's lattice and a
blur elsewhere (the in-plane width's history in the README), and a box through-plane was effectively wider
than its slab. Measured on the realistic panel and the moved series (README, Current figures).

**Slice profiles.** A slice profile is a kind ("box": a slab, as slab-averaged MPR reformats and many CT
recons have; "gaussian": the conventional approximation of a scanner's slice sensitivity) and an effective
width relative to the nominal slice thickness t: box of full width ``factor * t``, or Gaussian of
FWHM ``factor * t``.

A profile may also carry the stack's **in-plane** width (``in_plane_factor``: Gaussian FWHM / pixel spacing;
None keeps ``IN_PLANE_FWHM_FACTOR``), estimated from the data by ``--in-plane-psf auto``.

The operators take the kind as ``psf`` and the widths from the stack (``stack.thickness_mm`` through-plane,
``stack.in_plane_fwhm_factor`` in-plane, read by :func:`psf_sigma_mm`), so a profile is applied by handing
the operator a copy of the stack that carries the effective widths (:meth:`SliceProfile.apply`); nothing
else of the stack changes (its slice positions, steps, data weight and coverage are geometric, not profile
properties). Registration passes its own in-plane width (``REGISTRATION_IN_PLANE_FWHM_FACTOR``) explicitly.

The reconstruction's :mod:`~MultiPlaneFusionLib.reconstruction.autotune` chooses among
:func:`candidates` from the data.
"""

import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ..errors import InputError

# Through-plane kinds the operators model, and the settings of ``--psf`` (auto: chosen per stack).
PSF_KINDS = ("box", "gaussian")
PSF_CHOICES = ("auto",) + PSF_KINDS
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
# In-plane FWHM of the reconstruction's model, in pixel spacings, for stacks that carry no width of their own
# (``Stack.in_plane_fwhm_factor`` None). 1.2, NiftyMIC/SVRTK's convention, with the cubic image basis (2026-12-06):
# on the realistic panel 0.9 / 1.05 / 1.2 ranked 0.9 first on the simulated Philips cases (their series lie on
# the truth's lattice and carry no in-plane blur, which favours a narrow model), but on the real registered
# series on the full 1 mm grid 1.2 had the better surface (0.117 mm against 0.125 / 0.136) at the same
# correlation, and 1.2 beat the linear basis's 0.9 (the default until then) on every Philips case of the panel
# (README). A common in-plane width is not identified by the data, so this is a choice of target; the estimate
# (``--in-plane-psf auto``) stays opt-in.
IN_PLANE_FWHM_FACTOR = 1.2
# Candidate in-plane widths (FWHM / pixel spacing) of ``--in-plane-psf auto`` (autotune.estimate_in_plane): the
# common width of all stacks, and each stack's own width given the others at the common one (a stack blurrier
# than the others may need more than the common candidates reach; own candidates cost no extra solve).
IN_PLANE_FACTORS = (0.3, 0.6, 0.9, 1.2)
IN_PLANE_OWN_FACTORS = (0.3, 0.6, 0.9, 1.2, 1.6, 2.0)
# Registration compares low-passed images through both stacks' PSFs with this width (kept apart from the
# model's so that either can change without the other).
REGISTRATION_IN_PLANE_FWHM_FACTOR = 1.2
# Gaussian PSFs are truncated at this many standard deviations (0.27 % of the mass), as NiftyMIC does.
GAUSSIAN_CUTOFF_SIGMAS = 3.0
_erf = np.frompyfunc(math.erf, 1, 1)


def check_kind(psf):
    """An InputError naming the PSF unless ``psf`` is a kind the operators model ("gaussian" or "box")."""
    if psf not in PSF_KINDS:
        raise InputError(f"unknown PSF '{psf}' (use gaussian or box)")


def psf_sigma_mm(stack, psf="gaussian", *, in_plane_factor=None):
    """PSF sizes in mm as (along i (row), along j (column), through-plane).

    In-plane: Gaussian sigma = f x pixel spacing / 2.3548 with f = ``in_plane_factor`` when given (what
    registration does), else the stack's own ``in_plane_fwhm_factor`` (set by :meth:`SliceProfile.apply`),
    else ``IN_PLANE_FWHM_FACTOR``. Through-plane: Gaussian sigma = thickness / 2.3548, or for ``psf="box"``
    the full slab width (= thickness).
    """
    if in_plane_factor is None:
        in_plane_factor = getattr(stack, "in_plane_fwhm_factor", None)
    f = IN_PLANE_FWHM_FACTOR if in_plane_factor is None else float(in_plane_factor)
    di, dj = stack.pixel_spacing_mm
    s_i = f * di / FWHM_PER_SIGMA
    s_j = f * dj / FWHM_PER_SIGMA
    if psf == "gaussian":
        return s_i, s_j, stack.thickness_mm / FWHM_PER_SIGMA
    check_kind(psf)
    return s_i, s_j, stack.thickness_mm


# The continuous image behind the grid's node values, which every PSF row integrates (module docstring):
# "cubic" (Keys' cubic convolution, a = -0.5; the default) or "linear" (the nodes' linear interpolant, the
# default until 2026-12-06, kept for comparisons).
IMAGE_BASIS = "cubic"
IMAGE_BASES = ("cubic", "linear")
_KEYS_A = -0.5


def _power_moments(z, kind, width, order=3):
    """M_n(z) = int_{-inf}^{z} t^n p(t) dt for n = 0..order (at most 3) of a centred PSF (index units): Gaussian
    of sigma ``width`` or box of full width ``width``; a list of arrays."""
    z = np.asarray(z, dtype=float)
    if kind == "gaussian":
        s = max(width, 1e-9)
        u = z / s
        cdf = 0.5 * (1.0 + _erf(u / math.sqrt(2.0)).astype(float))
        pdf = np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
        return [cdf, -s * pdf, s * s * (cdf - u * pdf), -(s ** 3) * (u * u + 2.0) * pdf][:order + 1]
    w = max(width, 1e-9)
    zc = np.clip(z, -0.5 * w, 0.5 * w)
    lo = -0.5 * w
    return [(zc ** (n + 1) - lo ** (n + 1)) / ((n + 1) * w) for n in range(order + 1)]


def _keys_pieces(a=_KEYS_A):
    """Keys' kernel as (u_lo, u_hi, c0..c3) pieces: K(u) = sum c_n u^n on [u_lo, u_hi]."""
    return [(-2.0, -1.0, (-4 * a, -8 * a, -5 * a, -a)), (-1.0, 0.0, (1.0, 0.0, -(a + 3), -(a + 2))),
            (0.0, 1.0, (1.0, 0.0, -(a + 3), a + 2)), (1.0, 2.0, (-4 * a, 8 * a, -5 * a, a))]


def _psf_rows_cubic(c, n_nodes, kind, width):
    """:func:`psf_rows` for the cubic basis: exact integrals of the PSF against Keys' kernel, piece by piece
    (a cubic in t against the PSF's moments up to the third), nodes beyond the ends folded onto the end nodes
    (the image extends their values) and the image unknown beyond half a node."""
    cutoff = GAUSSIAN_CUTOFF_SIGMAS * width if kind == "gaussian" else 0.5 * width
    pieces = _keys_pieces()
    reach = cutoff + 2.0
    taps = int(math.ceil(2 * reach)) + 2
    # nodes of the kernel, possibly beyond the lattice (folded onto the end nodes below)
    first = np.floor(c - reach).astype(np.int64)
    v = first[:, None] + np.arange(taps)[None, :]
    cc = c[:, None]
    d = cc - v  # sample centre relative to the node
    w = np.zeros(v.shape)
    for u_lo, u_hi, coef in pieces:
        # t in [v + u_lo, v + u_hi], inside the image [-0.5, n - 0.5] and the PSF's support around c
        t_lo = np.maximum(np.maximum(v + u_lo, -0.5), cc - cutoff)
        t_hi = np.minimum(np.minimum(v + u_hi, n_nodes - 0.5), cc + cutoff)
        ok = t_hi > t_lo
        if not ok.any():
            continue
        m_lo = _power_moments(np.where(ok, t_lo - cc, 0.0), kind, width)
        m_hi = _power_moments(np.where(ok, t_hi - cc, 0.0), kind, width)
        # K(u) with u = s + d (s = t - c): expand sum_n c_n (s + d)^n in powers of s
        b = [coef[0] + coef[1] * d + coef[2] * d ** 2 + coef[3] * d ** 3,
             coef[1] + 2 * coef[2] * d + 3 * coef[3] * d ** 2,
             coef[2] + 3 * coef[3] * d,
             coef[3] + 0.0 * d]
        part = sum(b[n] * (m_hi[n] - m_lo[n]) for n in range(4))
        w += np.where(ok, part, 0.0)
    # fold the nodes beyond the ends onto the end nodes (the image is constant there)
    vc = np.clip(v, 0, n_nodes - 1)
    start = np.clip(np.minimum(vc[:, 0], n_nodes - min(taps, n_nodes)), 0, None)
    taps_out = min(taps, n_nodes)
    out = np.zeros((c.size, taps_out))
    col = vc - start[:, None]
    rows = np.repeat(np.arange(c.size), taps)
    np.add.at(out, (rows, col.ravel()), w.ravel())
    inside = (c >= -0.5) & (c <= n_nodes - 0.5)
    total = out.sum(axis=1)
    ok = inside & (np.abs(total) > 1e-12)
    out = np.where(ok[:, None], out / np.where(ok, total, 1.0)[:, None], 0.0)
    return start.astype(np.int64), out


def psf_rows(positions, n_nodes, kind, width, *, basis=None):
    """Normalised PSF weights of samples against the interpolation basis of a 1-D lattice.

    Parameters
    ----------
    positions : array (m,)
        Sample centres in node-index units (node ``v`` sits at ``v``).
    n_nodes : int
        Number of lattice nodes; the image is their linear interpolant, constant for half a node beyond
        each end and unknown (excluded) further out.
    kind : {"gaussian", "box"}
    width : float
        Gaussian sigma, or the box's full width, in node-index units.
    basis : {"cubic", "linear"}, optional
        The image between the nodes (``IMAGE_BASIS`` when None, module docstring). With "cubic" the weights
        can be slightly negative (the kernel's lobes).

    Returns
    -------
    start : int array (m,)
        Index of the first node of each row.
    weights : float64 array (m, taps)
        Row weights (summing to 1) for nodes ``start .. start + taps - 1``; all zero for samples whose
        centre lies outside ``[-0.5, n_nodes - 0.5]``.
    """
    c = np.asarray(positions, dtype=float).reshape(-1)
    basis = IMAGE_BASIS if basis is None else basis
    if basis == "cubic":
        return _psf_rows_cubic(c, n_nodes, kind, width)
    if basis != "linear":
        raise ValueError(f"unknown image basis '{basis}' (use {' or '.join(IMAGE_BASES)})")
    reach = (GAUSSIAN_CUTOFF_SIGMAS * width if kind == "gaussian" else 0.5 * width) + 1.0
    taps = int(math.ceil(2 * reach)) + 2
    start = np.floor(c - reach).astype(np.int64)
    start = np.clip(start, 0, max(n_nodes - taps, 0))
    taps = min(taps, n_nodes)
    v = start[:, None] + np.arange(taps)[None, :]  # node of each tap
    cc = c[:, None]
    # Left piece of node v's basis: ramp on [v-1, v] (constant 1 on [-0.5, 0] for the first node).
    a_l = np.where(v == 0, -0.5, v - 1.0)
    alpha_l = np.where(v == 0, 1.0, 1.0 - v)
    beta_l = np.where(v == 0, 0.0, 1.0)
    # Right piece: ramp down on [v, v+1] (constant 1 on [n-1, n-0.5] for the last node).
    last = v == n_nodes - 1
    b_r = np.where(last, n_nodes - 0.5, v + 1.0)
    alpha_r = np.where(last, 1.0, v + 1.0)
    beta_r = np.where(last, 0.0, -1.0)
    vf = v.astype(float)
    p0a, p1a = _power_moments(a_l - cc, kind, width, order=1)
    p0b, p1b = _power_moments(vf - cc, kind, width, order=1)
    p0c, p1c = _power_moments(b_r - cc, kind, width, order=1)
    w = (alpha_l + beta_l * cc) * (p0b - p0a) + beta_l * (p1b - p1a)
    w += (alpha_r + beta_r * cc) * (p0c - p0b) + beta_r * (p1c - p1b)
    w = np.maximum(w, 0.0)
    # Keep the truncated PSF support (the analytic tails beyond the cutoff are dropped) ...
    if kind == "gaussian":
        far = np.abs(vf - cc) > GAUSSIAN_CUTOFF_SIGMAS * width + 1.0
        w[far] = 0.0
    inside = (c >= -0.5) & (c <= n_nodes - 0.5)
    total = w.sum(axis=1)
    ok = inside & (total > 1e-12)
    # ... and normalise over the part inside the lattice: A 1 = 1.
    w = np.where(ok[:, None], w / np.where(ok, total, 1.0)[:, None], 0.0)
    return start, w


# -------------------------------------------------------------------------------------------- profiles
# Candidate widths relative to the nominal thickness: the DICOM SliceThickness is usually right within
# 10-20 %; a wider search would only let noise pick implausible widths.
WIDTH_FACTORS = (0.8, 0.9, 1.0, 1.1, 1.25)


@dataclass(frozen=True)
class SliceProfile:
    """``kind`` ("box" or "gaussian") and ``width_factor``: effective width / nominal thickness;
    ``in_plane_factor``: in-plane Gaussian FWHM / pixel spacing (None: ``IN_PLANE_FWHM_FACTOR``)."""

    kind: str = "gaussian"
    width_factor: float = 1.0
    in_plane_factor: Optional[float] = None

    def __post_init__(self):
        if self.kind not in PSF_KINDS:
            raise InputError(f"unknown PSF '{self.kind}' (--psf: use auto, box or gaussian)")
        if not (self.width_factor > 0 and np.isfinite(self.width_factor)):
            raise InputError(f"PSF width factor must be positive, got {self.width_factor}")
        check_in_plane_factor(self.in_plane_factor)

    def width_mm(self, stack):
        """Box width or Gaussian FWHM of this profile for ``stack``, mm."""
        return float(stack.thickness_mm) * float(self.width_factor)

    @property
    def effective_in_plane_factor(self):
        """In-plane FWHM / pixel spacing of this profile (``IN_PLANE_FWHM_FACTOR`` when it carries none)."""
        return IN_PLANE_FWHM_FACTOR if self.in_plane_factor is None else float(self.in_plane_factor)

    def apply(self, stack):
        """A copy of ``stack`` whose thickness is the effective width and, when this profile carries one, whose
        ``in_plane_fwhm_factor`` is its in-plane width (what the operators read)."""
        changes = {}
        if self.width_factor != 1.0:
            changes["thickness_mm"] = self.width_mm(stack)
        if self.in_plane_factor is not None and getattr(stack, "in_plane_fwhm_factor", None) != self.in_plane_factor:
            changes["in_plane_fwhm_factor"] = float(self.in_plane_factor)
        return replace(stack, **changes) if changes else stack

    def with_in_plane(self, factor):
        """This profile with the in-plane width ``factor`` (FWHM / pixel spacing; None: the default)."""
        return replace(self, in_plane_factor=None if factor is None else float(factor))

    def label(self):
        text = f"{self.kind} x{self.width_factor:.2f}"
        return text if self.in_plane_factor is None else f"{text}, in-plane {self.in_plane_factor:g}"

    def as_dict(self, stack=None):
        d = {"kind": self.kind, "width_factor": round(float(self.width_factor), 4),
             "in_plane_fwhm_factor": round(self.effective_in_plane_factor, 4)}
        if stack is not None:
            d["width_mm"] = round(self.width_mm(stack), 3)
            d["nominal_thickness_mm"] = round(float(stack.thickness_mm), 3)
            d["in_plane_fwhm_mm"] = [round(self.effective_in_plane_factor * float(h), 3)
                                     for h in stack.pixel_spacing_mm]
        return d


def check_in_plane_factor(value):
    """An InputError naming the setting unless ``value`` is None or a positive finite in-plane FWHM factor."""
    if value is None:
        return
    try:
        ok = float(value) > 0 and np.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"in-plane PSF width (FWHM / pixel spacing) must be a positive number, got {value!r}")


def candidates(kinds=PSF_KINDS, factors=WIDTH_FACTORS, *, in_plane_factor=None):
    """Every profile of the search: ``kinds`` x ``factors`` (each with the in-plane width ``in_plane_factor``)."""
    return [SliceProfile(k, f, in_plane_factor) for k in kinds for f in factors]


def nominal_profile(stack):
    """The profile assumed for ``stack`` where the data cannot measure it: the slice thickness, shaped by how
    the slices were made. A sequenced (step-and-shoot) CT slice sums detector rows: a slab, so a box; a
    spiral CT slice is interpolated along z, bell-shaped, so a Gaussian, as is MR's or an unknown
    acquisition's (the NiftyMIC/SVRTK convention). Measured against the real 1 mm Philips series
    (README): the sequenced gantry-tilted 2.5 mm series fit a box of the thickness best (Gaussian FWHM =
    thickness 10 % worse in RMS), the spiral 5 mm series a Gaussian (0.9 x)."""
    return SliceProfile("box" if stack.acquisition == "sequenced" else "gaussian")


def validate_psf(value):
    """The PSF setting (``auto``, ``box``, ``gaussian``), or an InputError naming it."""
    if value not in PSF_CHOICES:
        raise InputError(f"unknown PSF '{value}' (--psf: use auto, box or gaussian)")
    return value


__all__ = ["FWHM_PER_SIGMA", "GAUSSIAN_CUTOFF_SIGMAS", "IN_PLANE_FACTORS", "IN_PLANE_FWHM_FACTOR",
           "IN_PLANE_OWN_FACTORS", "PSF_CHOICES",
           "PSF_KINDS", "REGISTRATION_IN_PLANE_FWHM_FACTOR", "SliceProfile", "WIDTH_FACTORS", "candidates",
           "check_in_plane_factor", "check_kind", "nominal_profile", "psf_rows", "psf_sigma_mm", "validate_psf"]
