"""Made by hand for tests: pair directories (no Ray, no teacher) with exact contents or odd layouts, and a toy
feature detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdm_pipe.manifest import Manifest, ShardInfo, load_manifest, save_manifest, shard_name
from kdm_pipe.shards import write_shard


def pair_set(directory: Path, shards: list[list[dict[str, np.ndarray]]], *, teacher: dict | None = None,
             sigma_max: float = 80.0) -> Path:
    """Write `shards` (per shard, its records: dicts of arrays with `seed`, `x_T`, `x_0` [, `label`]) as new shards
    of `directory`, after any it already has; the manifest's shape, dtypes, label_dim and seed ranges come from the
    records."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = shards[0][0]
    m = load_manifest(directory) if (directory / "manifest.json").exists() else Manifest(
        teacher=teacher or {"name": "hand"}, source={}, shape=list(first["x_0"].shape[1:]), sigma_max=sigma_max,
        label_dim=first["label"].shape[1] if "label" in first else 0, num_shards=0, pairs_per_shard=0,
        dtypes={k: str(first[k].dtype) for k in ("x_T", "x_0")})
    for recs in shards:
        k, seeds = len(m.shards), np.concatenate([r["seed"] for r in recs])
        size, sha = write_shard(directory / shard_name(k), recs)
        m.shards.append(ShardInfo(index=k, name=shard_name(k), pairs=len(seeds), seed_start=int(seeds.min()),
                                  seed_end=int(seeds.max()) + 1, bytes=size, sha256=sha))
    m.num_shards, m.pairs_per_shard = len(m.shards), max(s.pairs for s in m.shards)
    save_manifest(directory, m)
    return directory


def random_pair_set(directory: Path, shape: tuple[int, ...]) -> Path:
    """A new directory of one shard of 20 seeded random pairs of `shape` (x_0 in [-1, 1], x_T at σ = 80)."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    x_0, x_T = rng.uniform(-1, 1, (20, *shape)), 80 * rng.standard_normal((20, *shape))
    return pair_set(directory, [[{"seed": np.arange(20), "x_T": x_T, "x_0": x_0}]])


class Flatten(torch.nn.Module):
    """A TorchScript 'detector' whose features are the uint8 pixels: the relative rule is scale-free, so a filter in
    its feature space flags what it flags in pixel space."""

    def forward(self, x):
        return x.float().flatten(1)
