"""SIGTERM / SIGINT → exit 143 / 130, after every `finally` ran: the one signal mechanism of the writing stages
(generate, import, stats) and of the Ray session (kdm_pipe.raypool).

A signal raises an exception in the main thread where it lands, so each stage's own cleanup (rolling an import
back, removing temp files, shutting Ray down) runs as for any failure; the first signal starts that cleanup and
further ones are ignored until it is done (a second Ctrl-C must not leave half of it undone).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class Terminated(SystemExit):
    """SIGTERM / SIGINT arrived: unwinds through every `finally` (cleanup, ray.shutdown), then the process exits
    with 128 + signal (143 / 130), the shell's convention, without a traceback (SystemExit is not an Exception)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _Interrupted(KeyboardInterrupt):
    # What the handler raises. Inside a blocking Ray call only a KeyboardInterrupt survives: Ray's C++ signal check
    # turns it into its own KeyboardInterrupt, any SystemExit into exit code 1, anything else into nothing at all.
    # So the signal number is kept aside and the interrupt becomes Terminated where the body is left.
    pass


SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []


def raise_terminated(signum: int, frame: Any) -> None:
    """The handler: the first signal unwinds the body; later ones arrive during its cleanup and are ignored."""
    if _received:
        return
    _received.append(signum)
    raise _Interrupted()


def as_terminated() -> Terminated | None:
    """The Terminated that a KeyboardInterrupt being handled stands for, if one of our handlers raised it."""
    return Terminated(_received[-1]) if _received else None


@contextmanager
def stop_on_signals(said: Callable[[str], str] | None = None) -> Iterator[None]:
    """SIGTERM and SIGINT raise Terminated in the main thread for the body (restored after); `said(signal name)`,
    if given, is the one `error:` line printed once the body has unwound."""
    if threading.current_thread() is not threading.main_thread():     # only the main thread may set handlers
        yield
        return
    _received.clear()
    old = {s: signal.signal(s, raise_terminated) for s in SIGNALS}
    try:
        yield
    except (KeyboardInterrupt, Terminated) as e:           # Terminated: an inner stop_on_signals (the Ray session)
        stopped = e if isinstance(e, Terminated) else as_terminated() or Terminated(signal.SIGINT)
        if said is not None:
            print(f"error: {said(stopped.name)}", file=sys.stderr)
        raise stopped from None
    finally:
        restore(old)


def restore(handlers: dict) -> None:
    for s, handler in handlers.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)
