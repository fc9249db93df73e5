"""A pair set in other tools' formats (`kdm-pipe export DIR --format …`); `kdm-pipe import` reads each back
(kdm_pipe/importers.py). Layouts and conventions: docs/FORMATS.md.

    rectified-flow   OUT/z0.npy (N, ...) noise x_T / σ_max, OUT/z1.npy (N, ...) data x_0 [, OUT/labels.npy (N,)]
    kdm-npz          OUT/{i:07d}.npz per pair: endpoints (2, ...) = [x_T, x_0] [, label one-hot]
    get              OUT/latent/{k:06d}.pt: z = x_T / σ_max (n, ...) or [z, one-hot labels];
                     OUT/image/{k:06d}.pt: x_0 (n, ...); one pair of files per shard
    fastgen          OUT/shard-{k:06d}.tar: WebDataset, one pair per sample (real, noise [, condition] [, path]),
                     OUT/index.json (key_map for FastGen's WDSLoader, path_timesteps)

Pairs are read in the pair set's order (shard by shard), through the memorisation filter's exclusions, from shards
whose checksums have been verified.
"""
from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kdm_pipe.exclusions import exclusions
from kdm_pipe.integrity import bad_shards_error, check_shards
from kdm_pipe.manifest import Manifest
from kdm_pipe.shards import add_npy

Records = Iterator[tuple[int, dict[str, np.ndarray]]]      # (shard index, record)


def records(directory: Path, manifest: Manifest) -> Records:
    """Every kept record of a verified pair set, with the index of its shard."""
    problems = check_shards(directory, manifest)
    if problems:
        raise bad_shards_error(directory, problems)
    keep = exclusions(manifest, directory)
    for info in manifest.shards:
        for rec in keep.read(directory / info.name):
            yield info.index, rec


def dtype(manifest: Manifest, field: str) -> np.dtype:
    """The stored dtype of a field (x_T at least float32 once divided by σ_max)."""
    d = np.dtype(manifest.dtypes.get(field, "float32"))
    return np.promote_types(d, np.float32) if field == "x_T" else d


def unit(x_T: np.ndarray, manifest: Manifest) -> np.ndarray:
    """z = x_T / σ_max, the unit noise rectified flow and GET store."""
    return x_T.astype(dtype(manifest, "x_T")) / manifest.sigma_max


def kept_pairs(directory: Path, manifest: Manifest) -> int:
    keep = exclusions(manifest, directory)
    return sum(keep.kept(info) for info in manifest.shards)


def write_rectified_flow(out: Path, directory: Path, manifest: Manifest) -> int:
    """z0.npy / z1.npy (memory-mapped: the set need not fit in memory) and labels.npy (int classes)."""
    n, shape = kept_pairs(directory, manifest), tuple(manifest.shape)
    out.mkdir(parents=True)
    z0 = np.lib.format.open_memmap(out / "z0.npy", "w+", dtype(manifest, "x_T"), (n, *shape))
    z1 = np.lib.format.open_memmap(out / "z1.npy", "w+", dtype(manifest, "x_0"), (n, *shape))
    labels = np.zeros(n, np.int64) if manifest.label_dim else None
    i = 0
    for _, rec in records(directory, manifest):
        b = len(rec["x_0"])
        z0[i:i + b] = unit(rec["x_T"], manifest)
        z1[i:i + b] = rec["x_0"]
        if labels is not None:
            labels[i:i + b] = rec["label"].argmax(1)
        i += b
    z0.flush()
    z1.flush()
    if labels is not None:
        np.save(out / "labels.npy", labels)
    return n


def write_kdm_npz(out: Path, directory: Path, manifest: Manifest) -> int:
    out.mkdir(parents=True)
    i = 0
    for _, rec in records(directory, manifest):
        for j in range(len(rec["x_0"])):
            pair = {"endpoints": np.stack([rec["x_T"][j], rec["x_0"][j]])}
            if "label" in rec:
                pair["label"] = rec["label"][j]
            np.savez(out / f"{i:07d}.npz", **pair)
            i += 1
    return i


def write_get(out: Path, directory: Path, manifest: Manifest) -> int:
    """One latent/ and one image/ file per shard, named by the shard's index."""
    (out / "latent").mkdir(parents=True)
    (out / "image").mkdir()
    n = 0
    for k, group in itertools.groupby(records(directory, manifest), key=lambda item: item[0]):
        recs = [rec for _, rec in group]
        cat = {f: np.concatenate([r[f] for r in recs]) for f in recs[0] if f != "traj"}
        z = torch.from_numpy(unit(cat["x_T"], manifest))
        torch.save([z, torch.from_numpy(cat["label"])] if manifest.label_dim else z, out / "latent" / f"{k:06d}.pt")
        torch.save(torch.from_numpy(cat["x_0"]), out / "image" / f"{k:06d}.pt")
        n += len(z)
    return n


def write_fastgen(out: Path, directory: Path, manifest: Manifest) -> int:
    """WebDataset shards for FastGen's WDSLoader, one pair per sample (its loader batches): shard-{k:06d}.tar per
    shard k, samples `{seed:012d}.real.npy` (x_0), `.noise.npy` (x_T), `.condition.npy` (one-hot label, conditional
    sets), `.path.npy` (S, ...) (trajectory sets: the stored states before x_0, x_T first); index.json."""
    out.mkdir(parents=True)
    n = 0
    for k, group in itertools.groupby(records(directory, manifest), key=lambda item: item[0]):
        with tarfile.open(out / f"shard-{k:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for _, rec in group:
                for j, seed in enumerate(rec["seed"].tolist()):
                    members = {"real": rec["x_0"], "noise": rec["x_T"], "condition": rec.get("label"),
                               "path": rec.get("traj")}
                    for name, a in members.items():
                        if a is not None:
                            add_npy(tar, f"{seed:012d}.{name}.npy", a[j][:-1] if name == "path" else a[j])
                    n += 1
    sigmas = manifest.trajectory_sigmas
    index = {"num_samples": n, "key_map": {"real": "real.npy", "noise": "noise.npy"}
             | ({"condition": "condition.npy"} if manifest.label_dim else {})
             | ({"path": "path.npy"} if sigmas else {}),
             "noise": f"x_T = sigma_max * z, z ~ N(0, I): the sample at t = sigma_max = {manifest.sigma_max:g}",
             "path_timesteps": sigmas[:-1] if sigmas else None, "teacher": manifest.teacher}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return n


WRITERS = {"rectified-flow": write_rectified_flow, "kdm-npz": write_kdm_npz, "get": write_get,
           "fastgen": write_fastgen}
