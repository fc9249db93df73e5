"""train: fit the student on streamed pairs; RUN gets config.json, split.json, train.jsonl, latents.zarr,
tensorboard/ and checkpoints/. Under torchrun every rank runs this; rank 0 writes.

--data and --out may be s3:// URLs: shards stream from the bucket; a run there is worked on in a local mirror
(kdm_pipe.mirror) and pushed at each checkpoint and at the end (see kdm_pipe.run)."""

from __future__ import annotations

import os

from kdm_pipe import storage
from kdm_pipe.config import TrainConfig
from kdm_pipe.run import LOGS, Run
from kdm_pipe.training import train, with_pairs

PREEMPTED_EXIT = 143        # 128 + SIGTERM: schedulers read it as "terminated", restart policies rerun the job


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True,
        again: str = "rerun with --resume to continue") -> dict:
    """Train; `again` is what the SIGTERM message tells the user to do next (a command composing this stage, such
    as `demo`, has no --resume flag of its own)."""
    cfg = with_pairs(cfg, resume)
    storage.check_bucket(cfg.data, "--data")
    storage.check_bucket(cfg.out, "--out")
    lead = os.environ.get("RANK", "0") == "0"
    remote = Run(cfg.out) if storage.is_remote(cfg.out) else None
    if remote is not None and resume and lead:          # what the resumed run appends to; checkpoints come lazily
        for name in LOGS:
            remote.fetch(name)
    out = train(cfg, resume=resume, progress=progress)
    if remote is not None and lead:                     # the logs as they ended (TensorBoard is flushed on close)
        remote.push()
    if lead:
        what = "stopped by SIGTERM at" if out["status"] == "preempted" else "trained to"
        print(f"{out['run']}: {what} step {out['step']}; log {out['run']}/train.jsonl, "
              f"checkpoints in {out['run']}/checkpoints" + (f"; {again}" if out["status"] == "preempted" else ""))
    return out
