"""The batch's one progress line: cases finished of those to run, done / failed / running, elapsed, ETA."""

from ..progress_display import ProgressDisplay, clock_text


class CohortDisplay(ProgressDisplay):
    """A ProgressDisplay whose line counts cases (redrawn in place on a terminal, else a line every
    ``interval_s``); the ETA assumes the remaining cases take as long as the finished ones."""

    def __init__(self, total, stream=None, interval_s=5.0, **kw):
        super().__init__({"cases": 1}, stream=stream, interval_s=interval_s, **kw)
        self.total = int(total)
        self.counts = (0, 0, 0)

    def update(self, done, failed, running):
        self.counts = (int(done), int(failed), int(running))
        self("cases", (done + failed) / max(1, self.total))

    def text(self, now=None):
        now = self.clock() if now is None else now
        elapsed = now - self.start
        done, failed, running = self.counts
        finished = done + failed
        eta = clock_text(elapsed * (self.total - finished) / finished) if finished else "?"
        return (f"cases {finished}/{self.total}: {done} done, {failed} failed, {running} running  "
                f"elapsed {clock_text(elapsed)}  ETA {eta}")
