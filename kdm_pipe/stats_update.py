"""Filling a pair directory's statistics store: one Ray task per shard writes that shard's rows, the driver plans
the tasks (only shards that are new or whose bytes changed, per group) and publishes the merged views.

Used by `kdm-pipe stats`, and by `train` when normalising with statistics that are missing or stale. The caller
holds the directory's lock and has checked the shards against the manifest.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from kdm_pipe import feature_stats, storage
from kdm_pipe.errors import ConfigError
from kdm_pipe.exclusions import Exclusions, exclusions
from kdm_pipe.feature_stats import FeatureSpace, ShardFeatures
from kdm_pipe.manifest import Manifest, ShardInfo
from kdm_pipe.raypool import in_process, ray_session, remote, run_bounded, task_failures
from kdm_pipe.shards import shard_error
from kdm_pipe.stats import (
    STORE,
    FieldSpec,
    ShardMoments,
    checked_digest,
    create_store,
    field_specs,
    filtered_alike,
    open_store,
    publish,
    remove_temp_stores,
    stale_shards,
    temp_store_path,
    write_merged,
)
from kdm_pipe.student import is_image

# Below this many pairs (pixel features or none) a local job runs in this process: a Ray start-up takes 5–15 s,
# the work ~0.1 s per thousand pairs.
IN_PROCESS_PAIRS = 50_000


def write_shard(store: str, directory: str, info: ShardInfo, specs: list[FieldSpec] | None, label_dim: int,
                space: FeatureSpace | None, drop: Exclusions) -> int:
    """Ray task: shard `info.index`'s moments (unless `specs` is None) and x_0 features (unless `space` is None),
    from one read of the shard without the pairs `drop` excludes, each into its own row; returns the pairs read.

    Every row is written invalidate (sha256 ← 0) → sums → sha256, so a row is trusted only when a task finished it.
    """
    root, row = zarr.open_group(store, mode="r+"), info.index
    groups = ([root["per_shard"]] if specs else []) + ([root[f"{space.group}/per_shard"]] if space else [])
    for g in groups:
        g["sha256"][row] = 0
    path = storage.location(directory) / info.name
    digest = checked_digest(directory, info)
    moments = ShardMoments(path, specs, label_dim) if specs else None
    features = ShardFeatures(space) if space else None
    for rec in drop.read(path):
        if moments:
            moments.add(rec)
        if features:
            try:
                features.add(rec["x_0"])
            except (KeyError, RuntimeError) as e:
                raise shard_error(path, f"x_0 cannot be embedded ({type(e).__name__}: {e})") from None
    if moments:
        rows = root["per_shard"]
        for field, arrays in moments.arrays().items():
            for name, a in arrays.items():
                rows[f"{field}/{name}"][row] = a
        rows["computed_at"][row] = time.time()
    if features:
        for name, a in features.arrays().items():
            root[f"{space.group}/per_shard/{name}"][row] = a
    sha = np.frombuffer(bytes.fromhex(digest), np.uint8)
    for g in groups:
        g["sha256"][row] = sha
    return info.pairs


def feature_space_for(manifest: Manifest, detector: Path | None, cov_max_dim: int, batch: int,
                      vae: Path | None = None) -> tuple[FeatureSpace | None, str | None]:
    """(the feature space x_0 is embedded in, or None; why not): image sets get pixel features (when their
    covariance fits cov_max_dim) or the detector's, VAE latents those of their decoded images (`vae`: the VAE's
    folder when not the recorded one); vector sets need none (their x_0 moments are the features)."""
    shape = tuple(manifest.shape)
    if not is_image(shape):
        if detector is not None:
            raise ConfigError(f"--detector {detector}: the pairs are {list(shape)} vectors, not images; drop "
                              f"--detector (vector sets are compared in their own coordinates)")
        return None, None
    space = feature_stats.feature_space(detector, shape, batch, manifest.latent, vae)   # latents: decoded images
    if detector is None and space.dim > cov_max_dim:
        return None, (f"pixel features are {space.dim}-d > cov_max_dim = {cov_max_dim}: pass --detector (or raise "
                      f"--cov-max-dim) for teacher-set feature statistics")
    return space, None


def update(directory: Path, manifest: Manifest, workers: int = 2, address: str | None = None,
           cov_max_dim: int = 1024, detector: Path | None = None, batch: int = 250, progress: bool = False,
           where: Path | None = None, vae: Path | None = None) -> Path:
    """Bring `directory/stats.zarr` up to date with the manifest: moments and the feature statistics of `detector`
    (pixels when None), of the pairs the memorisation filter keeps (a store whose rows left out other pairs is
    rebuilt). `where`: the local directory the store is kept in instead (a pair set on s3:// has it in a mirror,
    its shards are read from the bucket). `vae`: a latent set's VAE folder when not the recorded one."""
    specs = field_specs(manifest, cov_max_dim)
    space, skipped = feature_space_for(manifest, detector, cov_max_dim, batch, vae)
    drop = exclusions(manifest, directory)
    path = Path(where or directory) / STORE
    remove_temp_stores(path)
    root = open_store(path, manifest, specs)
    if root is not None and not filtered_alike(root, manifest, directory):
        root = None
    build = root is None                         # a new store is built aside and renamed into place when complete
    target = temp_store_path(path) if build else path
    try:
        if build:
            root = create_store(target, manifest, specs)
        group = feature_stats.open_group(root, space, manifest.num_shards) if space else None
        moments = {s.index for s in stale_shards(root, manifest)}
        features = feature_stats.stale_rows(group, manifest) if group is not None else set()
        todo = [s for s in manifest.shards if s.index in moments | features]
        # Each task gets its own shard's excluded seeds only, not the whole set's.
        calls = ((str(target), str(directory), s, specs if s.index in moments else None, manifest.label_dim,
                  space if s.index in features else None, Exclusions({s.name: drop.seeds.get(s.name, ())}))
                 for s in todo)
        pairs, seconds = sum(s.pairs for s in todo), 0.0
        if todo:
            small = space is None or space.path is None          # a detector's features are worth the workers
            seconds = compute(calls, pairs, workers, address, progress,
                              local=small and in_process(address, pairs, IN_PROCESS_PAIRS))
        write_merged(root, manifest, specs, cov_max_dim, drop)
        if group is not None:
            feature_stats.write_merged(group, manifest)
        if build:
            publish(target, path)
    finally:
        if build and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    done = f"recomputed {len(todo)} of {len(manifest.shards)} shards ({pairs} pairs in {seconds:.1f}s, " \
           f"{pairs / seconds:,.0f} pairs/s)" if todo else f"all {len(manifest.shards)} shards up to date"
    what = f"; features: {space.name} ({space.dim}-d)" if space else (f"; no feature statistics: {skipped}"
                                                                      if skipped else "")
    kept = sum(drop.kept(s) for s in manifest.shards)
    excluded = f" ({manifest.num_pairs - kept} excluded by the memorisation filter)" if drop else ""
    print(f"{storage.location(directory) / STORE}: {done}; merged {kept} pairs{excluded}{what}")
    return path


def compute(calls, pairs: int, workers: int, address: str | None, progress: bool, fn=write_shard,
            done=lambda pairs: pairs, local: bool = False) -> float:
    """Ray tasks (`local`: this process, one call after the other) run `fn(*call)` and `done(*result)` (or
    `done(result)`) takes each result in the driver and returns the pairs it covered; returns the seconds the tasks
    took. A failed task → one-line error."""
    def take(result) -> None:
        bar.update(done(*result) if isinstance(result, tuple) else done(result))

    if local:
        t0 = time.perf_counter()
        with tqdm(total=pairs, unit="pair", disable=not progress, desc="stats", dynamic_ncols=True) as bar:
            for call in calls:
                take(fn(*call))
        return time.perf_counter() - t0
    task = remote(fn, num_cpus=1)
    with ray_session(address, workers):
        bar = tqdm(total=pairs, unit="pair", disable=not progress, desc="stats", dynamic_ncols=True)
        t0 = time.perf_counter()                  # throughput of the work, not of starting a cluster
        try:
            with task_failures("a statistics task"):
                for result in run_bounded(task, calls, 2 * workers):
                    take(result)
        finally:
            bar.close()
        return time.perf_counter() - t0
