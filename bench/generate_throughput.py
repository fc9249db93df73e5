"""generate pairs/s through the whole pipeline (Ray tasks → tar shards → manifest) ÷ the bare sampler loop,
and 2 workers × 1 thread ÷ 1 worker × 2 threads. Checkerboard teacher, 18 Heun steps, batch 1000."""

import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray  # noqa: E402
import torch  # noqa: E402

from kdm_pipe.config import GenerateConfig  # noqa: E402
from kdm_pipe.generation import sample_pairs  # noqa: E402
from kdm_pipe.teachers import build_teacher  # noqa: E402
from stages import generate  # noqa: E402

SHARDS, PER_SHARD, BATCH = 16, 10000, 1000


def bare(threads: int) -> float:
    torch.set_num_threads(threads)
    cfg = GenerateConfig()
    teacher = build_teacher(cfg.teacher)
    t = time.perf_counter()
    for b in range(0, SHARDS * PER_SHARD, BATCH):
        with torch.no_grad():
            sample_pairs(teacher, cfg.sampler, list(range(b, b + BATCH)), None, torch.device("cpu"))
    return SHARDS * PER_SHARD / (time.perf_counter() - t)


def pipeline(workers: int, threads: int) -> float:
    out = tempfile.mkdtemp()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        cfg = GenerateConfig(out=out, shards=SHARDS, pairs_per_shard=PER_SHARD, batch=BATCH, workers=workers,
                             threads_per_worker=threads, cpus_per_worker=2 / workers)
        t = time.perf_counter()          # includes worker start-up and imports; excludes the cluster's own start
        generate.run(cfg, progress=False)
        return SHARDS * PER_SHARD / (time.perf_counter() - t)
    finally:
        ray.shutdown()
        shutil.rmtree(out)


if __name__ == "__main__":
    b2 = bare(2)
    p12 = pipeline(1, 2)
    p21 = pipeline(2, 1)
    print(f"bare sampler loop, 2 threads:      {b2:10,.0f} pairs/s")
    print(f"pipeline, 1 worker × 2 threads:    {p12:10,.0f} pairs/s   ratio to bare {p12 / b2:.2f} (goal ≥ 0.95)")
    print(f"pipeline, 2 workers × 1 thread:    {p21:10,.0f} pairs/s   ratio to 1×2 {p21 / p12:.2f} (goal ≥ 0.95)")
