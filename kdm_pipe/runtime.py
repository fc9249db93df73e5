"""Device and thread choices, made once per process, so the same code runs on a laptop CPU and a GPU node."""

from __future__ import annotations

import torch

from kdm_pipe.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def set_threads(n: int | None) -> None:
    """A reused Ray worker keeps torch's old thread count, so every task sets it."""
    if n:
        torch.set_num_threads(n)
