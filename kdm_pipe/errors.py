"""The two kinds of failure every command distinguishes (a leaf module: everything may import it).

ConfigError: invalid user input (flags, presets, paths, source files) → one line on stderr, exit code 2, nothing
written. DataError: data that was valid when written is found corrupt or unreadable at run time (a shard that no
longer matches its manifest, a truncated member) → one line naming it and how to repair it, exit code 1.
DiskFull: a write that ran out of space (a DataError: exit 1) saying where and how much was needed.
"""

from __future__ import annotations

import errno
import shutil
from typing import Any


class ConfigError(ValueError):
    """Invalid user input: the CLI prints it and exits with code 2."""


class DataError(RuntimeError):
    """Corrupt or unreadable data met at run time: the CLI prints it and exits with code 1."""


def one_line(message: str) -> str:
    """A message as one line: tracebacks and multi-line library errors folded with '; '."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised from, is a write refused for lack of space (or quota)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


class DiskFull(DataError):
    """A write that ran out of space, as one line: where, about how much it needed, how much is free."""

    def __init__(self, where: Any, need: int):
        self.where, self.need = where, need
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:,.0f} MB"
        except OSError:
            free = "an unknown amount"
        super().__init__(f"disk full at {where}: need ~{max(1, round(need / 2**20)):,} MB, have {free} free; free "
                         f"some space there (or write elsewhere) and rerun")

    def __reduce__(self):                               # crosses Ray's process boundary intact
        return DiskFull, (self.where, self.need)
