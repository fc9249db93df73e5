"""EDM networks as teachers: an official `.pkl` or the project's `.pt` / `.safetensors` + `.json`, and the shipped
digits teacher.

A checkpoint may be an s3:// URL: every process that builds the teacher (the driver, each Ray worker, on any node)
downloads it once into its host's cache (cache_dir(), keyed by the object's URL, ETag and size, so a replaced object
is fetched again) and loads the local copy with the same exec-free loaders.

The denoiser is called as EDM's `edm_sampler` calls it: `net(x, σ, class_labels).to(float64)` on the float64 solver
state (the preconditioning wrapper casts to float32 itself). Sampler defaults follow `edm_sampler`: σ range
[0.002, 80] clipped to the network's own [σ_min, σ_max]; 18 steps up to 32 px, 40 steps above (EDM's 64 px setting);
`generate` applies them under the preset and flags (SamplerConfig.over).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from kdm_pipe import storage
from kdm_pipe.config import DigitsTeacherConfig, EDMTeacherConfig
from kdm_pipe.errors import ConfigError
from kdm_pipe.runtime import pick_device
from kdm_pipe.teachers.base import Teacher, edm_sampler_defaults
from kdm_pipe.teachers.edm_checkpoint import CheckpointError, EDMCheckpoint, load_edm_pickle, load_state_dict_checkpoint

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_CHECKPOINT = ASSETS / "digits-teacher.pt"


class EDMTeacher(Teacher):
    def __init__(self, name: str, params: dict[str, Any], net: torch.nn.Module, weights_sha256: str | None) -> None:
        super().__init__(name=name, shape=(net.img_channels, net.img_resolution, net.img_resolution),
                         label_dim=net.label_dim, params=params, weights_sha256=weights_sha256,
                         sampler_defaults=edm_sampler_defaults(net.img_resolution, net.sigma_min, net.sigma_max))
        self.net = net.eval().requires_grad_(False)
        self.device = next(net.parameters()).device

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        # Inputs may live elsewhere (e.g. CPU noise for a GPU net); the result returns to the solver's device.
        labels = None if labels is None else labels.to(self.device)
        return self.net(x.to(self.device), sigma.to(self.device), labels).to(x.device, torch.float64)


def _load(path: Any, key: str, device: torch.device) -> EDMCheckpoint:
    with storage.remote_errors(path, "EDM checkpoint", ConfigError):
        present = path.is_file(), path.suffix == ".pkl" or path.with_suffix(".json").is_file()
    if not present[0]:
        raise ConfigError(f"EDM checkpoint {path} does not exist; pass --checkpoint with an official EDM .pkl or a "
                            f"kdm-pipe .pt / .safetensors (with its .json beside it), e.g. one written by "
                            f"`kdm-pipe teacher train` or `kdm-pipe teacher convert`")
    if path.suffix not in (".pkl", ".pt", ".safetensors"):
        raise ConfigError(f"EDM checkpoint {path}: unknown format {path.suffix!r}; use an official .pkl, or a .pt or "
                          f".safetensors with its .json")
    if not present[1]:
        raise ConfigError(f"EDM checkpoint {path} has no spec {path.with_suffix('.json').name} beside it; "
                            f"put the .json written with it next to it")
    local = local_copy(path)
    try:
        if path.suffix == ".pkl":
            return load_edm_pickle(local, key, device)
        return load_state_dict_checkpoint(local, device=device)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load EDM checkpoint {path}: {e}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdm-pipe" / "checkpoints"


def local_copy(loc: Any) -> Path:
    """`loc` itself when local; a remote checkpoint (and the .json beside a .pt or .safetensors) downloaded into
    cache_dir() unless there."""
    if not storage.is_remote(loc):
        return Path(loc)
    objects = [loc] if loc.suffix == ".pkl" else [loc, loc.with_suffix(".json")]
    with storage.remote_errors(loc, "EDM checkpoint", ConfigError):
        infos = [o.fs.info(o.path) for o in objects]
        key = json.dumps([[str(o), i.get("ETag"), i["size"]] for o, i in zip(objects, infos)])
        folder = cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:24]
        folder.mkdir(parents=True, exist_ok=True)
        for o, info in zip(objects, infos):
            dest = folder / o.name
            if dest.is_file() and dest.stat().st_size == info["size"]:
                continue
            tmp = folder / f".{o.name}.tmp-{uuid.uuid4().hex}"     # processes on one host may fetch at once
            try:
                o.fs.get_file(o.path, str(tmp))
                if tmp.stat().st_size != info["size"]:
                    raise ConfigError(f"EDM checkpoint {o}: {tmp.stat().st_size} bytes arrived, the object has "
                                      f"{info['size']}; rerun")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    return folder / loc.name


def _teacher(name: str, path: Any, key: str, allow_tf32: bool, use_fp16: bool) -> EDMTeacher:
    device = pick_device()
    if device.type == "cuda":
        # TF32 changes the teacher's outputs: off unless asked for, and recorded in the fingerprint.
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    ckpt = _load(path, key, device)
    ckpt.net.use_fp16 = use_fp16
    params = {"class_name": ckpt.class_name, "init_kwargs": ckpt.init_kwargs, "key": key, "device": device.type,
              "allow_tf32": allow_tf32, "use_fp16": use_fp16}
    return EDMTeacher(name, params, ckpt.net, ckpt.sha256)


def build_edm(cfg: EDMTeacherConfig) -> EDMTeacher:
    return _teacher("edm", cfg.checkpoint, cfg.key, cfg.allow_tf32, cfg.use_fp16)


def build_digits(cfg: DigitsTeacherConfig) -> EDMTeacher:
    return _teacher("digits", DIGITS_CHECKPOINT, "ema", False, False)

