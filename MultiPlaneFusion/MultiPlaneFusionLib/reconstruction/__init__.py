"""Reconstruction: the average baseline here; super-resolution in its own modules. The acquisition model
they build on (PSF, slice profiles, resampling) is :mod:`MultiPlaneFusionLib.sampling`.

Layers, lowest first: ``banded`` (banded-matrix kernel); ``stack_operator`` (the operator contract, the
stack/grid geometry), the four paths ``separable_operator``, ``general_operator``, ``shear_operator`` and
``skew_operator``, and ``operators.make_operator`` (the choice between them); ``smoothing``, ``penalty`` and
``workspace`` (Gaussian filter, first-order penalty and Huber weights, work memory) under ``solvers``; ``intensity`` and
``autotune`` (agreement, settings from the data); ``options`` (SrrOptions and its flags) and ``srr`` (the
reconstruction); ``budget`` (the memory check by the path each stack takes). ``parallel`` (threads) serves
them all.
"""

from .average import AverageResult, default_background, fuse_average

__all__ = ["AverageResult", "default_background", "fuse_average"]
