"""The library's exceptions.

Every user-facing failure raises a subclass of :class:`MultiPlaneFusionError` whose message is one
line; the CLI prints it without a traceback and exits non-zero, the Slicer module shows it.
"""


class MultiPlaneFusionError(Exception):
    """Base class: a problem with the user's input, settings or environment, not a bug."""


class InputError(MultiPlaneFusionError):
    """Unreadable, missing or unsuitable input (paths, DICOM, stacks that do not overlap)."""


class MemoryLimitError(MultiPlaneFusionError):
    """The estimated memory of a step exceeds the allowed limit."""


class OutputError(MultiPlaneFusionError):
    """An output file or folder cannot be written."""


class CancelledError(MultiPlaneFusionError):
    """The user cancelled a long operation; nothing was written."""
