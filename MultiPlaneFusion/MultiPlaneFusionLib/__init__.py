"""MultiPlaneFusion: fuse thick-slice CT/MR series in several planes into one isotropic volume
and a watertight bone model.

Data flows one way: reading series into stacks -> reconstruction grid -> registration ->
reconstruction -> segmentation -> surface -> export; :mod:`.pipeline` strings them together.
Physical space is LPS in millimetres; arrays are indexed [k, j, i].
"""

from .errors import CancelledError, InputError, MemoryLimitError, MultiPlaneFusionError, OutputError
from .grid import Grid, grid_for_stacks, grid_from_image
from .stack import Stack, orientation_label

__version__ = "0.1.0"

__all__ = [
    "CancelledError",
    "Grid",
    "InputError",
    "MemoryLimitError",
    "MultiPlaneFusionError",
    "OutputError",
    "Stack",
    "grid_for_stacks",
    "grid_from_image",
    "orientation_label",
]
