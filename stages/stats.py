"""stats: per-shard sufficient statistics of a pair directory into `DIR/stats.zarr`, merged into moments.

One Ray task per shard writes its own rows; rerunning recomputes only shards that are new or whose bytes changed,
then rewrites the merged group (see `kdm_pipe.stats` for the layout and why a reader never sees half of it).

All or nothing: the manifest and every shard's size and sha256 (`check_shards`, cached) are checked before anything
is written; a new store (or one of another layout) is built under a temporary name and renamed into place when
complete; one run per directory (a lock).

A pair set on s3:// gets its store in the bucket: pulled into a local mirror, brought up to date there (the shards
are read from the bucket) and uploaded with its root metadata last (`upload_store`). Two `stats` runs on one bucket
at once are not prevented (no lock there), and the Ray tasks must share the driver's filesystem (a local session).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from kdm_pipe import mirror, storage
from kdm_pipe.config import ConfigError, RefStatsConfig, StatsConfig
from kdm_pipe.feature_stats import set_reference, space_name
from kdm_pipe.integrity import checked_manifest, open_pairs
from kdm_pipe.interrupts import stop_on_signals
from kdm_pipe.locks import directory_lock
from kdm_pipe.manifest import load_manifest
from kdm_pipe.stats import STORE
from kdm_pipe.stats_update import update
from kdm_pipe.teachers.vae import check_override


def run(cfg: StatsConfig, progress: bool = True) -> Path:
    if cfg.run is not None:
        latent_stats(cfg, progress)
        return cfg.run
    directory = cfg.data
    storage.check_bucket(directory, "stats")
    checked_manifest(directory)
    with ExitStack() as stack:
        stack.enter_context(stop_on_signals())
        if storage.is_remote(directory):               # built in a local mirror, uploaded when complete
            staged = mirror.of(directory)
            staged.pull(STORE)
            where = staged.local
        else:
            try:
                stack.enter_context(directory_lock(directory, f"stats {directory}"))
            except OSError as e:     # a directory we cannot write in: invalid input (exit 2), nothing written
                raise ConfigError(f"cannot write the statistics store in {directory}: {e.strerror or e}") from None
            where = None
        manifest = open_pairs(directory)
        check_override(manifest, cfg.vae, directory)
        path = update(directory, manifest, cfg.workers, cfg.address, cfg.cov_max_dim, cfg.detector, cfg.batch,
                      progress, where, cfg.vae)
        if where is not None:
            upload_store(staged)
            return directory / STORE
        return path


def upload_store(staged: mirror.Mirror) -> None:
    """Make the store built in `staged` the bucket's: hidden while it changes (its root metadata is removed
    first, so readers refuse it rather than mix old and new), objects it no longer has deleted, then its chunks,
    its groups' and arrays' metadata, and the root metadata last."""
    root = f"{STORE}/zarr.json"
    staged.forget(root)
    ours = {p.relative_to(staged.local).as_posix() for p in (staged.local / STORE).rglob("*") if p.is_file()}
    for rel in staged.remote_files(STORE) - ours:
        staged.forget(rel)
    staged.push_changed(skip=lambda rel: not rel.startswith(STORE + "/"))


def latent_stats(cfg: StatsConfig, progress: bool = True) -> dict:
    """`stats DIR --run RUN`: statistics of RUN's latents (z_T, z_0, C z_T) over DIR's pairs → RUN/latents.zarr."""
    from kdm_pipe import latents, latents_update
    from kdm_pipe.evaluation import chosen_weights
    from kdm_pipe.report import latent_line
    from kdm_pipe.run import working

    directory = cfg.data
    storage.check_bucket(directory, "stats")
    checked_manifest(directory)
    # RUN on s3://: worked on in its mirror (a local Ray session's tasks read it there), latents.zarr pushed after.
    with ExitStack() as stack, working(cfg.run) as r:
        run = r.path
        if r.config.student.kind != "kdm":
            raise ConfigError(f"{r} is a KD student: it has no latent space to describe (train --student kdm)")
        stack.enter_context(stop_on_signals())
        stack.enter_context(directory_lock(run, f"stats {directory} --run {r}"))
        manifest = open_pairs(directory)
        weights = chosen_weights(run)
        s = latents_update.update(run, str(directory), manifest, weights, cfg.workers, cfg.address, cfg.batch, progress)
    print(f"{r}/{latents.STORE} ({weights} weights): {latent_line(s)}")
    return s


def reference(cfg: RefStatsConfig, stats: StatsConfig | None = None, progress: bool = True) -> Path:
    """FID reference statistics (`mu`, `sigma`, EDM's .npz format) in the detector's features: of the source's
    images, or (`stats`: `--from DIR`) of the whole teacher set, from DIR's store brought up to date first."""
    from kdm_pipe.metrics.detectors import load_detector
    from kdm_pipe.metrics.fid import reference_stats, save_ref_stats
    from kdm_pipe.runtime import pick_device

    t = time.perf_counter()
    if stats is not None:
        run(stats, progress)
        manifest = load_manifest(stats.data)
        ref = set_reference(stats.data, manifest, space_name(load_detector(stats.detector).name, manifest.latent))
        if ref is None:      # update() has just said why (pixel features above cov_max_dim)
            raise ConfigError(f"{stats.data} has no feature statistics to export; pass --detector (or raise "
                              f"--cov-max-dim)")
        source = f"the teacher set {stats.data}"
    else:
        dev = pick_device(cfg.device)
        ref = reference_stats(cfg.source, load_detector(cfg.detector, dev), num=cfg.num, device=dev)
        source = cfg.source
    path = save_ref_stats(cfg.out, ref)
    rate = ref.num / (time.perf_counter() - t)
    print(f"{path}: reference statistics of {ref.num} images from {source} ({ref.detector}, {rate:,.0f} images/s)")
    return path
