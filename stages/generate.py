"""generate: teacher pairs into tar shards, scheduled by Ray. Rerunning the same command completes or repairs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from kdm_pipe.config import ConfigError, GenerateConfig
from kdm_pipe.generation import make_shard
from kdm_pipe.raypool import ray_session, remote, run_bounded
from kdm_pipe.sampling import edm_sigmas, nfe, trajectory_steps
from kdm_pipe.shards import MANIFEST, Manifest, load_manifest, reconcile, remove_temp_files, save_manifest
from kdm_pipe.teachers import build_teacher


def new_manifest(cfg: GenerateConfig) -> Manifest:
    teacher = build_teacher(cfg.teacher)
    s = cfg.sampler
    keep = trajectory_steps(cfg.trajectory, s.steps)
    sigmas = edm_sigmas(s.steps, s.sigma_min, s.sigma_max, s.rho).tolist()
    return Manifest(
        teacher=teacher.fingerprint, source={"stage": "generate", "identity": cfg.identity()},
        shape=list(teacher.shape), label_dim=teacher.label_dim, sigma_max=s.sigma_max, nfe=nfe(s.steps, s.solver),
        num_shards=cfg.shards, pairs_per_shard=cfg.pairs_per_shard,
        dtypes={"x_T": cfg.xT_dtype, "x_0": cfg.x0_dtype, "traj": cfg.x0_dtype},
        trajectory_steps=keep, trajectory_sigmas=[sigmas[i] for i in keep] if keep else None)


def open_manifest(cfg: GenerateConfig) -> Manifest:
    """The directory's manifest if its settings match `cfg` (more shards allowed), else a refusal."""
    out = Path(cfg.out)
    if not (out / MANIFEST).exists():
        if any(out.glob("shard-*.tar")):
            raise ConfigError(f"{out} holds shard files but no {MANIFEST}; choose an empty --out directory")
        return new_manifest(cfg)
    try:
        old = load_manifest(out)
    except ValueError as e:
        raise ConfigError(f"{out / MANIFEST} is not a valid kdm-pipe manifest: {e}") from None
    was = old.source.get("identity")
    if was != cfg.identity():
        diff = sorted(k for k in cfg.identity() if (was or {}).get(k) != cfg.identity()[k])
        raise ConfigError(f"{out} was generated with different settings ({', '.join(diff) or 'source'}); "
                          f"rerun with the original settings or choose another --out")
    if cfg.shards < old.num_shards:
        raise ConfigError(f"{out} already plans {old.num_shards} shards; --shards {cfg.shards} would drop some "
                          f"(use --shards {old.num_shards} or more)")
    old.num_shards = cfg.shards
    return old


def run(cfg: GenerateConfig, progress: bool = True) -> Manifest:
    manifest = open_manifest(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = reconcile(cfg.out, manifest)
    save_manifest(out, manifest)
    (out / "generate.config.json").write_text(cfg.model_dump_json(indent=1))
    if not todo:
        print(f"{out}: all {cfg.shards} shards complete ({manifest.num_pairs} pairs)")
        return manifest
    task = remote(make_shard, num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)
    bar = tqdm(total=len(todo) * cfg.pairs_per_shard, unit="pair", disable=not progress, desc="generate",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    with ray_session(cfg.address, cfg.workers * cfg.cpus_per_worker, cfg.workers * cfg.gpus_per_worker), \
            open(out / "generate.jsonl", "a") as log:
        for info, stats in run_bounded(task, [(cfg, k) for k in todo], cfg.max_in_flight or 2 * cfg.workers):
            manifest.shards.append(info)
            save_manifest(out, manifest)
            log.write(json.dumps(stats) + "\n")
            log.flush()
            bar.update(info.pairs)
    bar.close()
    remove_temp_files(out)      # a retried task's first attempt, lost with its node, left its temp file behind
    seconds = time.perf_counter() - t0
    pairs = len(todo) * cfg.pairs_per_shard
    print(f"{out}: wrote {len(todo)} shards, {pairs} pairs in {seconds:.1f}s ({pairs / seconds:,.0f} pairs/s); "
          f"{manifest.num_pairs} pairs in all")
    return manifest
