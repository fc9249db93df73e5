"""verify: every shard of a pair directory against its manifest (size, sha256, contents); writes nothing.

Exit 0 when all match; each bad shard is named on stderr (`BAD DIR/shard-…: what`), then one error line (exit 1);
rerunning the command that wrote DIR (generate or import) repairs them. DIR may be an s3:// URL: each object is
streamed and hashed, never downloaded whole.
"""

from __future__ import annotations

import sys

from kdm_pipe.config import ConfigError, VerifyConfig
from kdm_pipe.errors import DataError
from kdm_pipe.shards import verify


def run(cfg: VerifyConfig) -> None:
    directory = cfg.data
    try:
        problems = verify(directory)
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(f"{directory}: unreadable manifest ({type(e).__name__}); rerun the `kdm-pipe generate` "
                          f"(or import) command that wrote it") from None
    if problems:
        for name, what in problems.items():
            print(f"BAD {directory / name}: {what}", file=sys.stderr)
        raise DataError(f"{len(problems)} problem(s) in {directory}; rerun the `kdm-pipe generate` (or import) "
                        f"command that wrote it to repair")
    print(f"{directory}: all shards match the manifest")
