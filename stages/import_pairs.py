"""import: pair sets made elsewhere → verified tar shards + manifest, as if `generate` had written them.

Imported pairs have no generator seed: their `seed` is the running index 0..N−1 in the source's order, and shard k
holds pairs [k·N/S, (k+1)·N/S) of S = ⌈N / pairs_per_shard⌉ nearly equal shards. The orientation check runs
before anything is written. Like generate, the manifest lists a shard only once its file is complete, so a rerun
of the same import keeps good shards, rebuilds missing or corrupt ones and is a no-op when all are there.

All or nothing: a run that fails (non-finite values deep in the source, a crafted file, a full disk, SIGTERM,
Ctrl-C) removes every file it created, --out itself if it made it, and restores the manifest and logs it found,
so the fixed source can simply be imported again; only SIGKILL leaves a partial import, which the same command
completes. The directory, its lock, manifest, commits, rollback and signals are kdm_pipe.pairset's (shared with
generate, which is resumable instead; the module says why); free disk space is checked against the estimated
output first.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdm_pipe import storage
from kdm_pipe.config import ConfigError, ImportConfig
from kdm_pipe.importers import Source, open_source, orient, pairs, state_times
from kdm_pipe.integrity import verify
from kdm_pipe.manifest import MANIFEST, Manifest, ShardInfo
from kdm_pipe.npyfiles import human
from kdm_pipe.pairset import PairSetWriter, free_bytes
from kdm_pipe.shards import write_shard
from kdm_pipe.teachers.base import fingerprint


def new_manifest(cfg: ImportConfig, src: Source, swap: bool, check: dict[str, float | int],
                 times: list[float] | None) -> Manifest:
    teacher = fingerprint("imported", {"format": cfg.format, "source": str((cfg.src or cfg.x_T).resolve()),
                                       "source_sha256": src.digest})
    return Manifest(
        teacher=teacher,
        source={"stage": "import", "identity": cfg.identity(), "source_sha256": src.digest, "num_pairs": src.n,
                "order": ("x0-first" if swap else "xT-first") if src.two_ended else None, "check": check,
                "seeds": "running index 0..N-1 in source order (imported pairs have no generator seed)"},
        shape=list(src.shape), label_dim=src.label_dim, sigma_max=cfg.sigma, x_T_convention=src.x_T_convention,
        num_shards=math.ceil(src.n / cfg.pairs_per_shard), pairs_per_shard=cfg.pairs_per_shard,
        dtypes={"x_T": cfg.xT_dtype, "x_0": cfg.x0_dtype} | ({"traj": cfg.x0_dtype} if times else {}),
        trajectory_steps=list(range(src.states)) if times else None, trajectory_sigmas=times)


def open_manifest(w: PairSetWriter, cfg: ImportConfig, fresh: Manifest) -> Manifest:
    """The directory's manifest when it is this very import, `fresh` for a new directory, else a refusal."""
    out = cfg.out

    def accept(old: Manifest) -> Manifest:
        keys = ("stage", "identity", "source_sha256", "num_pairs")
        if [old.source.get(k) for k in keys] != [fresh.source[k] for k in keys]:
            what = ("another import (source or settings differ)" if old.source.get("stage") == "import"
                    else "pairs from `generate`")
            raise ConfigError(f"{out} already holds {what}; choose another --out")
        return old

    return w.open_manifest(lambda: fresh, accept, lambda path, e: f"{path} is not a valid kdm-pipe manifest: {e}",
                           strays=f"{out} holds shard files but no {MANIFEST}; choose an empty --out directory")


