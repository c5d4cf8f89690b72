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


class CallbackGuard:
    """Carries an interrupt out of a SimpleITK/VTK callback, where the wrappers would swallow it.

    An exception raised inside a SWIG callback (Ctrl-C's KeyboardInterrupt, CancelledError) is printed
    and lost, and the filter carries on. ``guard.call(fn)`` runs ``fn`` and, on such an exception,
    records it and calls ``stop`` (``StopRegistration``, ``SetAbortExecute``); after the filter returns,
    ``guard.reraise()`` raises it in the caller's frame.
    """

    def __init__(self, stop):
        self._stop = stop
        self.error = None

    def call(self, fn, *args):
        if self.error is not None:
            return
        try:
            fn(*args)
        except (KeyboardInterrupt, CancelledError) as e:
            self.error = e
            self._stop()

    def reraise(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise error
