"""The baseline fusion: every stack resampled onto the grid, combined by a coverage-weighted mean.

It is what most users do by hand (and what sitk_tools' fuse.py or mean compounding do); it blurs every
direction, which is why super-resolution exists, but it stays as the baseline and as the SRR's start.
"""

from dataclasses import dataclass

import numpy as np

from ..progress import Monitor
from ..sampling.resample import resample_stack


def default_background(stacks):
    """-1024 (air in HU) when every stack is CT, else 0."""
    return -1024.0 if stacks and all(s.modality == "CT" for s in stacks) else 0.0


@dataclass
class AverageResult:
    """``volume``: float32 [k, j, i] on the grid; ``coverage``: uint8 count of stacks covering each voxel;
    ``covered_voxels``: how many grid voxels each stack covers (0 means it misses the grid)."""

    volume: np.ndarray
    coverage: np.ndarray
    covered_voxels: list


def fuse_average(stacks, grid, interpolation="linear", background_value=None, monitor=None):
    """Coverage-weighted mean of the stacks resampled onto ``grid``.

    Voxels no stack covers get ``background_value`` (default :func:`default_background`).
    """
    monitor = Monitor.wrap(monitor)
    if background_value is None:
        background_value = default_background(stacks)
    total = np.zeros(grid.shape, dtype=np.float32)
    count = np.zeros(grid.shape, dtype=np.uint8)
    covered_voxels = []
    for n, stack in enumerate(stacks):
        monitor.report("resample", n / len(stacks))
        values, covered = resample_stack(stack, grid, interpolation, monitor)
        total += values  # values are 0 where not covered
        count += covered
        covered_voxels.append(int(np.count_nonzero(covered)))
        del values, covered
    monitor.report("resample", 1.0)
    seen = count > 0
    np.divide(total, np.maximum(count, 1), out=total)
    total[~seen] = background_value
    return AverageResult(volume=total, coverage=count, covered_voxels=covered_voxels)
