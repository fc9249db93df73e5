"""Standardised vector data: the student sees (x_0 − μ_0) / s_0 (and, with normalize_x_T, (x_T − μ_T) / s_T) and
its outputs are mapped back, s_0 · x̂ + μ_0, so that every caller — evaluate, sample, analyze — works in the data's
own units. μ and s (per dimension) come from stats.zarr: the merged rows of the training shards only (held-out
shards never shape the model), computed first when missing or stale. They are buffers of the student, so each
checkpoint carries them. Images keep EDM's [−1, 1] convention (`normalize: none`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr
from torch import Tensor, nn

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError
from kdm_pipe.manifest import Manifest
from kdm_pipe.stats import STORE, field_specs, filtered_alike, merge, stale_shards, store_at

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


def training_moments(directory: Path, manifest: Manifest, names: list[str], update) -> dict[str, np.ndarray]:
    """μ and s of x_0 and x_T over the shards `names`, from their rows in stats.zarr; `update()` is called first
    when the store is missing, of another layout, or stale for any shard of the manifest."""
    path = storage.location(directory) / STORE
    specs = field_specs(manifest, cov_max_dim=0)       # mean and std only: any layout of the store has them
    root = _current(directory, manifest, specs)
    if root is None:
        update()
        root = _current(directory, manifest, specs)
        if root is None:
            raise ConfigError(f"{path} could not be brought up to date; rerun `kdm-pipe stats {directory}`")
    index = [s.index for s in manifest.shards if s.name in set(names)]
    rows = root["per_shard"]
    out = {}
    for spec, key in ((s, s.name[2:]) for s in specs if s.name in ("x_0", "x_T")):
        arrays = {n: rows[f"{spec.name}/{n}"] for n in ("count", "sum", "sumsq", "min", "max")}
        m = merge(spec, ({n: a[k] for n, a in arrays.items()} for k in index))
        std = m["std"].reshape(-1)
        out[f"mean_{key}"] = m["mean"].reshape(-1)
        out[f"std_{key}"] = np.where(std > 0, std, 1.0)      # a constant coordinate is left as it is
    return out


def _current(directory: Path, manifest: Manifest, specs) -> zarr.Group | None:
    """The store if every shard of the manifest has a trusted row, else None (read-only: nothing is changed)."""
    try:
        root = zarr.open_group(store_at(directory), mode="r")
        if (root.attrs.get("complete") is not True or stale_shards(root, manifest)
                or not filtered_alike(root, manifest, directory)):
            return None
        return root
    except (OSError, ValueError, KeyError, IndexError):
        return None

