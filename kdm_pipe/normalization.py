"""Standardised vector data: the student sees (x_0 − μ_0) / s_0 (and, with normalize_x_T, (x_T − μ_T) / s_T) and its
outputs are mapped back, s_0 · x̂ + μ_0, so that every caller — evaluate, sample, analyze — works in the data's own
units. μ and s (per dimension) come from stats.zarr: the merged rows of the training shards only (held-out shards never
shape the model; kdm_pipe.stats.training_moments), computed first when missing or stale. They are buffers of the
student, so each checkpoint carries them. Images keep EDM's [−1, 1] convention (`normalize: none`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

DEFAULT = "none"      # for vector data: standardising did not measurably help on the official-scale board (BENCHMARKS)


class Standardized(nn.Module):
    """`student` wrapped so that it is trained on standardised data and answers in the data's units."""

    def __init__(self, student: nn.Module, dim: int, x_T: bool):
        super().__init__()
        self.student = student
        self.x_T = x_T                                    # whether x_T is standardised too (else passed as it is)
        for name, value in (("mean_0", 0.0), ("std_0", 1.0), ("mean_T", 0.0), ("std_T", 1.0)):
            self.register_buffer(name, torch.full((dim,), value))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:                            # koopman, cfg, last_sample, …: the student's own
            return getattr(super().__getattr__("student"), name)

    def set_moments(self, moments: dict[str, np.ndarray]) -> None:
        for name, value in moments.items():
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    def norm_0(self, x_0: Tensor) -> Tensor:
        return (x_0 - self.mean_0) / self.std_0

    def norm_T(self, x_T: Tensor) -> Tensor:
        return (x_T - self.mean_T) / self.std_T if self.x_T else x_T

    def units(self, x: Tensor) -> Tensor:
        return x * self.std_0 + self.mean_0

    def encode_0(self, x_0: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.student.encode_0(self.norm_0(x_0), labels)

    def encode_T(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.student.encode_T(self.norm_T(x_T), labels)

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.units(self.student.decode(z, labels))

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.units(self.student(self.norm_T(x_T), labels))

    def losses(self, x_0: Tensor, x_T: Tensor, *args, **kwargs) -> dict[str, Tensor]:
        """The student's losses on standardised data (its distances are in standard units)."""
        return self.student.losses(self.norm_0(x_0), self.norm_T(x_T), *args, **kwargs)


def copy_moments(source: nn.Module, target: nn.Module) -> None:
    """Give `target` (e.g. an untrained student of the same config) the data moments of `source`."""
    if isinstance(source, Standardized) and isinstance(target, Standardized):
        target.set_moments({k: getattr(source, k).cpu().numpy() for k in ("mean_0", "std_0", "mean_T", "std_T")})


def wrap(student: nn.Module, normalize: str | None, shape: list[int], x_T: bool) -> nn.Module:
    """The student as trained under `normalize` (None: a run from before normalisation existed, i.e. none)."""
    if normalize != "standard":
        return student
    return Standardized(student, int(np.prod(shape)), x_T)
