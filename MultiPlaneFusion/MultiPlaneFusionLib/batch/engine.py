"""Running a batch's cases on Dask distributed: a LocalCluster, or the workers of an existing scheduler.

This is the only module of the library that imports Dask; only ``multiplanefusion batch`` imports it.
Each case is one task (:func:`run_case`) that runs the same pipeline as ``run`` into ``OUTDIR/<case>/``
and returns its table row; errors of a case come back in its row, never as a task failure, so one bad
case cannot stop the others. A case whose worker process dies (killed, or stopped by the nanny above
its memory limit) is submitted once more, then reported failed.
"""

import collections
import contextlib
import ctypes
import datetime
import gc
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import replace

import dask
from distributed import Client, Event, KilledWorker, LocalCluster, get_worker

from .. import __version__, memory
from ..errors import CancelledError, MultiPlaneFusionError
from . import record

log = logging.getLogger("MultiPlaneFusionLib")

# Dask resource every task asks for (its memory estimate, bytes) and every worker of ours offers.
MEMORY_RESOURCE = "MEMORY"
# Attempts of a case whose worker died: the first, and one retry.
ATTEMPTS = 2
# Topic of the "case started" events the workers send to the scheduler.
STARTED_TOPIC = "multiplanefusion-batch-started"
# How long an interrupted batch waits for the running cases to stop and remove their partial outputs.
CANCEL_WAIT_S = 30.0
# How often a running case asks the scheduler whether the batch was interrupted.
CANCEL_POLL_S = 0.5
# The tables are rewritten after every case, at most this often (and at the end).
TABLE_INTERVAL_S = 2.0


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------------------------- worker
def _give_back_memory():
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # the next case starts from a small process


