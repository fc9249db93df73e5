"""The two kinds of failure every command distinguishes (a leaf module: everything may import it).

ConfigError: invalid user input (flags, presets, paths, source files) → one line on stderr, exit code 2, nothing
written. DataError: data that was valid when written is found corrupt or unreadable at run time (a shard that no
longer matches its manifest, a truncated member) → one line naming it and how to repair it, exit code 1.
"""


class ConfigError(ValueError):
    """Invalid user input: the CLI prints it and exits with code 2."""


class DataError(RuntimeError):
    """Corrupt or unreadable data met at run time: the CLI prints it and exits with code 1."""


def one_line(message: str) -> str:
    """A message as one line: tracebacks and multi-line library errors folded with '; '."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
