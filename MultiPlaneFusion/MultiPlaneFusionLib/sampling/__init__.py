"""How a stack samples the patient: its point-spread function (slice profile and in-plane blur) and the
resampling of its pixels onto a grid.

Both registration and reconstruction build on this acquisition model, so it sits below them.
"""

from .psf import PSF_CHOICES, PSF_KINDS, SliceProfile, psf_sigma_mm
from .resample import resample_stack, stack_sampling_image

__all__ = ["PSF_CHOICES", "PSF_KINDS", "SliceProfile", "psf_sigma_mm", "resample_stack", "stack_sampling_image"]
