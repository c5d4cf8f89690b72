"""The ``multiplanefusion batch`` command: cases, what is done already, the cluster's size, the tables.

Exit codes (through the CLI): 0 when every case is done (now or earlier; duplicates are not run), 1 when
a case failed, the input cannot be used or Dask is not installed, 2 for bad arguments, 130 on Ctrl-C
(finished cases kept, unfinished ones' partial outputs removed; the same command again does the rest).
"""

import importlib.util
import logging
import os
import time
from dataclasses import replace

from .. import __version__, memory
from ..errors import CancelledError, InputError, MultiPlaneFusionError
from ..writing import check_writable, make_folder
from . import record
from .cases import find_duplicates, load_cases
from .estimate import estimate_case_bytes

log = logging.getLogger("MultiPlaneFusionLib")

INSTALL_HINT = "multiplanefusion batch needs the batch extra: pip install 'multiplanefusion[batch]'"


class BatchDependencyError(MultiPlaneFusionError):
    """Dask (dask + distributed) is not installed."""


class BatchFailedError(MultiPlaneFusionError):
    """The batch ran and some cases failed (each one's error is in its row of batch.csv)."""


def require_dask():
    """Raise BatchDependencyError (one line, how to install) unless dask and distributed import."""
    for name in ("dask", "distributed"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise BatchDependencyError(INSTALL_HINT)
    try:
        from . import engine  # noqa: F401
    except ImportError as e:
        raise BatchDependencyError(f"{INSTALL_HINT} ({e})") from None


def available_cpus():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _per_case_options(fuse_options, case_folder):
    """Per-case FuseOptions: --transforms-out names a folder inside each case's folder."""
    reg = fuse_options.registration
    name = getattr(reg, "transforms_out", None)
    if not name:
        return fuse_options
    return replace(fuse_options, registration=replace(reg, transforms_out=os.path.join(case_folder, name)))


def _check_transforms_name(fuse_options):
    name = getattr(fuse_options.registration, "transforms_out", None)
    if name and (os.path.isabs(name) or os.path.normpath(name).startswith("..")):
        raise InputError(f"--transforms-out '{name}': in a batch it names a folder inside each case's folder "
                         "(a relative name such as 'transforms')")
    return name


# Every case runs in a Dask worker process, which holds this process's libraries and its own worker machinery
# (event loop, comms, task state): 38 MB above this process's resident size when idle (distributed 2026.8, a
# one-worker LocalCluster). Without it the estimates were 7-12 % under the cases' peaks (bench_batch.py).
WORKER_PROCESS_EXTRA_BYTES = 40 * 2**20


def plan_workers(estimates, n_cases, budget_bytes, workers=None, cpus=None):
    """``(workers, bytes per worker)`` of a local cluster: ``workers`` when given, else as many as the
    cores, the cases and the largest estimate within the budget allow (at least one)."""
    cpus = cpus or available_cpus()
    if workers is None:
        largest = max([e for e in estimates if e] or [0])
        fit = int(budget_bytes // largest) if largest else cpus
        workers = max(1, min(cpus, max(1, n_cases), fit))
    return workers, budget_bytes / workers


def run_command(args, progress, fuse_options):
    """Run the batch described by the parsed ``args``; returns the totals for --json."""
    from ..model import options_from_args

    require_dask()
    t0 = time.perf_counter()
    transforms_name = _check_transforms_name(fuse_options)
    cases = load_cases(args.input)
    outdir = os.path.abspath(args.output)
    make_folder(outdir)
    check_writable(os.path.join(outdir, "batch.csv"))
    model_options = options_from_args(args)
    fmt = args.model_format
    options_fp = record.options_fingerprint(fuse_options, model_options, fmt)

    rows = {c.case: {"case": c.case, "status": "", "message": "", "patient_id": c.patient_id or None,
                     "study_uid": c.study_uid or None, "outdir": record.case_dir(outdir, c.case),
                     "stacks": c.stacks} for c in cases}
    to_run, input_fps = _cases_to_run(cases, rows, outdir=outdir, options_fp=options_fp)

    # Memory: each case's estimate from its headers, before the cluster is sized.
    from .. import model, report_picture  # noqa: F401 - the worker's libraries, so the baseline below counts them

    baseline = memory.current_rss_bytes() + WORKER_PROCESS_EXTRA_BYTES
    estimates = {c.case: estimate_case_bytes(c.stacks, fuse_options, groups=c.headers, baseline_bytes=baseline)
                 for c in to_run}
    for c in to_run:
        rows[c.case]["estimated_memory_mb"] = record.mb(estimates[c.case])
    scheduler = args.scheduler
    n_workers, per_worker, threads = _cluster_size(args, estimates, n_cases=len(to_run))
    runnable = _cases_within_memory(to_run, estimates, rows, per_worker=per_worker, n_workers=n_workers,
                                    explicit_limit=args.memory_limit_gb)

    specs = [{
        "case": c.case, "stacks": c.stacks, "outdir": outdir,
        "fuse_options": _per_case_options(fuse_options, record.case_dir(outdir, c.case)),
        "model_options": model_options, "model_format": fmt, "input_fingerprint": input_fps[c.case],
        "options_fingerprint": options_fp, "estimated_bytes": estimates[c.case],
        "memory_limit_bytes": int(per_worker) if per_worker else None, "threads": threads,
        "transforms_name": transforms_name,
    } for c in runnable]
    totals = {"command": "batch", "input": os.path.abspath(args.input), "outdir": outdir, "version": __version__,
              "scheduler": scheduler or "local", "workers": n_workers,
              "memory_per_worker_mb": round(per_worker / 1024**2, 1) if per_worker else None,
              "options_fingerprint": options_fp}
    state = _State(outdir, rows, totals, len(runnable), progress, log)
    interrupted = False
    if runnable:
        from . import engine

        log.info("%d cases to run on %s", len(runnable),
                 scheduler or f"a local Dask cluster of {n_workers} worker{'s' if n_workers > 1 else ''} "
                              f"({per_worker / 1024**3:.3g} GB each)")
        try:
            engine.run_specs(specs, state.on_row, state.on_tick, scheduler=scheduler, n_workers=n_workers,
                             memory_per_worker_bytes=per_worker, quiet_logs=not getattr(args, "verbose", False),
                             threads=threads)
        except CancelledError:
            interrupted = True
    _settle_unfinished(runnable, rows, outdir=outdir, input_fps=input_fps, options_fp=options_fp, fmt=fmt,
                       transforms_name=transforms_name)
    counts = {s: sum(r["status"] == s for r in rows.values())
              for s in ("done", "skipped", "failed", "duplicate", "interrupted")}
    totals.update(cases=len(rows), **counts, wall_s=round(time.perf_counter() - t0, 3))
    state.finish()
    record.write_tables(outdir, list(rows.values()), totals)
    _report_outcome(args, rows, counts, outdir=outdir, interrupted=interrupted)
    return totals


def _cases_to_run(cases, rows, *, outdir, options_fp):
    """The cases to run, and the input fingerprints of those readable; the others' rows say why not
    (duplicate, failed, or skipped: done earlier with these inputs and options)."""
    duplicate_of = dict(find_duplicates(cases))
    to_run, input_fps = [], {}
    for n, c in enumerate(cases):
        row = rows[c.case]
        if n in duplicate_of:
            first = cases[duplicate_of[n]].case
            row.update(status="duplicate", message=f"same stacks as case '{first}'; not run twice")
            continue
        if c.problem:
            row.update(status="failed", message=c.problem)
            continue
        try:
            input_fps[c.case] = record.input_fingerprint(c.stacks)
        except MultiPlaneFusionError as e:
            row.update(status="failed", message=str(e))
            continue
        done = record.completed_summary(outdir, c.case, input_fp=input_fps[c.case], options_fp=options_fp)
        if done is not None:
            row.update(status="skipped", message="done earlier with these inputs and options",
                       **record.figures_from_summary(done))
        else:
            to_run.append(c)
    skipped = sum(r["status"] == "skipped" for r in rows.values())
    if skipped:
        log.info("%d of %d cases are done already (same inputs and options): skipped", skipped, len(cases))
    return to_run, input_fps


def _cluster_size(args, estimates, *, n_cases):
    """``(workers, bytes per worker, threads per case)``: for an existing cluster (``--scheduler``) the
    workers are its own and the limit per worker is ``--memory-limit-gb`` (None without it)."""
    explicit_limit = args.memory_limit_gb
    if args.scheduler:
        return None, (explicit_limit * 1024**3 if explicit_limit else None), None
    budget = (explicit_limit if explicit_limit else memory.default_limit_gb()) * 1024**3
    fits = [e for e in estimates.values() if e and e <= budget]
    n_workers, per_worker = plan_workers(fits, n_cases, budget, workers=args.workers)
    threads = None if getattr(args, "threads", None) else max(1, available_cpus() // n_workers)
    return n_workers, per_worker, threads


def _cases_within_memory(to_run, estimates, rows, *, per_worker, n_workers, explicit_limit):
    """The cases whose estimate fits in one worker; the rows of the others say they failed, and why."""
    runnable = []
    for c in to_run:
        need = estimates[c.case]
        if per_worker and need and need > per_worker:
            where = (f"--memory-limit-gb {explicit_limit:g}" if explicit_limit else "90% of the memory available")
            share = f" over {n_workers} workers" if n_workers and n_workers > 1 else ""
            rows[c.case].update(status="failed", message=(
                f"needs about {need / 1024**3:.1f} GB, above the {per_worker / 1024**3:.3g} GB of one worker ({where}"
                f"{share}): use a coarser --spacing, fewer --workers or a higher --memory-limit-gb"))
        else:
            runnable.append(c)
    return runnable


def _settle_unfinished(runnable, rows, *, outdir, input_fps, options_fp, fmt, transforms_name):
    """A case without a row stopped when the batch did: kept if it finished writing, else its partial
    outputs are removed (whatever a killed worker left)."""
    for c in runnable:
        row = rows[c.case]
        if row["status"] in ("done", "failed"):
            continue
        summary = record.completed_summary(outdir, c.case, input_fp=input_fps[c.case], options_fp=options_fp)
        if summary is not None:
            row.update(status="done", message="", **record.figures_from_summary(summary))
        else:
            record.remove_partial(outdir, c.case, model_format=fmt, transforms_name=transforms_name)
            row.update(status="interrupted", message="not finished: the batch was interrupted; run it again")


def _report_outcome(args, rows, counts, *, outdir, interrupted):
    """The one-line outcome (printed unless --quiet, always on failure or interruption), and the error
    the command exits with when the batch was interrupted or a case failed."""
    line = (f"batch: {len(rows)} cases: {counts['done']} done, {counts['skipped']} done earlier, "
            f"{counts['failed']} failed, {counts['duplicate']} duplicate"
            + (f", {counts['interrupted']} not finished" if counts["interrupted"] else "")
            + f"; {os.path.join(outdir, 'batch.csv')}")
    if not getattr(args, "quiet", False) or counts["failed"] or interrupted:
        print(line)
    if interrupted:
        kept, left = counts["done"] + counts["skipped"], counts["interrupted"]
        raise CancelledError(f"interrupted: {_cases(kept)} done kept, {_cases(left)} not finished (no partial "
                             "outputs left); the same command again does the rest")
    if counts["failed"]:
        raise BatchFailedError(f"{counts['failed']} of {len(rows)} cases failed (their errors are in "
                               f"{os.path.join(outdir, 'batch.csv')})")


class _State:
    """Rows as they come in, the progress line and the tables (rewritten at most every few seconds)."""

    def __init__(self, outdir, rows, totals, total, progress, logger):
        from .display import CohortDisplay

        self.outdir, self.rows, self.totals, self.log = outdir, rows, totals, logger
        self.display = None
        if progress is not None:
            old = progress
            self.display = CohortDisplay(total, stream=getattr(old, "stream", None))
            for handler in logging.getLogger().handlers:  # log lines go above the cohort line now
                if getattr(handler, "display", None) is old:
                    handler.display = self.display
        self.done = self.failed = 0
        self.written = time.monotonic()

    def on_row(self, row):
        case = row["case"]
        warnings = row.pop("warnings", None) or []
        self.rows[case].update({k: v for k, v in row.items() if v is not None or k == "message"})
        for w in warnings:
            self.log.warning("case %s: %s", case, w)
        if row["status"] == "done":
            self.done += 1
        elif row["status"] == "failed":
            self.failed += 1
            self.log.warning("case %s failed: %s", case, row["message"])
        if time.monotonic() - self.written >= 2.0:
            self.written = time.monotonic()
            record.write_tables(self.outdir, list(self.rows.values()), self.totals)

    def on_tick(self, running):
        if self.display is not None:
            self.display.update(self.done, self.failed, running)

    def finish(self):
        if self.display is not None:
            self.display.finish()


def _cases(n):
    return f"{n} case" if n == 1 else f"{n} cases"
