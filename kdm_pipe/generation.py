"""One shard of teacher pairs: per-seed noise → teacher ODE → tar. Runs inside a Ray task (or anywhere)."""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from kdm_pipe.config import GenerateConfig
from kdm_pipe.manifest import ShardInfo, shard_name
from kdm_pipe.runtime import pick_device, set_threads
from kdm_pipe.sampling import trajectory_steps
from kdm_pipe.shards import write_shard
from kdm_pipe.teachers import build_teacher
from kdm_pipe.teachers.base import Teacher

_TEACHERS: dict[str, Teacher] = {}  # built once per worker process, reused by every task it runs


def cached_teacher(cfg: GenerateConfig) -> Teacher:
    key = json.dumps(cfg.teacher.model_dump(mode="json"), sort_keys=True)
    if key not in _TEACHERS:
        _TEACHERS[key] = build_teacher(cfg.teacher)
    return _TEACHERS[key]


def with_teacher_defaults(cfg: GenerateConfig) -> GenerateConfig:
    """`cfg` with its sampler resolved over the teacher's own defaults (building the teacher once, here)."""
    return cfg.model_copy(update={"sampler": cfg.sampler.over(cached_teacher(cfg).sampler_defaults)})


def shard_seeds(cfg: GenerateConfig, index: int) -> range:
    start = cfg.seed + index * cfg.pairs_per_shard
    return range(start, start + cfg.pairs_per_shard)


def make_shard(cfg: GenerateConfig, index: int) -> tuple[ShardInfo, dict[str, Any]]:
    """Generate and write shard `index`; returns its manifest entry and timing stats."""
    set_threads(cfg.threads_per_worker)
    device = pick_device(cfg.device)
    teacher = cached_teacher(cfg)
    keep = trajectory_steps(cfg.trajectory, cfg.sampler.steps)
    seeds = shard_seeds(cfg, index)
    dtypes = {"x_T": cfg.xT_dtype, "x_0": cfg.x0_dtype, "traj": cfg.x0_dtype, "label": "float32", "seed": "int64"}
    t0, cpu0 = time.perf_counter(), time.process_time()
    sample_s = 0.0

    def records():
        nonlocal sample_s
        for b in range(0, len(seeds), cfg.batch):
            t = time.perf_counter()
            with torch.no_grad():
                pairs = teacher.sample(cfg.sampler, list(seeds[b:b + cfg.batch]), keep, device)
            sample_s += time.perf_counter() - t
            yield {k: v.cpu().numpy().astype(dtypes[k]) for k, v in pairs.items()}

    path = cfg.out / shard_name(index)              # a local path, or an object this worker uploads itself
    size, digest = write_shard(path, records())
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    info = ShardInfo(index=index, name=path.name, pairs=len(seeds), seed_start=seeds.start, seed_end=seeds.stop,
                     bytes=size, sha256=digest)
    # CPU seconds beside wall seconds: on a shared machine they tell the work from the wait for a core.
    return info, {"shard": index, "seconds": seconds, "cpu_seconds": cpu_seconds, "sample_seconds": sample_s,
                  "pairs_per_s": len(seeds) / seconds, "device": str(device), "threads": torch.get_num_threads()}
