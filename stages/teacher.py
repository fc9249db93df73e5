"""teacher train: fit an EDM teacher on images; OUT gets config.json, train.jsonl, checkpoints/, teacher.pt + .json."""

from __future__ import annotations

from pathlib import Path

from kdm_pipe.teacher_training import TeacherTrainConfig, train_teacher


def run_train(cfg: TeacherTrainConfig, progress: bool = True) -> Path:
    out = train_teacher(cfg, progress=progress)
    print(f"{out}: teacher trained for {cfg.steps} steps; use it with "
          f"`kdm-pipe generate --teacher edm --checkpoint {out / 'teacher.pt'}`; samples in {out / 'samples.png'}")
    return out
