"""Through-plane slice profiles: the model family and its candidates for the data-driven choice.

A slice profile is a kind ("box": a slab, as slab-averaged MPR reformats and many CT recons have;
"gaussian": the conventional approximation of a scanner's slice sensitivity) and an effective width
relative to the nominal slice thickness t: box of full width ``factor * t``, or Gaussian of
FWHM ``factor * t``. In-plane the PSF is always Gaussian, FWHM 1.2 x pixel spacing (:mod:`.operators`).

The operators take the kind as ``psf`` and the width from ``stack.thickness_mm``, so a profile is
applied by handing the operator a copy of the stack whose thickness is the effective width
(:meth:`SliceProfile.apply`); nothing else of the stack changes (its slice positions, steps, data
weight and coverage are geometric, not profile properties).

:func:`choose_profile` keeps, per stack, the candidate that best predicts the stack from a
reconstruction of the OTHER stacks (see :mod:`.autotune`): the other stacks see this stack's
through-plane direction in-plane, sharply, so the profile that maps their fusion onto this stack's
samples is measurable from the data.
"""

from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError

PSF_KINDS = ("box", "gaussian")
PSF_CHOICES = ("auto",) + PSF_KINDS
# Candidate widths relative to the nominal thickness: the DICOM SliceThickness is usually right within
# 10-20 %; a wider search would only let noise pick implausible widths.
WIDTH_FACTORS = (0.8, 0.9, 1.0, 1.1, 1.25)


@dataclass(frozen=True)
class SliceProfile:
    """``kind`` ("box" or "gaussian") and ``width_factor``: effective width / nominal thickness."""

    kind: str = "gaussian"
    width_factor: float = 1.0

    def __post_init__(self):
        if self.kind not in PSF_KINDS:
            raise InputError(f"unknown PSF '{self.kind}' (--psf: use auto, box or gaussian)")
        if not (self.width_factor > 0 and np.isfinite(self.width_factor)):
            raise InputError(f"PSF width factor must be positive, got {self.width_factor}")

    def width_mm(self, stack):
        """Box width or Gaussian FWHM of this profile for ``stack``, mm."""
        return float(stack.thickness_mm) * float(self.width_factor)

    def apply(self, stack):
        """A copy of ``stack`` whose thickness is the effective width (what the operators read)."""
        if self.width_factor == 1.0:
            return stack
        return replace(stack, thickness_mm=self.width_mm(stack))

    def label(self):
        return f"{self.kind} x{self.width_factor:.2f}"

    def as_dict(self, stack=None):
        d = {"kind": self.kind, "width_factor": round(float(self.width_factor), 4)}
        if stack is not None:
            d["width_mm"] = round(self.width_mm(stack), 3)
            d["nominal_thickness_mm"] = round(float(stack.thickness_mm), 3)
        return d


def candidates(kinds=PSF_KINDS, factors=WIDTH_FACTORS):
    """Every profile of the search: ``kinds`` x ``factors``."""
    return [SliceProfile(k, f) for k in kinds for f in factors]


def validate_psf(value):
    """The PSF setting (``auto``, ``box``, ``gaussian``), or an InputError naming it."""
    if value not in PSF_CHOICES:
        raise InputError(f"unknown PSF '{value}' (--psf: use auto, box or gaussian)")
    return value


def choose_profile(predictions, measured, weights=None):
    """Index of the candidate whose prediction fits ``measured`` best, and every candidate's error.

    Parameters
    ----------
    predictions : list of ndarray
        Per candidate, the predicted samples (same shape as ``measured``).
    measured : ndarray
        The stack's samples being predicted.
    weights : ndarray of bool or float, optional
        Samples to score (e.g. well inside the region the prediction is reliable in).

    Returns
    -------
    best : int
    rms : list of float
        Root-mean-square prediction error per candidate, input units.

    The error is plain least squares in the data's units: the same functional the reconstruction
    minimises, so the chosen profile is the one under which the stacks are most consistent.
    """
    m = np.asarray(measured, dtype=np.float64)
    w = np.ones(m.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    tw = float(w.sum())
    if tw <= 0:
        raise InputError("no samples to compare slice profiles on")
    rms = []
    for p in predictions:
        d = np.asarray(p, dtype=np.float64) - m
        rms.append(float(np.sqrt(float((w * d * d).sum()) / tw)))
    return int(np.argmin(rms)), rms


__all__ = ["PSF_CHOICES", "PSF_KINDS", "SliceProfile", "WIDTH_FACTORS", "candidates", "choose_profile",
           "validate_psf"]