def shard_range(n: int, shards: int, k: int) -> range:
    return range(k * n // shards, (k + 1) * n // shards)


def write_one(cfg: ImportConfig, src: Source, swap: bool, w: PairSetWriter, k: int) -> ShardInfo:
    seeds = shard_range(src.n, w.manifest.num_shards, k)

    def records():
        for b in range(seeds.start, seeds.stop, cfg.batch):
            e = min(b + cfg.batch, seeds.stop)
            block = pairs(src, swap, b, e)
            rec = {"x_T": block["x_T"].astype(cfg.xT_dtype), "x_0": block["x_0"].astype(cfg.x0_dtype),
                   "seed": np.arange(b, e, dtype=np.int64)}
            if "label" in block:
                rec["label"] = block["label"]
            if "traj" in block:
                rec["traj"] = block["traj"].astype(cfg.x0_dtype)
            yield rec

    path = w.shard_path(k)
    size, digest = write_shard(path, records())
    return ShardInfo(index=k, name=path.name, pairs=len(seeds), seed_start=seeds.start, seed_end=seeds.stop,
                     bytes=size, sha256=digest)


def estimate_bytes(cfg: ImportConfig, src: Source, pairs: int) -> int:
    """Bytes of `pairs` pairs written as shards: data plus per-member tar and .npy headers, rounded up."""
    values = np.dtype(cfg.xT_dtype).itemsize + np.dtype(cfg.x0_dtype).itemsize * (1 + src.states)
    per_pair = values * math.prod(src.shape) + 8 + 4 * src.label_dim
    records = math.ceil(pairs / cfg.batch) + math.ceil(pairs / cfg.pairs_per_shard)
    members = 3 + (src.label_dim > 0) + (src.states > 0)
    return pairs * per_pair + records * members * (512 + 128 + 512) + 10240 * math.ceil(
        pairs / cfg.pairs_per_shard)


def check_free_space(cfg: ImportConfig, src: Source, out: Path) -> None:
    """Refuse before writing when the shards cannot fit: all pairs, less the shards already in --out (a rerun).
    An s3:// --out: one shard at a time is finished in the local temp directory, then uploaded."""
    free = free_bytes(out)
    if storage.is_remote(out):
        need = estimate_bytes(cfg, src, min(src.n, cfg.pairs_per_shard))
        if need > free:
            raise ConfigError(f"import finishes each shard (about {human(need)}) in the local temp directory "
                              f"before its upload, but only {human(free)} are free there; point TMPDIR at a "
                              f"larger disk or lower --pairs-per-shard")
        return
    existing = sum(p.stat().st_size for p in out.glob("shard-*.tar")) if out.is_dir() else 0
    need = estimate_bytes(cfg, src, src.n) - existing
    if need > free:
        raise ConfigError(f"import needs about {human(need)} for {src.n:,} pairs in {out} but only {human(free)} are "
                          f"free there; free some space, choose another --out, or store float16 "
                          f"(--x0-dtype/--xT-dtype float16)")


def run(cfg: ImportConfig, progress: bool = True) -> Manifest:
    """All or nothing: on any failure (bad values late in the source, an exception, SIGTERM, Ctrl-C) every file
    this run created is removed again (and --out itself if it created it), and a directory holding an import
    already is left as it was (its good shards kept); one run per directory at a time."""
    out = cfg.out
    w = PairSetWriter(out, "import", "import", all_or_nothing=True)
    with w.stopping():
        src = open_source(cfg)
        swap, check = orient(src, cfg.order, cfg.sigma, cfg.tolerance)
        times = state_times(cfg, src, swap)
        with w.writing():                           # an s3:// --out: its bucket checked first
            check_free_space(cfg, src, out)         # before hashing the source (npy: every byte)
            open_manifest(w, cfg, new_manifest(cfg, src, swap, check, times))
            return write(cfg, src, swap, check, w, progress)


def write(cfg: ImportConfig, src: Source, swap: bool, check: dict, w: PairSetWriter, progress: bool) -> Manifest:
    out, manifest = w.out, w.manifest
    todo = w.reconcile()
    if not todo:    # reconcile has just checked every shard in full
        print(f"{out}: all {manifest.num_shards} shards complete ({manifest.num_pairs} pairs), verified")
        return manifest
    t0, pairs_written = time.perf_counter(), 0
    w.save()
    with tqdm(total=sum(len(shard_range(src.n, manifest.num_shards, k)) for k in todo), unit="pair",
              disable=not progress, desc="import", dynamic_ncols=True) as bar:
        for k in todo:
            info = write_one(cfg, src, swap, w, k)
            w.commit(info)
            pairs_written += info.pairs
            bar.update(info.pairs)
    seconds = time.perf_counter() - t0
    problems = verify(out)
    if problems:
        raise RuntimeError(f"{out}: verify failed after import: "
                           + "; ".join(f"{n}: {p}" for n, p in problems.items()))
    w.record_config(cfg.model_dump_json(indent=1))
    w.log({"shards": len(todo), "pairs": pairs_written, "seconds": seconds, "pairs_per_s": pairs_written / seconds})
    print(f"{out}: imported {pairs_written} pairs into {len(todo)} shards in {seconds:.1f}s "
          f"({pairs_written / seconds:,.0f} pairs/s); {manifest.num_pairs} pairs in {manifest.num_shards} shards, "
          f"verified (std(x_T)={check['std_x_T']:.3g}, std(x_0)={check['std_x_0']:.3g})"
          + (f"; {len(manifest.trajectory_steps)} states per pair at times {manifest.trajectory_sigmas}"
             if manifest.trajectory_steps else ""))
    return manifest
