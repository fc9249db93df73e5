"""train: fit the student on streamed pairs; RUN gets config.json, split.json, train.jsonl and checkpoints/."""

from __future__ import annotations

from pathlib import Path

from kdm_pipe.config import TrainConfig
from kdm_pipe.training import train


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    out = train(cfg, resume=resume, progress=progress)
    print(f"{out}: trained to step {cfg.steps}; log {out / 'train.jsonl'}, checkpoints in {out / 'checkpoints'}")
    return out
