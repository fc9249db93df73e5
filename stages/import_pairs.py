"""import: pair sets made elsewhere → verified tar shards + manifest, as if `generate` had written them.

Imported pairs have no generator seed: their `seed` is the running index 0..N−1 in the source's order, and shard k
holds pairs [k·N/S, (k+1)·N/S) of S = ⌈N / pairs_per_shard⌉ nearly equal shards. The orientation check runs
before anything is written. Like generate, the manifest lists a shard only once its file is complete, so a rerun
of the same import keeps good shards, rebuilds missing or corrupt ones and is a no-op when all are there.

All or nothing: a run that fails (non-finite values deep in the source, a crafted file, a full disk, SIGTERM,
Ctrl-C) removes every file it created, --out itself if it made it, and restores the manifest and logs it found,
so the fixed source can simply be imported again; only SIGKILL leaves a partial import, which the same command
completes. One run per directory (directory_lock); free disk space is checked against the estimated output first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from kdm_pipe.config import ConfigError, ImportConfig
from kdm_pipe.importers import Source, open_source, orient, pairs
from kdm_pipe.locks import directory_lock
from kdm_pipe.npyfiles import human
from kdm_pipe.shards import (MANIFEST, Manifest, ShardInfo, load_manifest, reconcile,
                             remove_temp_files, save_manifest, shard_name, verify, write_shard)
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


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the run like KeyboardInterrupt so that its partial output is removed."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) raises Terminated in the main thread for the body's duration."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)       # the cleanup itself is not interrupted again
        raise Terminated()
    if threading.current_thread() is not threading.main_thread():     # only the main thread may set handlers
        yield
        return
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def make_out(out: Path) -> Path | None:
    """Create --out (and missing parents); the topmost directory this process created (a concurrent run that
    created it first owns it), or None."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory (new or one holding this import)")
    top = None
    try:
        for d in [*reversed(out.absolute().parents), out.absolute()]:
            if not d.is_dir():
                try:
                    d.mkdir()
                    top = top or d
                except FileExistsError:
                    pass
        probe = out / f".kdm-import-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable directory") from None
    return top


def estimate_bytes(cfg: ImportConfig, src: Source, pairs: int) -> int:
    """Bytes of `pairs` pairs written as shards: data plus per-member tar and .npy headers, rounded up."""
    fields = {"x_T": cfg.xT_dtype, "x_0": cfg.x0_dtype}
    per_pair = sum(np.dtype(d).itemsize for d in fields.values()) * math.prod(src.shape) + 8 + 4 * src.label_dim
    records = math.ceil(pairs / cfg.batch) + math.ceil(pairs / cfg.pairs_per_shard)
    return pairs * per_pair + records * (3 + (src.label_dim > 0)) * (512 + 128 + 512) + 10240 * math.ceil(
        pairs / cfg.pairs_per_shard)


def check_free_space(cfg: ImportConfig, src: Source, out: Path) -> None:
    """Refuse before writing when the shards cannot fit: all pairs, less the shards already in --out (a rerun)."""
    existing = sum(p.stat().st_size for p in out.glob("shard-*.tar")) if out.is_dir() else 0
    need = estimate_bytes(cfg, src, src.n) - existing
    free = shutil.disk_usage(out).free
    if need > free:
        raise ConfigError(f"import needs about {human(need)} for {src.n:,} pairs in {out} but only {human(free)} are "
                          f"free there; free some space, choose another --out, or store float16 "
                          f"(--x0-dtype/--xT-dtype float16)")


def run(cfg: ImportConfig, progress: bool = True) -> Manifest:
    """All or nothing: on any failure (bad values late in the source, an exception, SIGTERM, Ctrl-C) every file
    this run created is removed again (and --out itself if it created it), and a directory holding an import
    already is left as it was (its good shards kept); one run per directory at a time."""
    out = Path(cfg.out)
    try:
        with sigterm_unwinds():
            src = open_source(cfg)
            swap, check = orient(src, cfg.order, cfg.sigma, cfg.tolerance)
            created = make_out(out)
            with directory_lock(out, "import"):     # refused: nothing removed (the holder may use what we made)
                try:
                    check_free_space(cfg, src, out)         # before hashing the source (npy: every byte)
                    manifest = open_manifest(cfg, new_manifest(cfg, src, swap, check))
                    return write(cfg, src, swap, check, manifest, out, progress)
                except BaseException:
                    if created is not None:                 # still holding the lock: no other run is inside
                        shutil.rmtree(created, ignore_errors=True)
                    raise
    except Terminated:
        print(f"error: import stopped by SIGTERM; removed what it had written into {out}", file=sys.stderr)
        raise SystemExit(143) from None


def write(cfg: ImportConfig, src: Source, swap: bool, check: dict, manifest: Manifest, out: Path,
          progress: bool) -> Manifest:
    had = {name: (out / name).read_bytes() for name in (MANIFEST, "import.config.json", "import.jsonl")
           if (out / name).exists()}
    written: list[int] = []
    try:
        todo = reconcile(out, manifest)
        if not todo:    # reconcile has just checked every shard in full
            print(f"{out}: all {manifest.num_shards} shards complete ({manifest.num_pairs} pairs), verified")
            return manifest
        t0, pairs_written = time.perf_counter(), 0
        save_manifest(out, manifest)
        with tqdm(total=sum(len(shard_range(src.n, manifest.num_shards, k)) for k in todo), unit="pair",
                  disable=not progress, desc="import", dynamic_ncols=True) as bar:
            for k in todo:
                written.append(k)
                info = write_one(cfg, src, swap, manifest, k)
                manifest.shards.append(info)
                save_manifest(out, manifest)
                pairs_written += info.pairs
                bar.update(info.pairs)
        seconds = time.perf_counter() - t0
        problems = verify(out)
        if problems:
            raise RuntimeError(f"{out}: verify failed after import: "
                               + "; ".join(f"{n}: {p}" for n, p in problems.items()))
        (out / "import.config.json").write_text(cfg.model_dump_json(indent=1))
        with open(out / "import.jsonl", "a") as log:
            log.write(json.dumps({"shards": len(todo), "pairs": pairs_written, "seconds": seconds,
                                  "pairs_per_s": pairs_written / seconds}) + "\n")
    except BaseException:
        roll_back(out, written, had)
        raise
    print(f"{out}: imported {pairs_written} pairs into {len(todo)} shards in {seconds:.1f}s "
          f"({pairs_written / seconds:,.0f} pairs/s); {manifest.num_pairs} pairs in {manifest.num_shards} shards, "
          f"verified (std(x_T)={check['std_x_T']:.3g}, std(x_0)={check['std_x_0']:.3g})")
    return manifest


def roll_back(out: Path, written: list[int], had: dict[str, bytes]) -> None:
    """Remove the shards of this run and its temp files; the manifest and logs become what they were before (so
    shards that reconcile found missing or corrupt are listed again, as they were, for the next rerun to repair)."""
    for k in written:
        (out / shard_name(k)).unlink(missing_ok=True)
    remove_temp_files(out)
    for name in (MANIFEST, "import.config.json", "import.jsonl"):
        if name in had:
            atomic_write_bytes(out / name, had[name])
        else:
            (out / name).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp-import-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
