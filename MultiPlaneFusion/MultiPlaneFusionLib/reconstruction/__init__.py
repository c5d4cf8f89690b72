"""Reconstruction: resampling and the average baseline here; linear operators and solvers for
super-resolution in their own modules (operators -> solvers -> srr)."""

from .average import AverageResult, default_background, fuse_average
from .resample import resample_stack, stack_sampling_image

__all__ = ["AverageResult", "default_background", "fuse_average", "resample_stack", "stack_sampling_image"]
