"""stats: per-shard sufficient statistics of a pair directory into `DIR/stats.zarr`, merged into moments.

One Ray task per shard writes its own rows; rerunning recomputes only shards that are new or whose bytes changed,
then rewrites the merged group (see `kdm_pipe.stats` for the layout and why a reader never sees half of it).

All or nothing: the manifest and every shard's size and sha256 (`check_shards`, cached) are checked before anything
is written; a new store (or one of another layout) is built under a temporary name and renamed into place when
complete; one run per directory (a lock).
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import ray
from tqdm import tqdm

from kdm_pipe.config import ConfigError, RefStatsConfig, StatsConfig
from kdm_pipe.errors import DataError
from kdm_pipe.exclusions import Exclusions, exclusions
from kdm_pipe.interrupts import stop_on_signals
from kdm_pipe.locks import directory_lock
from kdm_pipe.raypool import ray_session, remote, run_bounded
from kdm_pipe.shards import Manifest, bad_shards_error, check_shards, load_manifest
from kdm_pipe.stats import (
    STORE,
    create_store,
    field_specs,
    filtered_alike,
    open_store,
    publish,
    remove_temp_stores,
    stale_shards,
    temp_store_path,
    write_merged,
    write_shard_stats,
)


def checked_manifest(directory: Path) -> Manifest:
    """The directory's manifest, refused (before anything is written) unless it lists shards to read."""
    try:
        manifest = load_manifest(directory)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{directory}: unreadable manifest ({type(e).__name__}): rerun the `kdm-pipe generate` "
                          f"(or import) command that wrote it") from None
    if not manifest.shards:
        raise ConfigError(f"{directory} holds no complete shards yet; run `kdm-pipe generate` first")
    return manifest


def run(cfg: StatsConfig, progress: bool = True) -> Path:
    directory = Path(cfg.data)
    checked_manifest(directory)
    with ExitStack() as stack:
        stack.enter_context(stop_on_signals())
        try:
            stack.enter_context(directory_lock(directory, f"stats {directory}"))
        except OSError as e:     # a directory we cannot write in: invalid input (exit 2), nothing written
            raise ConfigError(f"cannot write the statistics store in {directory}: {e.strerror or e}") from None
        manifest = checked_manifest(directory)
        problems = check_shards(directory, manifest)
        if problems:
            raise bad_shards_error(directory, problems)
        return update(directory, manifest, exclusions(manifest, directory), cfg.workers, cfg.address, cfg.cov_max_dim,
                      progress)


def update(directory: Path, manifest: Manifest, drop: Exclusions, workers: int, address: str | None,
           cov_max_dim: int, progress: bool) -> Path:
    """Statistics of the pairs `drop` keeps; a store whose rows left out other pairs (the memorisation filter
    changed) is rebuilt."""
    specs = field_specs(manifest, cov_max_dim)
    path = directory / STORE
    remove_temp_stores(path)
    root = open_store(path, manifest, specs)
    if root is not None and not filtered_alike(root, manifest, directory):
        root = None
    build = root is None                         # a new store is built aside and renamed into place when complete
    target = temp_store_path(path) if build else path
    try:
        if build:
            root = create_store(target, manifest, specs)
        todo = stale_shards(root, manifest)
        pairs, seconds = sum(s.pairs for s in todo), 0.0
        if todo:
            seconds = compute(directory, target, manifest, drop, specs, todo, workers, address, progress)
        write_merged(root, manifest, specs, cov_max_dim, drop)
        if build:
            publish(target, path)
    finally:
        if build and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    done = f"recomputed {len(todo)} of {len(manifest.shards)} shards ({pairs} pairs in {seconds:.1f}s, " \
           f"{pairs / seconds:,.0f} pairs/s)" if todo else f"all {len(manifest.shards)} shards up to date"
    kept = sum(drop.kept(s) for s in manifest.shards)
    excluded = f" ({manifest.num_pairs - kept} excluded by the memorisation filter)" if drop else ""
    print(f"{path}: {done}; merged {kept} pairs{excluded}")
    return path


def compute(directory: Path, store: Path, manifest: Manifest, drop: Exclusions, specs: list, todo: list,
            workers: int, address: str | None, progress: bool) -> float:
    """Ray tasks write the rows of `todo`; returns the seconds they took. A failed task → one-line error."""
    task = remote(write_shard_stats, num_cpus=1)
    # Each task gets its own shard's excluded seeds only, not the whole set's.
    calls = ((str(store), str(directory), s, specs, manifest.label_dim,
              Exclusions({s.name: drop.seeds.get(s.name, ())}).read) for s in todo)
    bar = tqdm(total=sum(s.pairs for s in todo), unit="pair", disable=not progress, desc="stats", dynamic_ncols=True)
    with ray_session(address, workers):
        t0 = time.perf_counter()                  # throughput of the work, not of starting a cluster
        try:
            for done in run_bounded(task, calls, 2 * workers):
                bar.update(done)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, DataError):        # a shard unreadable or changed since it was checked
                raise e.cause from None
            raise RuntimeError(f"a statistics task failed: {type(e.cause).__name__}: {e.cause}") from None
        finally:
            bar.close()
        return time.perf_counter() - t0


def reference(cfg: RefStatsConfig) -> Path:
    """FID reference statistics (`mu`, `sigma`, EDM's .npz format) of the source's images in the detector's
    features."""
    from kdm_pipe.metrics.detectors import load_detector
    from kdm_pipe.metrics.fid import reference_stats, save_ref_stats
    from kdm_pipe.runtime import pick_device

    dev = pick_device(cfg.device)
    t = time.perf_counter()
    stats = reference_stats(cfg.source, load_detector(cfg.detector, dev), num=cfg.num, device=dev)
    path = save_ref_stats(cfg.out, stats)
    rate = stats.num / (time.perf_counter() - t)
    print(f"{path}: reference statistics of {stats.num} images from {cfg.source} "
          f"({stats.detector}, {rate:,.0f} images/s)")
    return path
