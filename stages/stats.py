"""stats: per-shard sufficient statistics of a pair directory into `DIR/stats.zarr`, merged into moments.

One Ray task per shard writes its own rows; rerunning recomputes only shards that are new or whose bytes changed,
then rewrites the merged group (see `kdm_pipe.stats` for the layout and why a reader never sees half of it).
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
from tqdm import tqdm

from kdm_pipe.config import ConfigError
from kdm_pipe.raypool import ray_session, remote, run_bounded
from kdm_pipe.shards import Manifest, check_shard, load_manifest
from kdm_pipe.stats import (STORE, ShardMismatch, field_specs, prepare_store, stale_shards, write_merged,
                            write_shard_stats)


def checked_manifest(directory: Path) -> Manifest:
    """The directory's manifest, refused (before anything is written) unless its shards are there to read."""
    try:
        manifest = load_manifest(directory)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{directory}: unreadable manifest: {e}") from None
    if not manifest.shards:
        raise ConfigError(f"{directory} holds no complete shards yet; run `kdm-pipe generate` first")
    problems = {s.name: p for s in manifest.shards if (p := check_shard(directory / s.name, s, full=False))}
    if problems:
        listed = "; ".join(f"{name}: {p}" for name, p in problems.items())
        raise ConfigError(f"{directory}: shards do not match the manifest ({listed}); "
                          f"run `kdm-pipe verify {directory}` and rerun generate to repair them")
    return manifest


def run(directory: Path, workers: int = 2, address: str | None = None, cov_max_dim: int = 1024,
        progress: bool = True) -> Path:
    directory = Path(directory)
    if workers < 1 or cov_max_dim < 0:
        raise ConfigError(f"workers must be ≥ 1 and cov_max_dim ≥ 0 (got {workers}, {cov_max_dim})")
    manifest = checked_manifest(directory)
    specs = field_specs(manifest, cov_max_dim)
    path = directory / STORE
    root = prepare_store(path, manifest, specs)
    todo = stale_shards(root, manifest)
    pairs, seconds = sum(s.pairs for s in todo), 0.0
    if todo:
        task = remote(write_shard_stats, num_cpus=1)
        calls = [(str(path), str(directory), s, specs, manifest.label_dim) for s in todo]
        bar = tqdm(total=pairs, unit="pair", disable=not progress, desc="stats", dynamic_ncols=True)
        with ray_session(address, workers):
            t0 = time.perf_counter()                  # throughput of the work, not of starting a cluster
            try:
                for done in run_bounded(task, calls, 2 * workers):
                    bar.update(done)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, ShardMismatch):
                    raise ConfigError(str(e.cause)) from None
                raise
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
    write_merged(root, manifest, specs, cov_max_dim)
    done = f"recomputed {len(todo)} of {len(manifest.shards)} shards ({pairs} pairs in {seconds:.1f}s, " \
           f"{pairs / seconds:,.0f} pairs/s)" if todo else f"all {len(manifest.shards)} shards up to date"
    print(f"{path}: {done}; merged {manifest.num_pairs} pairs")
    return path


def reference(source: str, out: Path, detector: Path | None = None, num: int | None = None,
              device: str = "auto") -> Path:
    """FID reference statistics (`mu`, `sigma`, EDM's .npz format) of `source`'s images in `detector`'s features."""
    from kdm_pipe.metrics.detectors import load_detector
    from kdm_pipe.metrics.fid import reference_stats, save_ref_stats
    from kdm_pipe.runtime import pick_device

    dev = pick_device(device)
    t = time.perf_counter()
    stats = reference_stats(source, load_detector(detector, dev), num=num, device=dev)
    path = save_ref_stats(out, stats)
    rate = stats.num / (time.perf_counter() - t)
    print(f"{path}: reference statistics of {stats.num} images from {source} ({stats.detector}, {rate:,.0f} images/s)")
    return path
