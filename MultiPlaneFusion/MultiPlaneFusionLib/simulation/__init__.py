"""Synthetic data for tests, demos and benchmarks: an analytic CT head phantom, a thick-slice
acquisition simulator (any orientation, gantry tilt, gaps, patient motion) and a DICOM series writer."""

from .acquisition import simulate_orthogonal_stacks, simulate_stack
from .dicom_writer import write_dicom_series, write_localizer, write_secondary_capture
from .phantom import TISSUE_HU, head_phantom_hu, phantom_bounds_mm, phantom_grid, phantom_hu_xyz, phantom_truth

__all__ = [
    "TISSUE_HU",
    "head_phantom_hu",
    "phantom_bounds_mm",
    "phantom_grid",
    "phantom_hu_xyz",
    "phantom_truth",
    "simulate_orthogonal_stacks",
    "simulate_stack",
    "write_dicom_series",
    "write_localizer",
    "write_secondary_capture",
]
