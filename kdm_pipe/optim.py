"""Optimisation steps shared by the student and teacher trainers."""

from __future__ import annotations

import torch
from torch import nn


def sanitize_grads(params) -> None:
    for p in params:                                   # one bad batch must not poison the weights
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter by parameter (buffers stay as they are)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)
