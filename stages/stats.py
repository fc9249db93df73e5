"""stats: per-shard sufficient statistics of a pair directory into `DIR/stats.zarr`, merged into moments.

One Ray task per shard writes its own rows; rerunning recomputes only shards that are new or whose bytes changed,
then rewrites the merged group (see `kdm_pipe.stats` for the layout and why a reader never sees half of it).

All or nothing: the manifest and every shard's size and sha256 (`check_shards`, cached) are checked before anything
is written; a new store (or one of another layout) is built under a temporary name and renamed into place when
complete; one run per directory (a lock).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from kdm_pipe.config import ConfigError, RefStatsConfig, StatsConfig
from kdm_pipe.feature_stats import set_reference
from kdm_pipe.interrupts import stop_on_signals
from kdm_pipe.locks import directory_lock
from kdm_pipe.shards import bad_shards_error, check_shards, checked_manifest, load_manifest
from kdm_pipe.stats_update import update


def run(cfg: StatsConfig, progress: bool = True) -> Path:
    if cfg.run is not None:
        latent_stats(cfg, progress)
        return Path(cfg.run)
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
        return update(directory, manifest, cfg.workers, cfg.address, cfg.cov_max_dim, cfg.detector, cfg.batch,
                      progress)


def latent_stats(cfg: StatsConfig, progress: bool = True) -> dict:
    """`stats DIR --run RUN`: statistics of RUN's latents (z_T, z_0, C z_T) over DIR's pairs → RUN/latents.zarr."""
    from kdm_pipe import latents
    from kdm_pipe.evaluation import chosen_weights
    from kdm_pipe.report import latent_line
    from kdm_pipe.run import Run

    run, directory = Path(cfg.run), Path(cfg.data)
    if Run(run).config.student.kind != "kdm":
        raise ConfigError(f"{run} is a KD student: it has no latent space to describe (train --student kdm)")
    checked_manifest(directory)
    with ExitStack() as stack:
        stack.enter_context(stop_on_signals())
        stack.enter_context(directory_lock(run, f"stats {directory} --run {run}"))
        manifest = checked_manifest(directory)
        problems = check_shards(directory, manifest)
        if problems:
            raise bad_shards_error(directory, problems)
        weights = chosen_weights(run)
        s = latents.update(run, directory, manifest, weights, cfg.workers, cfg.address, cfg.batch, progress)
    print(f"{run}/{latents.STORE} ({weights} weights): {latent_line(s)}")
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
        ref = set_reference(stats.data, load_manifest(stats.data), load_detector(stats.detector).name)
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
