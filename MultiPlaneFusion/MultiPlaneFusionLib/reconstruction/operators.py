"""The forward model of a stack on a grid: :func:`make_operator` picks the path by the stack's angle to the grid.

The operators' contract (``forward``, ``adjoint``, ``normal``, ...) and the model they share are described in
:mod:`.stack_operator`; the paths are :mod:`.separable_operator` (axes parallel to the grid axes),
:mod:`.skew_operator` (the profile integrated along the nearest grid axis, after a pre-shear of the grid when the
slices are tilted), :mod:`.shear_operator` (within ``SHEAR_MAX_DEG`` of them; on request only: the pre-sheared skew
path models the same stacks more closely in less time, see the README) and :mod:`.general_operator` (any
orientation).
"""

from ..errors import InputError
from ..sampling.psf import check_kind
from .general_operator import GeneralOperator
from .separable_operator import SeparableOperator
from .shear_operator import ShearOperator, shear_path_applies
from .skew_operator import SkewOperator, skew_path_applies
from .stack_operator import separable_axes

PATHS = ("auto", "separable", "skew", "shear", "general")


def make_operator(stack, grid, psf="gaussian", path="auto", *, workers=None):
    """The forward model of ``stack`` on ``grid``.

    Parameters
    ----------
    stack : Stack
        With its registration ``transform`` (scanner -> patient) applied.
    grid : Grid
    psf : {"gaussian", "box"}
        Through-plane slice profile (in-plane is always Gaussian, FWHM ``IN_PLANE_FWHM_FACTOR`` x pixel spacing).
    path : {"auto", "separable", "skew", "shear", "general"}
        ``auto`` takes the separable path when :func:`.stack_operator.separable_axes` allows it, else the skew
        path while its profile drift (:func:`.skew_operator.skew_drift_voxels`) is at most
        ``SKEW_MAX_DRIFT_VOXELS``, else the skew path with its pre-shear (the grid sheared once along one axis so
        that the profile runs along the normal: gantry tilts) while the drift left is within the limit, else
        with the pre-shear along both in-plane axes (no drift left) for a normal within ``PRE_SHEAR_MAX_DEG``
        of a grid axis, else the general one. The shear path is taken only when asked for.
    workers : parallel.Workers, optional
        Threads for the parts of the build that pass over the grid (the skew path's normalisation).

    Returns
    -------
    StackOperator
    """
    check_kind(psf)
    if path not in PATHS:
        raise InputError(f"unknown operator path '{path}' (use auto, separable, skew, shear or general)")
    axes = separable_axes(stack, grid) if path in ("auto", "separable") else None
    if path == "separable" and axes is None:
        raise InputError(f"'{stack.description}' is not aligned with the grid axes; use the general path")
    if axes is not None:
        return SeparableOperator(stack, grid, psf, axes)
    if path in ("auto", "skew"):
        if skew_path_applies(stack, grid, psf):
            return SkewOperator(stack, grid, psf, workers=workers)
        if path == "skew":
            raise InputError(f"'{stack.description}' is tilted too far from the grid axes for the skew path")
    if path == "auto":
        for axes in (1, 2):
            if skew_path_applies(stack, grid, psf, pre_shear=axes):
                return SkewOperator(stack, grid, psf, pre_shear=axes, workers=workers)
    if path == "shear":
        if shear_path_applies(stack, grid):
            return ShearOperator(stack, grid, psf)
        raise InputError(f"'{stack.description}' is rotated too far from the grid axes for the shear path")
    return GeneralOperator(stack, grid, psf)


__all__ = ["PATHS", "make_operator"]
