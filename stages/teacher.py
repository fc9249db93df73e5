"""teacher train: fit an EDM teacher on images; OUT gets config.json, train.jsonl, checkpoints/, teacher.pt + .json."""

from __future__ import annotations

import os
from pathlib import Path

from kdm_pipe.errors import ConfigError
from kdm_pipe.teachers.training import TeacherTrainConfig, train_teacher


def check_out(out: Path) -> None:
    """--out must be (or become) a writable directory: refused before the data is read or anything is created."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory for the teacher run")
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot create or write it ({parent} is "
                          f"{'not a directory' if not parent.is_dir() else 'not writable'}); choose another --out")


def run_train(cfg: TeacherTrainConfig, progress: bool = True) -> Path:
    check_out(Path(cfg.out))
    out = train_teacher(cfg, progress=progress)
    print(f"{out}: teacher trained for {cfg.steps} steps; use it with "
          f"`kdm-pipe generate --teacher edm --checkpoint {out / 'teacher.pt'}`; samples in {out / 'samples.png'}")
    return out