class _CaseLog(logging.Handler):
    """Collects the library's warnings during a case, for its summary and row, instead of letting the
    worker print them (they would tear the client's progress line)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []
        self._logger = logging.getLogger("MultiPlaneFusionLib")

    def emit(self, record_):
        self.messages.append(record_.getMessage())

    def __enter__(self):
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


class _Interrupted:
    """``cancel`` for run_to_folder: True once the batch's Event is set (asked at most every
    CANCEL_POLL_S; a scheduler that went away counts as an interrupt)."""

    def __init__(self, name):
        self.name = name
        self.asked = None
        self.state = False

    def __call__(self):
        now = time.monotonic()
        if self.name and not self.state and (self.asked is None or now - self.asked >= CANCEL_POLL_S):
            self.asked = now
            try:
                self.state = bool(Event(self.name).is_set())
            except Exception:  # noqa: BLE001 - no scheduler to ask: the batch is over
                self.state = True
        return self.state


def _test_kill_hook(case, attempt):
    """Test hook: ``MULTIPLANEFUSION_TEST_BATCH_KILL=CASE[:N],...`` kills (SIGKILL) the worker running CASE
    once its fused volume is written (on attempts up to N, default all), as the OOM killer would."""
    for entry in os.environ.get("MULTIPLANEFUSION_TEST_BATCH_KILL", "").split(","):
        name, _, upto = entry.strip().partition(":")
        if name == case and (not upto or attempt <= int(upto)):
            break
    else:
        return None

    def progress(stage, fraction):
        if stage == "write" and fraction >= 0.4:
            os.kill(os.getpid(), signal.SIGKILL)

    return progress


def _worker_name():
    try:
        return get_worker().address
    except ValueError:
        return f"{socket.gethostname()}:{os.getpid()}"


def _worker_threads():
    with contextlib.suppress(ValueError, AttributeError):
        return int(get_worker().state.nthreads)
    return 1


def _worker_memory_limit():
    with contextlib.suppress(ValueError, AttributeError):
        limit = get_worker().memory_manager.memory_limit
        if limit:
            return int(limit)
    return None


def _case_options(spec, limit_bytes):
    fuse = spec["fuse_options"]
    if limit_bytes:
        fuse = replace(fuse, memory_limit_gb=limit_bytes / 1024**3)
    threads = spec.get("threads")
    if threads:
        import SimpleITK as sitk

        from ..reconstruction.options import SrrOptions

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
        with contextlib.suppress(ImportError, AttributeError):
            from vtkmodules.vtkCommonCore import vtkSMPTools

            vtkSMPTools.Initialize(int(threads))  # the surface filters' own thread pool
        srr = fuse.srr if fuse.srr is not None else SrrOptions()
        if getattr(srr, "threads", None) is None:
            fuse = replace(fuse, srr=replace(srr, threads=int(threads)))
    return fuse


def run_case(spec):
    """Run one case on this worker; returns its row (never raises for a problem of the case).

    ``spec``: case, stacks, outdir, fuse_options, model_options, model_format, input_fingerprint,
    options_fingerprint, attempt, estimated_bytes, memory_limit_bytes (None: the worker's own limit),
    threads (None: the library's default), cancel_event (name of the batch's Event)."""
    case, outdir = spec["case"], spec["outdir"]
    started, t = _utc_now(), time.perf_counter()
    interrupted = _Interrupted(spec.get("cancel_event"))
    row = {"case": case, "attempts": spec["attempt"], "started_utc": started, "worker": _worker_name()}
    with contextlib.suppress(ValueError):  # the client tells a case killed while running from one queued behind it
        get_worker().log_event(STARTED_TOPIC, {"key": spec.get("key")})
    if interrupted():
        return {**row, "status": "interrupted", "message": "the batch was interrupted before this case started"}
    from ..pipeline import run_to_folder

    limit = spec.get("memory_limit_bytes") or _worker_memory_limit()
    # A worker of several threads runs several cases in one process: their peaks cannot be told apart.
    peak_is_case = _worker_threads() == 1 and memory.reset_peak_rss()  # the peak read after a case is its own
    try:
        with _CaseLog() as case_log:
            record.forget(outdir, case)
            result = run_to_folder(spec["stacks"], record.case_dir(outdir, case),
                                   fuse_options=_case_options(spec, limit), model_options=spec["model_options"],
                                   model_format=spec["model_format"], progress=_test_kill_hook(case, spec["attempt"]),
                                   cancel=interrupted, overwrite=True)
            summary = dict(result.summary)
            summary["batch"] = {
                "case": case, "stacks": spec["stacks"], "input_fingerprint": spec["input_fingerprint"],
                "options_fingerprint": spec["options_fingerprint"], "started_utc": started,
                "finished_utc": _utc_now(), "wall_s": round(time.perf_counter() - t, 3),
                "peak_memory_mb": memory.peak_rss_mb(),
                "peak_memory_of": "this case" if peak_is_case else "the worker process so far",
                "estimated_memory_mb": record.mb(spec.get("estimated_bytes")), "memory_limit_mb": record.mb(limit),
                "attempts": spec["attempt"], "worker": row["worker"], "warnings": case_log.messages,
                "version": __version__,
            }
            record.write_summary(outdir, case, summary)  # last: the mark that the case is done
        return {**row, "status": "done", "message": "", "warnings": case_log.messages,
                **record.figures_from_summary(summary)}
    except CancelledError:
        record.remove_partial(outdir, case, model_format=spec["model_format"],
                              transforms_name=spec.get("transforms_name"))
        return {**row, "status": "interrupted", "message": "interrupted; its partial outputs were removed"}
    except MultiPlaneFusionError as e:
        message = str(e)
    except MemoryError:
        message = "out of memory; use a coarser --spacing, fewer --workers or a smaller region"
    except Exception as e:  # noqa: BLE001 - a bug in one case must not stop the batch; reported in its row
        text = str(e).strip().splitlines()
        message = f"unexpected {type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
    finally:
        _give_back_memory()
    record.remove_partial(outdir, case, model_format=spec["model_format"], transforms_name=spec.get("transforms_name"))
    return {**row, "status": "failed", "message": message, "finished_utc": _utc_now(),
            "wall_s": round(time.perf_counter() - t, 3), "peak_memory_mb": memory.peak_rss_mb(),
            "warnings": case_log.messages}


# ---------------------------------------------------------------------------------------------- client
def dask_setup(worker):
    """Dask preload hook, run in each worker process of the local cluster once it has started: a
    terminal's Ctrl-C reaches the whole process group, and only the client may act on it (it tells the
    running cases to stop, so that they remove their partial outputs). The first workers are started
    with SIGINT ignored already (see run_specs); this covers those the nanny restarts after a kill."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing to do
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _sigint_ignored():
    """Ignore Ctrl-C for a moment. While the cluster starts: its worker processes inherit the ignored
    signal (a Ctrl-C in those seconds is lost; the next one stops the batch). While it closes: a second
    Ctrl-C must not leave it half shut."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_local_cluster(n_workers, memory_per_worker_bytes, quiet_logs=True, threads=None):
    """A LocalCluster of ``n_workers`` processes of one thread, each offering its memory as the
    ``MEMORY`` resource and limited to it (Dask's nanny restarts a worker above 95 % of it).

    ``threads``: the cores each worker's case may use; the libraries that size their thread pools from
    the machine's cores when they load (ITK, Mesa's software renderer for the report picture) are told
    through the environment, so that the workers do not oversubscribe the cores."""
    env = {}
    if threads:
        env = {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads), "LP_NUM_THREADS": str(threads)}
    settings = {
        "distributed.scheduler.allowed-failures": 0,  # a killed case is retried by us, once
        "distributed.worker.memory.target": False,  # no Dask data to spill: the cases hold their own arrays
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.terminate": 0.95,
    }
    with dask.config.set(settings):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               memory_limit=int(memory_per_worker_bytes),
                               resources={MEMORY_RESOURCE: int(memory_per_worker_bytes)}, env=env,
                               preload=[__name__],  # dask_setup above
                               dashboard_address=None, silence_logs=logging.CRITICAL if quiet_logs else logging.WARNING)
        client = Client(cluster, set_as_default=False)
    return cluster, client


def worker_resources(client):
    """``(threads, smallest MEMORY resource or None when some worker offers none)`` of the cluster."""
    import inspect

    kwargs = {"n_workers": -1} if "n_workers" in inspect.signature(client.scheduler_info).parameters else {}
    workers = client.scheduler_info(**kwargs).get("workers", {})  # newer Dask lists 5 workers unless told
    threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
    offers = [w.get("resources", {}).get(MEMORY_RESOURCE) for w in workers.values()]
    memory_offer = min(offers) if offers and all(offers) else None
    return threads, memory_offer


class Runner:
    """Runs the cases with at most one per worker thread in flight (more are submitted as cases finish),
    so that a worker holds only the case it is running: a worker that dies takes no queued case down
    with it, and the count of running cases is exact. Retries a killed case once; stops in order on
    Ctrl-C.

    ``on_row(row)`` is called for each finished case and ``on_tick(running)`` a few times a second, both
    in the calling thread; ``threads()`` gives the cluster's worker threads now (an external cluster
    may grow or shrink)."""

    TICK_S = 0.25
    REFRESH_S = 1.0

    def __init__(self, client, specs, on_row, on_tick=None, threads=None, use_resources=True):
        self.client = client
        self.specs = {s["case"]: s for s in specs}
        self.queue = collections.deque((case, 1) for case in self.specs)
        self.on_row = on_row
        self.on_tick = on_tick or (lambda running: None)
        self.threads = threads or (lambda: 1)
        self.use_resources = use_resources
        self.event_name = f"multiplanefusion-batch-{uuid.uuid4().hex}"
        self.pending = {}  # future key -> (future, case, attempt)
        self.finished = set()

    def _submit(self, case, attempt):
        key = f"multiplanefusion-case-{uuid.uuid4().hex}"
        spec = {**self.specs[case], "attempt": attempt, "cancel_event": self.event_name, "key": key}
        resources = None
        if self.use_resources and spec.get("estimated_bytes"):
            resources = {MEMORY_RESOURCE: int(spec["estimated_bytes"])}
        future = self.client.submit(run_case, spec, key=key, pure=False, retries=0, resources=resources)
        self.pending[future.key] = (future, case, attempt)

    def _started(self, key):
        """True when the task ``key`` began running (its worker said so), False when it never did (it
        was waiting on a worker that died, e.g. while that worker restarted)."""
        try:
            events = self.client.get_events(STARTED_TOPIC)
        except Exception:  # noqa: BLE001 - cannot tell: count the attempt
            return True
        return any(isinstance(msg, dict) and msg.get("key") == key for _, msg in events)

    def run(self):
        try:
            Event(self.event_name, client=self.client).clear()
            slots, refreshed = max(1, self.threads()), time.monotonic()
            while self.pending or self.queue:
                if time.monotonic() - refreshed >= self.REFRESH_S:
                    slots, refreshed = max(1, self.threads()), time.monotonic()
                while self.queue and len(self.pending) < slots:
                    self._submit(*self.queue.popleft())
                done = [key for key, (future, _, _) in self.pending.items() if future.done()]
                for key in done:
                    self._collect(*self.pending.pop(key))
                self.on_tick(len(self.pending))
                if not done:
                    time.sleep(self.TICK_S)
        except KeyboardInterrupt:
            self._interrupt()
            raise

    def _collect(self, future, case, attempt):
        spec = self.specs[case]
        try:
            row = future.result()
        except KilledWorker:
            if not self._started(future.key):
                self.queue.appendleft((case, attempt))  # it never ran: not an attempt
                return
            if attempt < ATTEMPTS:
                log.warning("case %s: its worker died (killed, or above its memory limit); running it again", case)
                self.queue.appendleft((case, attempt + 1))
                return
            limit = spec.get("memory_limit_bytes")
            record.remove_partial(spec["outdir"], case, model_format=spec["model_format"],
                                  transforms_name=spec.get("transforms_name"))
            row = {"case": case, "status": "failed", "attempts": attempt,
                   "message": f"its worker died on all {attempt} attempts (killed, or above its memory limit"
                              + (f" of {limit / 1024**3:.3g} GB" if limit else "") + "); partial outputs removed"}
        except Exception as e:  # noqa: BLE001 - Dask could not run the task at all: this case fails
            record.remove_partial(spec["outdir"], case, model_format=spec["model_format"],
                                  transforms_name=spec.get("transforms_name"))
            text = str(e).strip().splitlines()
            row = {"case": case, "status": "failed", "attempts": attempt,
                   "message": f"Dask could not run it: {type(e).__name__}: {text[0] if text else ''}"}
        self.finished.add(case)
        self.on_row(row)

    def _interrupt(self):
        """Ctrl-C: tell the running cases to stop (they remove their partial outputs), wait for them a
        while, then cancel the rest. A second Ctrl-C stops waiting."""
        try:
            Event(self.event_name, client=self.client).set()
            deadline = time.monotonic() + CANCEL_WAIT_S
            for future, _case, _attempt in list(self.pending.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(Exception):
                    future.result(timeout=left)
        except KeyboardInterrupt:
            pass
        finally:
            with contextlib.suppress(Exception):
                self.client.cancel([f for f, _, _ in self.pending.values()])


def run_specs(specs, on_row, on_tick=None, *, scheduler=None, n_workers=1, memory_per_worker_bytes=None,
              quiet_logs=True, threads=None):
    """Run the case ``specs`` on a new LocalCluster (``n_workers``) or on ``scheduler``'s cluster (see
    :class:`Runner` for the callbacks); returns the Runner. Ctrl-C: the running cases are stopped and
    their partial outputs removed, the cluster shut down, then CancelledError."""
    cluster = None
    loggers = [logging.getLogger(name) for name in ("distributed", "asyncio", "tornado")]
    levels = [lg.level for lg in loggers]
    # Dask's own messages (cluster start, worker restarts) would bury the cohort line; --verbose keeps its warnings.
    loggers[0].setLevel(logging.CRITICAL if quiet_logs else logging.WARNING)
    interrupted = False
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout="20s", set_as_default=False)
            except (OSError, TimeoutError) as e:
                raise MultiPlaneFusionError(f"cannot connect to the Dask scheduler '{scheduler}': {e}") from None
            _, offer = worker_resources(client)
            use_resources = offer is not None

            def slots():
                return worker_resources(client)[0]

            if not use_resources:
                log.info("the workers of %s offer no %s resource: cases are placed by Dask alone "
                         "(start workers with --resources %s=BYTES to place them by memory)",
                         scheduler, MEMORY_RESOURCE, MEMORY_RESOURCE)
        else:
            with _sigint_ignored():
                cluster, client = start_local_cluster(n_workers, memory_per_worker_bytes=memory_per_worker_bytes,
                                                      quiet_logs=quiet_logs, threads=threads)
            # Our workers are alike and each can hold the largest case: one case per worker is the limit.
            use_resources = False

            def slots():
                return worker_resources(client)[0]  # a worker restarting after a kill has no case yet
        runner = Runner(client, specs, on_row, on_tick, slots, use_resources)
        try:
            runner.run()
        finally:
            with contextlib.suppress(Exception):
                client.close()
        return runner
    except KeyboardInterrupt:
        interrupted = True
        raise CancelledError("interrupted") from None
    finally:
        if interrupted:  # a cluster stopped while starting reports its half-made parts at exit: not for users
            for lg in loggers:
                lg.setLevel(logging.CRITICAL)
        if cluster is not None:
            with contextlib.suppress(Exception), _sigint_ignored():
                cluster.close()
        if not interrupted:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
