"""Reading a trained run: its student, its newest intact checkpoint, its weights (no training loop, no Ray)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdm_pipe import normalization, tensorfile
from kdm_pipe.config import TrainConfig
from kdm_pipe.errors import ConfigError, DataError
from kdm_pipe.manifest import Manifest
from kdm_pipe.run import Run
from kdm_pipe.student import build_student


def student_for(cfg: TrainConfig, manifest: Manifest) -> nn.Module:
    """The student of `cfg` (a run recorded before normalisation existed has normalize None: none)."""
    student = build_student(cfg.student, manifest.shape, manifest.label_dim, manifest.sigma_max)
    return normalization.wrap(student, cfg.normalize, manifest.shape, cfg.normalize_x_T)


def latest_checkpoint(run: Path) -> Path | None:
    """The newest intact checkpoint of `run` (damaged newer ones are passed over with a warning)."""
    return Run(run).latest_checkpoint()


def load_weights(run: Path, which: str = "ema", ckpt: Path | None = None, device: torch.device | str = "cpu",
                 data: Path | None = None) -> tuple[nn.Module, TrainConfig, Manifest, int]:
    """A trained student (EMA or raw weights) with its config and data manifest, ready for evaluation."""
    r = Run(run)
    cfg, manifest = r.config, r.manifest(data)
    if ckpt is not None:
        try:
            state = tensorfile.load(ckpt)
        except tensorfile.UnloadableError as e:
            raise DataError(f"{ckpt}: unreadable checkpoint ({e.why}); retrain, or restore it from a copy") from None
    elif (loaded := r.load_checkpoint()) is not None:
        state = loaded[0]
    else:
        raise ConfigError(f"{run} has no checkpoints; train it first with `kdm-pipe train --out {run}`")
    model = student_for(cfg, manifest)
    try:
        model.load_state_dict(state["model" if which == "raw" else "ema"])
    except (KeyError, RuntimeError) as e:
        raise ConfigError(f"{run}: its checkpoint does not fit the student in {run}/config.json "
                          f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, manifest, state["step"]
