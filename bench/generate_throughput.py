"""generate pairs/s through the whole pipeline (Ray tasks → tar shards → manifest) ÷ the bare sampler loop.

    python bench/generate_throughput.py --teacher checkerboard     # analytic 2-D teacher, batch 1000, 35 NFE
    python bench/generate_throughput.py --teacher digits           # shipped 8×8 EDM teacher, batch 64, 35 NFE
    python bench/generate_throughput.py --teacher cifar-random     # random-init DDPM++ CIFAR (55.7M), batch 64, 1 NFE

The bare loop is `sample_pairs` in one process at 1 and at 2 torch threads (the best is the baseline); the
pipeline is `stages.generate.run` with 2 Ray workers × 1 thread and with 1 worker × 2 threads, timed from the
call (worker start-up, imports and teacher loading included; the local cluster's own start excluded).
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray  # noqa: E402
import torch  # noqa: E402

from kdm_pipe.config import GenerateConfig  # noqa: E402
from kdm_pipe.generation import sample_pairs  # noqa: E402
from kdm_pipe.networks import ARCHITECTURES, build_network  # noqa: E402
from kdm_pipe.teachers import build_teacher  # noqa: E402
from kdm_pipe.teachers.edm_checkpoint import save_state_dict_checkpoint  # noqa: E402
from stages import generate  # noqa: E402

# teacher: (shards, pairs per shard, batch, sampler steps)
SIZES = {"checkerboard": (16, 10000, 1000, 18), "digits": (4, 128, 64, 18), "cifar-random": (2, 64, 64, 1)}


def cifar_random(root: Path) -> dict:
    """A randomly initialised DDPM++ CIFAR-10 network (EDM's uncond configuration) saved as a kdm-pipe checkpoint."""
    kwargs = dict(img_resolution=32, img_channels=3, **ARCHITECTURES["ddpmpp"], dropout=0.13, augment_dim=9)
    torch.manual_seed(0)
    net = build_network("VPPrecond", **kwargs)
    save_state_dict_checkpoint(net, "VPPrecond", kwargs, root / "cifar-random.pt")
    return {"name": "edm", "checkpoint": str(root / "cifar-random.pt")}


def config(teacher: str, root: Path, **kw) -> GenerateConfig:
    shards, per_shard, batch, steps = SIZES[teacher]
    t = cifar_random(root) if teacher == "cifar-random" else {"name": teacher}
    return GenerateConfig.model_validate({"teacher": t, "sampler": {"steps": steps}, "shards": shards,
                                          "pairs_per_shard": per_shard, "batch": batch, **kw})


def bare(cfg: GenerateConfig, threads: int) -> float:
    torch.set_num_threads(threads)
    teacher = build_teacher(cfg.teacher)
    n = cfg.shards * cfg.pairs_per_shard
    t = time.perf_counter()
    for b in range(0, n, cfg.batch):
        with torch.no_grad():
            sample_pairs(teacher, cfg.sampler, list(range(b, b + cfg.batch)), None, torch.device("cpu"))
    return n / (time.perf_counter() - t)


def pipeline(cfg: GenerateConfig, workers: int, threads: int) -> float:
    out = tempfile.mkdtemp()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        cfg = cfg.model_copy(update={"out": Path(out), "workers": workers, "threads_per_worker": threads,
                                     "cpus_per_worker": 2 / workers})
        t = time.perf_counter()
        generate.run(cfg, progress=False)
        return cfg.shards * cfg.pairs_per_shard / (time.perf_counter() - t)
    finally:
        ray.shutdown()
        shutil.rmtree(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", choices=sorted(SIZES), default="checkerboard")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    cfg = config(args.teacher, root)
    nfe = 2 * cfg.sampler.steps - 1
    b1, b2 = bare(cfg, 1), bare(cfg, 2)
    base = max(b1, b2)
    p21, p12 = pipeline(cfg, 2, 1), pipeline(cfg, 1, 2)
    print(f"teacher {args.teacher}: {cfg.shards} shards × {cfg.pairs_per_shard} pairs, batch {cfg.batch}, "
          f"Heun {cfg.sampler.steps} steps ({nfe} NFE)")
    print(f"bare sampler loop, 1 thread:       {b1:10,.2f} pairs/s")
    print(f"bare sampler loop, 2 threads:      {b2:10,.2f} pairs/s")
    print(f"pipeline, 2 workers × 1 thread:    {p21:10,.2f} pairs/s   "
          f"ratio to best bare {p21 / base:.2f} (goal ≥ 0.95)")
    print(f"pipeline, 1 worker × 2 threads:    {p12:10,.2f} pairs/s   ratio to best bare {p12 / base:.2f}")
    print(f"per image-forward (best bare):     {1e3 / (base * nfe):10,.2f} ms  "
          f"→ 35-NFE pairs/s ≈ {base * nfe / 35:,.2f}")
    shutil.rmtree(root)
