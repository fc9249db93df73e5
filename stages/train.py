"""train: fit the student on streamed pairs; RUN gets config.json, split.json, train.jsonl, latents.zarr,
tensorboard/ and checkpoints/. Under torchrun every rank runs this; rank 0 writes."""

from __future__ import annotations

import os

from kdm_pipe.config import TrainConfig
from kdm_pipe.training import train

PREEMPTED_EXIT = 143        # 128 + SIGTERM: schedulers read it as "terminated", restart policies rerun the job


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    out = train(cfg, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") == "0":
        what = "stopped by SIGTERM at" if out["status"] == "preempted" else "trained to"
        print(f"{out['run']}: {what} step {out['step']}; log {out['run']}/train.jsonl, "
              f"checkpoints in {out['run']}/checkpoints" + ("; rerun with --resume to continue"
                                                           if out["status"] == "preempted" else ""))
    return out
