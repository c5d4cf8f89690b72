"""Rigid registration of the stacks: to the reference stack before reconstruction, and to the current
reconstruction between super-resolution cycles. See :mod:`.rigid` for the transform directions."""

from ..transforms import describe_motion, rigid_matrix, target_registration_error
from .options import RegistrationOptions, add_registration_arguments, registration_options_from_args
from .refine import refine_registration
from .rigid import register_stacks, write_transforms

__all__ = [
    "RegistrationOptions",
    "add_registration_arguments",
    "describe_motion",
    "refine_registration",
    "register_stacks",
    "registration_options_from_args",
    "rigid_matrix",
    "target_registration_error",
    "write_transforms",
]
