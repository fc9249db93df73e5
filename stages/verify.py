"""verify: every shard of a pair directory against its manifest (size, sha256, contents); writes nothing.

Exit 0 when all match; each bad shard is named on stderr (`BAD DIR/shard-…: what`), then one error line (exit 1);
rerunning the command that wrote DIR (generate or import) repairs them. A missing or unreadable manifest is bad input
(exit 2), refused as every reader refuses it (`read_manifest`). DIR may be an s3:// URL: each object is streamed and
hashed, never downloaded whole.
"""

from __future__ import annotations

import sys

from kdm_pipe.config import VerifyConfig
from kdm_pipe.errors import DataError
from kdm_pipe.integrity import verify
from kdm_pipe.manifest import read_manifest
from kdm_pipe.shards import repair_hint


def run(cfg: VerifyConfig) -> None:
    directory = cfg.data
    problems = verify(directory, read_manifest(directory))
    if problems:
        for name, what in problems.items():
            print(f"BAD {directory / name}: {what}", file=sys.stderr)
        raise DataError(f"{len(problems)} problem(s) in {directory}; {repair_hint(directory)}")
    print(f"{directory}: all shards match the manifest")
