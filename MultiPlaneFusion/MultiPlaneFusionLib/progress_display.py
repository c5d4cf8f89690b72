"""The command line's progress line: one monotonic overall percentage, the current stage, elapsed time, ETA.

The library reports ``(stage, fraction of that stage)``; the display weighs the stages of the command
(``plan``: stage -> share of the run's time, rough figures from the benchmarks) into one overall fraction
that never goes back. On a terminal it is a single line redrawn in place, and log messages are printed
above it (:meth:`ProgressDisplay.log_handler`); elsewhere (a log file, CI) it prints a line at most every
``interval_s`` seconds, and the last one.
"""

import logging
import sys
import time

# Shares of a run's time by stage (benchmarks/bench_*.py on the demo and the real series, rounded).
FUSE_PLAN = {"read": 2, "register": 15, "reconstruct": 70, "refine": 10, "write": 3}
MODEL_PLAN = {"read": 3, "segment": 30, "surface": 62, "write": 5}
RUN_PLAN = {"read": 2, "register": 12, "reconstruct": 55, "refine": 8, "segment": 6, "surface": 14, "write": 3}
DEMO_PLAN = {"simulate": 5, **RUN_PLAN}


def clock_text(seconds):
    """Seconds as the progress line shows them: m:ss, or h:mm:ss from an hour."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressDisplay:
    """A ``progress(stage, fraction)`` callback drawing the overall progress on ``stream`` (stderr)."""

    def __init__(self, plan=None, stream=None, interval_s=5.0, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.plan = dict(plan or FUSE_PLAN)
        self.interval_s = float(interval_s)
        self.clock = clock
        self.start = clock()
        self.done = {}
        self.overall = 0.0
        self.stage = ""
        self._shown = False  # a progress line is on the terminal, not yet ended
        self._last_print = None
        self._last_text = None
        self._printed_state = None

    def __call__(self, stage, fraction):
        self.stage = stage
        self.done[stage] = max(self.done.get(stage, 0.0), float(fraction))
        total = sum(self.plan.values())
        overall = sum(w * min(1.0, self.done.get(s, 0.0)) for s, w in self.plan.items()) / total
        self.overall = max(self.overall, overall)  # monotonic, whatever the stages do
        now = self.clock()
        if self.tty:
            text = self.text(now)
            if text != self._last_text:
                self._draw(text)
        elif self._last_print is None or now - self._last_print >= self.interval_s:
            self._print_line(now)

    def _print_line(self, now):
        self._last_print = now
        self._printed_state = (self.overall, self.stage)
        self.stream.write(self.text(now) + "\n")
        self.stream.flush()

    def text(self, now=None):
        now = self.clock() if now is None else now
        elapsed = now - self.start
        f = self.overall
        eta = clock_text(elapsed * (1.0 - f) / f) if f >= 0.02 else "?"
        return f"{100 * f:3.0f}%  {self.stage:<11s} elapsed {clock_text(elapsed)}  ETA {eta}"

    def _draw(self, text):
        self._last_text = text
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def finish(self):
        """End the progress line (before a final message); off a terminal print the last state."""
        if self.tty:
            if self._shown:
                self.stream.write("\n")
                self._shown = False
        elif self._last_print is not None and self._printed_state != (self.overall, self.stage):
            self._print_line(self.clock())
        self.stream.flush()

    def write_log(self, message):
        """Print a log message above the progress line (which is redrawn under it)."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K" + message + "\n")
            self._draw(self._last_text)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def log_handler(self, fmt="%(levelname)s: %(message)s"):
        return _DisplayHandler(self, fmt)


class _DisplayHandler(logging.Handler):
    def __init__(self, display, fmt):
        super().__init__()
        self.display = display
        self.setFormatter(logging.Formatter(fmt))

    def emit(self, record):
        try:
            self.display.write_log(self.format(record))
        except Exception:  # a broken stream must not break the run
            self.handleError(record)
