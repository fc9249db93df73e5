"""Ray plumbing shared by the stages: one cluster session and a bounded stream of tasks
(signals: kdm_pipe.interrupts)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import ray

from kdm_pipe.errors import ConfigError, DataError, disk_full
from kdm_pipe.interrupts import SIGNALS, Terminated, as_terminated, raise_terminated, restore


@contextmanager
def ray_session(address: str | None, num_cpus: float, num_gpus: float = 0) -> Iterator[None]:
    """Connect to `address`, or start a local cluster sized for the job; shut down what we started.

    While the session is open SIGTERM / SIGINT raise Terminated (ray.init replaces the SIGTERM handler with
    sys.exit(15), and its C++ core installs a failure handler that dumps a stack and aborts with 134); the handlers
    from before are restored after ray.shutdown.
    """
    if ray.is_initialized():                     # a caller (a test, a notebook) already owns the session
        yield
        return
    main = threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in SIGNALS} if main else {}
    try:
        with _signals_seen(main) as seen:
            _init(address, num_cpus, num_gpus)
        if seen:                                 # it landed where Python ignores exceptions (a fork hook, a __del__)
            raise Terminated(seen[0])
    except (SystemExit, KeyboardInterrupt) as e:  # Ray's own handler (sys.exit(15)) or Ctrl-C fired during init
        ray.shutdown()
        restore(before)
        if isinstance(e, KeyboardInterrupt):
            raise (as_terminated() or Terminated(signal.SIGINT)) from None
        if e.code == signal.SIGTERM and not isinstance(e, Terminated):
            raise Terminated(signal.SIGTERM) from None
        raise
    try:
        for s in before:
            signal.signal(s, raise_terminated)
        yield
    except KeyboardInterrupt:
        raise (as_terminated() or Terminated(signal.SIGINT)) from None
    finally:
        try:
            ray.shutdown()
        finally:
            restore(before)


@contextmanager
def _signals_seen(main: bool) -> Iterator[list[int]]:
    """The SIGTERM / SIGINT that arrived in the body, whatever Python did with its handler's exception: ray.init
    forks while Ray's handler is installed, and a sys.exit raised inside an at-fork hook is printed and dropped, so
    the process would go on as if never asked to stop. CPython writes every signal's number to the wakeup fd; the
    dropped exception's "Exception ignored" traceback is not printed (the stop is reported once, as one line)."""
    seen: list[int] = []
    if not main:                                 # only the main thread receives signals and may set the fd
        yield seen
        return
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    old, old_hook = signal.set_wakeup_fd(w, warn_on_full_buffer=False), sys.unraisablehook

    def hook(u: Any) -> None:
        if not issubclass(u.exc_type, (SystemExit, KeyboardInterrupt)):
            old_hook(u)

    sys.unraisablehook = hook
    try:
        yield seen
    finally:
        signal.set_wakeup_fd(old)
        sys.unraisablehook = old_hook
        try:
            seen.extend(b for b in os.read(r, 1024) if b in SIGNALS)
        except BlockingIOError:
            pass
        os.close(r)
        os.close(w)


def _init(address: str | None, num_cpus: float, num_gpus: float) -> None:
    # The stages report a failed task once, as one line; Ray would print it again as a traceback when the reference
    # to the failed result goes.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    address = address or os.environ.get("RAY_ADDRESS")     # set inside a RayJob / a Ray cluster's containers
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # A private single-machine cluster: no auth token written to $HOME, no usage reporting, no dashboard.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray starts workers at nice 15 (made for shared clusters): on the user's own machine the job it was asked
        # to run would then crawl beside any other process (20–50× slower next to one busy job, measured).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray's own INFO lines are not printed (they would glue onto a progress bar); its warnings and errors are.
        ray.init(num_cpus=max(1, int(round(num_cpus))), num_gpus=int(num_gpus) if num_gpus else None,
                 include_dashboard=False, object_store_memory=256 * 1024 * 1024, log_to_driver=True,
                 logging_level=logging.WARNING)


def in_process(address: str | None, work: float, threshold: float) -> bool:
    """Whether a job of `work` units is done in this process rather than in Ray tasks: only without a cluster to
    use (no `address`, no session already open) and when starting one (seconds) would cost more than the work."""
    return (address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
            and work <= threshold)


def run_bounded(remote_fn: Any, calls: Iterable[tuple], max_in_flight: int) -> Iterator[Any]:
    """Submit `remote_fn.remote(*args)` for each call with at most `max_in_flight` pending;
    yield results as they finish.

    Bounding keeps the driver's memory and the object store flat for any number of shards; `calls` is consumed
    lazily, so it may be a generator over a huge plan.
    """
    pending, queue = [], iter(calls)
    while True:
        for args in queue:
            pending.append(remote_fn.remote(*args))
            if len(pending) >= max_in_flight:
                break
        if not pending:
            return
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def remote(fn: Callable, num_cpus: float, num_gpus: float = 0, max_retries: int = 3) -> Any:
    """`fn` as a Ray task; tasks whose worker or node dies are retried (system failures only, not exceptions)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(fn)


@contextmanager
def task_failures(what: str) -> Iterator[None]:
    """A failed Ray task as the driver reports it: the task's own DataError or ConfigError as raised there (a shard
    unreadable or changed since it was checked: its one line names it) and a full disk as its OSError (the stage
    knows how much it still needs), anything else as one RuntimeError saying that `what` failed and why (never
    Ray's wrapper with the worker's traceback)."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (DataError, ConfigError)) or disk_full(e.cause):
            raise e.cause from None
        raise RuntimeError(f"{what} failed: {type(e.cause).__name__}: {e.cause}") from None
