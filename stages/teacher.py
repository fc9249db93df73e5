"""teacher train: fit an EDM teacher on images; OUT gets config.json, train.jsonl, checkpoints/, teacher.pt + .json.
teacher convert: an official EDM .pkl (read without running its code) → OUT/model.safetensors + OUT/model.json, which
`generate --teacher edm --checkpoint OUT/model.safetensors` loads without NVlabs code."""

from __future__ import annotations

import os
from pathlib import Path

from kdm_pipe import storage
from kdm_pipe.config import TeacherConvertConfig
from kdm_pipe.errors import ConfigError
from kdm_pipe.teachers.edm_checkpoint import CheckpointError, load_edm_pickle, save_state_dict_checkpoint
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


def run_convert(cfg: TeacherConvertConfig) -> Path:
    src, out = Path(cfg.checkpoint), Path(cfg.out)
    if src.suffix != ".pkl" or not src.is_file():
        raise ConfigError(f"{src}: not an EDM network pickle (.pkl); pass the .pkl file that EDM's training wrote")
    storage.check_new_dir(out, "--out")
    try:
        ckpt = load_edm_pickle(src, cfg.key)
    except CheckpointError as e:
        raise ConfigError(f"cannot convert {src}: {e}") from None
    with storage.staged_dir(out) as tmp:
        tmp.mkdir()
        save_state_dict_checkpoint(ckpt.net, ckpt.class_name, ckpt.init_kwargs, tmp / "model.safetensors")
    print(f"{out}: {ckpt.class_name} ({cfg.key}) of {src.name} as model.safetensors + model.json; use it with "
          f"`kdm-pipe generate --teacher edm --checkpoint {out / 'model.safetensors'}`")
    return out
