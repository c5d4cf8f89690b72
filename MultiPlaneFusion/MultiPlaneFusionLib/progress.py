"""Progress reporting and cooperative cancellation for long steps.

Library functions take ``progress=None`` and ``cancel=None``:

- ``progress(stage, fraction)`` is called with a short stage name ("read", "register", "reconstruct",
  "surface", ...) and the fraction done in [0, 1] of that stage;
- ``cancel`` is a callable returning True, or any object with ``is_set()`` (e.g. ``threading.Event``),
  checked at every iteration; when it fires, :class:`~MultiPlaneFusionLib.errors.CancelledError` is
  raised before anything is written.
"""

from .errors import CancelledError


class Monitor:
    """Bundles a progress callback and a cancel flag; cheap no-ops when both are None."""

    def __init__(self, progress=None, cancel=None):
        self._progress = progress
        self._cancel = cancel

    @classmethod
    def wrap(cls, progress=None, cancel=None):
        if isinstance(progress, Monitor):
            return progress
        return cls(progress, cancel)

    def cancelled(self):
        c = self._cancel
        if c is None:
            return False
        if hasattr(c, "is_set"):
            return bool(c.is_set())
        return bool(c())

    def check(self):
        """Raise CancelledError if cancellation was requested."""
        if self.cancelled():
            raise CancelledError("cancelled by the user; nothing was written")

    def report(self, stage, fraction):
        """Report progress of ``stage`` and check for cancellation."""
        if self._progress is not None:
            self._progress(stage, float(min(1.0, max(0.0, fraction))))
        self.check()

    def sub(self, stage, start, stop):
        """A monitor mapping [0, 1] of a sub-step onto [start, stop] of ``stage``."""
        parent = self

        def cb(_stage, fraction):
            parent.report(stage, start + (stop - start) * fraction)

        return Monitor(cb if self._progress is not None else None, self._cancel)
