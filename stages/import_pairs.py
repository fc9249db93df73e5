"""import: pair sets made elsewhere → verified tar shards + manifest, as if `generate` had written them.

Imported pairs have no generator seed: their `seed` is the running index 0..N−1 in the source's order, and shard k
holds pairs [k·N/S, (k+1)·N/S) of S = ⌈N / pairs_per_shard⌉ nearly equal shards. The orientation check runs
before anything is written. Like generate, the manifest lists a shard only once its file is complete, so a rerun
of the same import keeps good shards, rebuilds missing or corrupt ones and is a no-op when all are there.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdm_pipe.config import ConfigError, ImportConfig
from kdm_pipe.importers import Source, open_source, orient, pairs
from kdm_pipe.shards import (MANIFEST, Manifest, ShardInfo, load_manifest, reconcile, save_manifest, shard_name,
                             verify, write_shard)
from kdm_pipe.teachers.base import fingerprint


def new_manifest(cfg: ImportConfig, src: Source, swap: bool, check: dict[str, float | int]) -> Manifest:
    teacher = fingerprint("imported", {"format": cfg.format, "source": str((cfg.src or cfg.x_T).resolve()),
                                       "source_sha256": src.digest})
    return Manifest(
        teacher=teacher,
        source={"stage": "import", "identity": cfg.identity(), "source_sha256": src.digest, "num_pairs": src.n,
                "order": ("x0-first" if swap else "xT-first") if src.two_ended else None, "check": check,
                "seeds": "running index 0..N-1 in source order (imported pairs have no generator seed)"},
        shape=list(src.shape), label_dim=src.label_dim, sigma_max=cfg.sigma, x_T_convention=src.x_T_convention,
        num_shards=math.ceil(src.n / cfg.pairs_per_shard), pairs_per_shard=cfg.pairs_per_shard,
        dtypes={"x_T": cfg.xT_dtype, "x_0": cfg.x0_dtype})


def open_manifest(cfg: ImportConfig, fresh: Manifest) -> Manifest:
    """The directory's manifest when it is this very import, `fresh` for a new directory, else a refusal."""
    out = Path(cfg.out)
    if not (out / MANIFEST).exists():
        if any(out.glob("shard-*.tar")):
            raise ConfigError(f"{out} holds shard files but no {MANIFEST}; choose an empty --out directory")
        return fresh
    try:
        old = load_manifest(out)
    except ValueError as e:
        raise ConfigError(f"{out / MANIFEST} is not a valid kdm-pipe manifest: {e}") from None
    keys = ("stage", "identity", "source_sha256", "num_pairs")
    if [old.source.get(k) for k in keys] != [fresh.source[k] for k in keys]:
        what = ("another import (source or settings differ)" if old.source.get("stage") == "import"
                else "pairs from `generate`")
        raise ConfigError(f"{out} already holds {what}; choose another --out")
    return old


def shard_range(n: int, shards: int, k: int) -> range:
    return range(k * n // shards, (k + 1) * n // shards)


def write_one(cfg: ImportConfig, src: Source, swap: bool, manifest: Manifest, k: int) -> ShardInfo:
    seeds = shard_range(src.n, manifest.num_shards, k)

    def records():
        for b in range(seeds.start, seeds.stop, cfg.batch):
            e = min(b + cfg.batch, seeds.stop)
            block = pairs(src, swap, b, e)
            rec = {"x_T": block["x_T"].astype(cfg.xT_dtype), "x_0": block["x_0"].astype(cfg.x0_dtype),
                   "seed": np.arange(b, e, dtype=np.int64)}
            if "label" in block:
                rec["label"] = block["label"]
            yield rec

    path = Path(cfg.out) / shard_name(k)
    size, digest = write_shard(path, records())
    return ShardInfo(index=k, name=path.name, pairs=len(seeds), seed_start=seeds.start, seed_end=seeds.stop,
                     bytes=size, sha256=digest)


def run(cfg: ImportConfig, progress: bool = True) -> Manifest:
    src = open_source(cfg)
    swap, check = orient(src, cfg.order, cfg.sigma, cfg.tolerance)
    manifest = open_manifest(cfg, new_manifest(cfg, src, swap, check))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = reconcile(out, manifest)
    save_manifest(out, manifest)
    (out / "import.config.json").write_text(cfg.model_dump_json(indent=1))
    if not todo:    # reconcile has just checked every shard in full
        print(f"{out}: all {manifest.num_shards} shards complete ({manifest.num_pairs} pairs), verified")
        return manifest
    t0, written = time.perf_counter(), 0
    with tqdm(total=sum(len(shard_range(src.n, manifest.num_shards, k)) for k in todo), unit="pair",
              disable=not progress, desc="import", dynamic_ncols=True) as bar:
        for k in todo:
            info = write_one(cfg, src, swap, manifest, k)
            manifest.shards.append(info)
            save_manifest(out, manifest)
            written += info.pairs
            bar.update(info.pairs)
    seconds = time.perf_counter() - t0
    problems = verify(out)
    if problems:
        raise RuntimeError(f"{out}: verify failed after import: " + "; ".join(f"{n}: {p}" for n, p in problems.items()))
    with open(out / "import.jsonl", "a") as log:
        log.write(json.dumps({"shards": len(todo), "pairs": written, "seconds": seconds,
                              "pairs_per_s": written / seconds}) + "\n")
    print(f"{out}: imported {written} pairs into {len(todo)} shards in {seconds:.1f}s ({written / seconds:,.0f} "
          f"pairs/s); {manifest.num_pairs} pairs in {manifest.num_shards} shards, verified "
          f"(std(x_T)={check['std_x_T']:.3g}, std(x_0)={check['std_x_0']:.3g})")
    return manifest
