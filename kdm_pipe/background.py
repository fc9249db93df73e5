"""A function run in a spawned process beside the caller's own work, its output to a log file: how `demo` trains its
two students at once on a machine with a core for each. Its result, or the exception it raised, comes back to the
caller; a stop (SIGTERM from the caller, or the caller's death) reaches it as SIGTERM, which the trainer answers by
checkpointing."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from kdm_pipe.interrupts import Terminated

PR_SET_PDEATHSIG = 1                   # linux/prctl.h


def die_with_parent(parent: int, sig: int) -> None:
    """The kernel sends `sig` to this process when its parent dies, however it died (SIGKILL, the OOM killer)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:         # it died before the prctl
        os._exit(0)


class Background:
    """`fn(*args)` in a spawned process (nothing of the caller's state is shared but the arguments, which must
    pickle), stdout and stderr to `log`."""

    def __init__(self, fn: Callable[..., Any], args: tuple, log: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._answer, answer = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_main, args=(os.getpid(), fn, args, str(log), answer),
                                 name=f"kdm-pipe {getattr(fn, '__name__', 'job')}")
        self._proc.start()
        answer.close()
        self.log = log

    def running(self) -> bool:
        return self._proc.is_alive()

    def result(self) -> Any:
        """Wait for the function; its value, or its exception raised here (a stop as Terminated)."""
        self._proc.join()
        try:
            kind, value = self._answer.recv()
        except EOFError:                             # it died before answering
            kind, value = "error", RuntimeError(f"the background process ended with exit code "
                                                f"{self._proc.exitcode} and no answer; its output: {self.log}")
        if kind == "stopped":
            raise Terminated(value)
        if kind == "error":
            raise value
        return value

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (a trainer checkpoints and returns), then SIGKILL after `timeout` s; a finished one is left be."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _main(parent: int, fn: Callable[..., Any], args: tuple, log: str, answer: Any) -> None:
    die_with_parent(parent, signal.SIGTERM)
    # Ctrl-C reaches the whole process group; the caller decides what a stop means and sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    try:
        answer.send(("ok", fn(*args)))
    except Terminated as e:
        answer.send(("stopped", e.signum))
        sys.exit(e.code)
    except Exception as e:  # noqa: BLE001  (any failure goes back to the caller, which reports it as its own)
        try:
            pickle.loads(pickle.dumps(e))       # an exception whose class cannot be rebuilt goes back as its line
        except Exception:  # noqa: BLE001
            e = RuntimeError(f"{type(e).__name__}: {e}")
        answer.send(("error", e))
        sys.exit(1)
