"""Filling a run's latent statistics (kdm_pipe.latents, RUN/latents.zarr/statistics): one Ray task per shard encodes
its pairs with the run's student, loaded once per worker, and returns the sums; the driver writes each row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdm_pipe import storage
from kdm_pipe.latents import identity, open_group, stale, write_merged, write_row
from kdm_pipe.manifest import Manifest, ShardInfo
from kdm_pipe.metrics.fid import FeatureSums
from kdm_pipe.shards import read_pairs, read_shard
from kdm_pipe.stats import checked_digest
from kdm_pipe.stats_update import compute
from kdm_pipe.trained import load_students, load_weights

_MODELS: dict[tuple, torch.nn.Module] = {}


def worker_student(run: str, ckpt: str, weights: str, data: str) -> torch.nn.Module:
    """The student of `ckpt`, loaded once per worker process."""
    key = (run, ckpt, weights, data)
    if key not in _MODELS:
        _MODELS[key] = load_weights(Path(run), weights, Path(ckpt), data=data)[0]
    return _MODELS[key]


@torch.no_grad()
def shard_latents(run: str, ckpt: str, weights: str, directory: str, info: ShardInfo,
                  batch: int) -> tuple[int, str, dict[str, dict[str, np.ndarray]], int]:
    """Ray task: (shard index, its sha256, the latent sums of its pairs, pairs read)."""
    model = worker_student(run, ckpt, weights, directory)
    digest = checked_digest(directory, info)
    sums: dict[str, FeatureSums] = {}
    for rec in read_shard(storage.location(directory) / info.name):
        for b in range(0, len(rec["x_0"]), batch):
            x_0, x_T = (torch.as_tensor(rec[k][b:b + batch], dtype=torch.float32) for k in ("x_0", "x_T"))
            y = None if rec.get("label") is None else torch.as_tensor(rec["label"][b:b + batch], dtype=torch.float32)
            z_T = model.encode_T(x_T, y)
            z_hat, z_T, z_0 = model.push(z_T, y).flatten(1), z_T.flatten(1), model.encode_0(x_0, y).flatten(1)
            for name, z in (("z_T", z_T), ("z_0", z_0), ("Cz_T", z_hat), ("residual", z_0 - z_hat)):
                sums.setdefault(name, FeatureSums(z.shape[1])).add(z.double().numpy())
    return info.index, digest, {k: {"count": np.int64(s.count), "sum": s.sum, "outer": s.outer}
                                for k, s in sums.items()}, info.pairs


def update(run: Path, directory: Path, manifest: Manifest, weights: str, workers: int = 2,
           address: str | None = None, batch: int = 250, progress: bool = False) -> dict[str, Any]:
    """Bring RUN/latents.zarr/statistics up to date for the run's newest intact checkpoint over `directory`'s
    pairs (the caller holds the run's lock and has checked the shards); returns the summary."""
    # Refused here if there is no intact checkpoint or the student does not fit the data.
    models, _, _, _, ckpt = load_students(run, (weights,), data=directory)
    model = _MODELS[(str(run), str(ckpt), weights, str(directory))] = models[weights]   # in-process tasks reuse it
    x = read_pairs(directory, [manifest.shards[0].name], 1)
    with torch.no_grad():
        dim = model.encode_T(torch.as_tensor(x["x_T"], dtype=torch.float32),
                             None if x.get("label") is None else torch.as_tensor(x["label"])).flatten(1).shape[1]
    g = open_group(run, identity(run, ckpt, weights), manifest.num_shards, dim)
    todo = stale(g, manifest)
    calls = ((str(run), str(ckpt), weights, str(directory), s, batch) for s in todo)
    if todo:
        compute(calls, sum(s.pairs for s in todo), workers, address, progress, fn=shard_latents,
                done=lambda *r: write_row(g, *r))
    return write_merged(g, manifest)
