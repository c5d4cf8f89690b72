"""The CLI's progress line: monotonic overall fraction, ETA, throttled off a terminal, logs above it."""

import io
import logging

from MultiPlaneFusionLib.progress_display import RUN_PLAN, ProgressDisplay


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class TTY(io.StringIO):
    def isatty(self):
        return True


def feed(display, clock, calls, dt=1.0):
    seen = []
    for stage, fraction in calls:
        clock.t += dt
        display(stage, fraction)
        seen.append(display.overall)
    return seen


# The refinement's order: reconstruct 0-50 %, refine 0-100 %, reconstruct 50-100 %.
CALLS = ([("read", 0.0), ("read", 1.0)] + [("register", f / 10) for f in range(11)]
         + [("reconstruct", f / 20) for f in range(11)] + [("refine", f / 4) for f in range(5)]
         + [("reconstruct", 0.5 + f / 20) for f in range(11)] + [("segment", f / 4) for f in range(5)]
         + [("surface", f / 10) for f in range(11)] + [("write", 0.0), ("write", 1.0)])


def test_overall_is_monotonic_and_reaches_one():
    clock = FakeClock()
    d = ProgressDisplay(RUN_PLAN, io.StringIO(), clock=clock)
    seen = feed(d, clock, CALLS)
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    assert seen[-1] == 1.0
    assert "ETA 0:00" in d.text()


def test_off_a_terminal_at_most_one_line_per_interval():
    clock = FakeClock()
    out = io.StringIO()
    d = ProgressDisplay(RUN_PLAN, out, interval_s=5.0, clock=clock)
    feed(d, clock, CALLS, dt=0.5)  # 0.5 s apart: 58 reports in 29 s
    d.finish()
    lines = out.getvalue().splitlines()
    assert 4 <= len(lines) <= 1 + 29 / 5 + 1, lines
    assert lines[-1].startswith("100%") and "elapsed 0:29" in lines[-1]
    pct = [int(ln.split("%")[0]) for ln in lines]
    assert pct == sorted(pct)


def test_eta_from_elapsed_and_fraction():
    clock = FakeClock()
    d = ProgressDisplay({"a": 1, "b": 1}, io.StringIO(), clock=clock)
    clock.t = 60.0
    d("a", 1.0)  # half done after a minute
    assert d.text().startswith(" 50%  a") and "elapsed 1:00" in d.text() and "ETA 1:00" in d.text()


def test_log_lines_go_above_the_progress_line_on_a_terminal():
    clock = FakeClock()
    out = TTY()
    d = ProgressDisplay({"reconstruct": 1}, out, clock=clock)
    log = logging.getLogger("test_progress_display")
    log.propagate = False
    log.addHandler(d.log_handler())
    try:
        d("reconstruct", 0.17)
        log.warning("SRR says hello")
        d("reconstruct", 0.5)
        d.finish()
    finally:
        log.handlers.clear()
    text = out.getvalue()
    # every log message starts at the beginning of a cleared line and ends with a newline
    assert "\r\x1b[KWARNING: SRR says hello\n" in text
    visible = [seg.split("\r")[-1].replace("\x1b[K", "") for seg in text.split("\n")]
    assert visible[0] == "WARNING: SRR says hello"
    assert visible[1].startswith(" 50%  reconstruct")
    assert text.endswith("\n")
