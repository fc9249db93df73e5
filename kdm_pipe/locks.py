"""One writer per directory: generate, import and stats hold an exclusive lock on their output directory.

An advisory `flock` on DIR/.kdm-pipe.lock, released by the kernel when its holder exits (even on SIGKILL), so a
crashed run never blocks the next one. The file names its holder (pid, host, command) for the refusal message and
is removed on release; a run that finds the file it locked was replaced meanwhile locks again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdm_pipe.errors import ConfigError

LOCK = ".kdm-pipe.lock"


@contextmanager
def directory_lock(directory: Path, command: str) -> Iterator[None]:
    """Hold DIR's lock for the body; a second holder gets a ConfigError naming the first. DIR must exist."""
    path = Path(directory) / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            os.close(fd)
            raise ConfigError(f"{directory} is in use by {holder}; wait for it to finish or stop it, then rerun "
                              f"(the lock is released when that process exits)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                    # the previous holder removed the file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"`kdm-pipe {h['command']}` (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another kdm-pipe process"
