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


def load_students(run: Path, which: tuple[str, ...] = ("ema", "raw"), ckpt: Path | None = None,
                  device: torch.device | str = "cpu", data: Path | None = None
                  ) -> tuple[dict[str, nn.Module], TrainConfig, Manifest, int, Path]:
    """The trained student once per weights in `which` (EMA, raw), from one read of the checkpoint (`ckpt`, or the
    newest intact one), with the run's config, its data manifest, the step and the checkpoint's path."""
    r = Run(run)
    cfg, manifest = r.config, r.manifest(data)
    if ckpt is not None:
        try:
            state = tensorfile.load(ckpt)
        except tensorfile.UnloadableError as e:
            raise DataError(f"{ckpt}: unreadable checkpoint ({e.why}); retrain, or restore it from a copy") from None
    elif (loaded := r.load_checkpoint()) is not None:
        state, ckpt = loaded
    else:
        raise ConfigError(f"{run} has no checkpoints; train it first with `kdm-pipe train --out {run}`")
    models = {}
    for w in which:
        models[w] = student_for(cfg, manifest)
        try:
            models[w].load_state_dict(state["model" if w == "raw" else "ema"])
        except (KeyError, RuntimeError) as e:
            raise ConfigError(f"{run}: its checkpoint does not fit the student in {run}/config.json "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        models[w] = models[w].to(device).eval()
    return models, cfg, manifest, state["step"], ckpt


def load_weights(run: Path, which: str = "ema", ckpt: Path | None = None, device: torch.device | str = "cpu",
                 data: Path | None = None) -> tuple[nn.Module, TrainConfig, Manifest, int]:
    """A trained student (EMA or raw weights) with its config and data manifest, ready for evaluation."""
    models, cfg, manifest, step, _ = load_students(run, (which,), ckpt, device, data)
    return models[which], cfg, manifest, step
