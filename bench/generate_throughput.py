"""generate pairs/s through the whole pipeline (Ray tasks → tar shards → manifest) ÷ the best bare sampler loop with
the same total threads laid out the same ways (issue 12):

    python bench/generate_throughput.py --teacher digits           # shipped 8×8 EDM teacher, Heun 18 steps = 35 NFE
    python bench/generate_throughput.py --teacher cifar-random     # random-init DDPM++ CIFAR (55.7M), 4 steps = 7 NFE
    python bench/generate_throughput.py --teacher checkerboard     # analytic 2-D teacher, 35 NFE
    ... --load                                                     # all of it next to a 2-thread torch job

Bare layouts: `Teacher.sample` in 1 process × 2 threads, and in 2 processes × 1 thread each taking half the seeds
(started together once their teachers are built). Pipeline layouts: `stages.generate.run` with 2 Ray workers × 1
thread and 1 worker × 2 threads, plus the defaults (no flags). The pipeline's rate is taken over its sampling time
(the per-shard seconds of generate.jsonl, shards in parallel over the workers); its start-up (worker start, imports,
teacher load, scheduling) is reported separately, as is the bare layouts' teacher build. Ratios are to the best bare
layout; the goal is ≥ 0.95.

Prints, per layout, pairs/s and the ratio to the best bare layout, the start-up seconds, and the load average.
Feeds docs/BENCHMARKS.md, section "generate ÷ a fair bare loop".
"""

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")         # as kdm-pipe starts its private clusters
import ray  # noqa: E402
import torch  # noqa: E402

from kdm_pipe import storage  # noqa: E402
from kdm_pipe.config import GenerateConfig  # noqa: E402
from kdm_pipe.networks import ARCHITECTURES, build_network  # noqa: E402
from kdm_pipe.teachers import build_teacher  # noqa: E402
from kdm_pipe.teachers.edm_checkpoint import save_state_dict_checkpoint  # noqa: E402
from stages import generate  # noqa: E402

# teacher: (shards, pairs per shard, batch, Heun steps)
SIZES = {"checkerboard": (16, 10000, 1000, 18), "digits": (8, 128, 64, 18), "cifar-random": (4, 8, 8, 4)}
LOAD = "import torch\ntorch.set_num_threads(2)\na = torch.randn(800, 800)\nwhile True:\n    a = (a @ a).tanh()\n"


def cifar_random(root: Path) -> dict:
    """A randomly initialised DDPM++ CIFAR-10 network (EDM's uncond configuration) saved as a kdm-pipe checkpoint."""
    kwargs = dict(img_resolution=32, img_channels=3, **ARCHITECTURES["ddpmpp"], dropout=0.13, augment_dim=9)
    torch.manual_seed(0)
    net = build_network("VPPrecond", **kwargs)
    save_state_dict_checkpoint(net, "VPPrecond", kwargs, root / "cifar-random.pt")
    return {"name": "edm", "checkpoint": str(root / "cifar-random.pt")}


def config(teacher: str, root: Path) -> GenerateConfig:
    shards, per_shard, batch, steps = SIZES[teacher]
    t = cifar_random(root) if teacher == "cifar-random" else {"name": teacher}
    return GenerateConfig.model_validate({"teacher": t, "sampler": {"steps": steps}, "shards": shards,
                                          "pairs_per_shard": per_shard, "batch": batch, "out": root / "unused"})


def bare_loop(cfg: GenerateConfig, threads: int, seeds: range, ready=None, go=None) -> tuple[float, float]:
    """(teacher build seconds, sampling seconds) of the bare loop over `seeds`."""
    torch.set_num_threads(threads)
    t = time.perf_counter()
    teacher = build_teacher(cfg.teacher)
    build = time.perf_counter() - t
    if ready is not None:
        ready.wait()
        go.wait()
    t = time.perf_counter()
    for b in range(seeds.start, seeds.stop, cfg.batch):
        with torch.no_grad():
            teacher.sample(cfg.sampler, list(range(b, min(b + cfg.batch, seeds.stop))), None, torch.device("cpu"))
    return build, time.perf_counter() - t


def _child(cfg_json: str, threads: int, start: int, stop: int, ready, go, out) -> None:
    out.put(bare_loop(GenerateConfig.model_validate_json(cfg_json), threads, range(start, stop), ready, go))


def bare(cfg: GenerateConfig, processes: int, threads: int) -> tuple[float, float]:
    """(pairs/s, start-up seconds) of `processes` bare loops × `threads` sharing the seeds, started together."""
    n = cfg.shards * cfg.pairs_per_shard
    if processes == 1:
        build, seconds = bare_loop(cfg, threads, range(n))
        return n / seconds, build
    ctx = mp.get_context("spawn")
    # The children import torch afresh: the thread count must be in their environment as it is in a Ray worker's
    # (OMP_NUM_THREADS), or OpenMP sizes its pool to the machine first.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    ready, go, out = ctx.Barrier(processes + 1), ctx.Barrier(processes + 1), ctx.Queue()
    cut = [n * p // processes for p in range(processes + 1)]
    procs = [ctx.Process(target=_child, args=(cfg.model_dump_json(), threads, cut[p], cut[p + 1], ready, go, out))
             for p in range(processes)]
    for p in procs:
        p.start()
    ready.wait()
    go.wait()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return n / max(s for _, s in results), max(b for b, _ in results)


def pipeline(cfg: GenerateConfig, out=None, **layout) -> tuple[float, float, float, int, int]:
    """(sampling pairs/s, wall pairs/s, start-up seconds, workers, threads) of generate.run with `layout`, into
    `out` (a fresh local directory by default; an s3:// location is emptied afterwards like the directory)."""
    out = storage.location(out or tempfile.mkdtemp())
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        cfg = cfg.model_copy(update={"out": out, **layout})
        t = time.perf_counter()
        generate.run(cfg, progress=False)
        wall = time.perf_counter() - t
        log = [json.loads(line) for line in (out / generate.LOG).read_text().splitlines()]
        sampling = sum(e["seconds"] for e in log) / cfg.workers       # shards run in parallel over the workers
        n = cfg.shards * cfg.pairs_per_shard
        return n / sampling, n / wall, wall - sampling, cfg.workers, cfg.threads_per_worker
    finally:
        ray.shutdown()
        if storage.is_remote(out):
            out.fs.rm(out.path, recursive=True)
        else:
            shutil.rmtree(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", choices=sorted(SIZES), default="digits")
    ap.add_argument("--load", action="store_true", help="run everything next to a 2-thread torch job")
    ap.add_argument("--shards", type=int, help="override the number of shards (a quick check of the script)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if args.load else None
    try:
        cfg = config(args.teacher, root)
        cfg = cfg.model_copy(update={"shards": args.shards or cfg.shards})
        print(f"load average {os.getloadavg()[0]:.2f}{' (with the 2-thread load job)' if load else ''}; teacher "
              f"{args.teacher}: {cfg.shards} shards × {cfg.pairs_per_shard} pairs, batch {cfg.batch}, Heun "
              f"{cfg.sampler.steps} steps ({2 * cfg.sampler.steps - 1} NFE)")
        bares = {"1 process × 2 threads": bare(cfg, 1, 2), "2 processes × 1 thread": bare(cfg, 2, 1)}
        best = max(r for r, _ in bares.values())
        for name, (rate, start) in bares.items():
            print(f"bare {name}:       {rate:10,.2f} pairs/s   (teacher build {start:.1f} s)")
        default_batch = GenerateConfig.model_fields["batch"].default
        for name, layout in {"2 workers × 1 thread": {"workers": 2, "threads_per_worker": 1, "cpus_per_worker": 1},
                             "1 worker × 2 threads": {"workers": 1, "threads_per_worker": 2, "cpus_per_worker": 2},
                             f"defaults (batch {default_batch})": {"batch": default_batch}}.items():
            rate, wall, start, w, th = pipeline(cfg, **layout)
            print(f"pipeline {name} ({w}×{th}): {rate:10,.2f} pairs/s sampling, ratio {rate / best:.2f} to best bare "
                  f"(goal ≥ 0.95); start-up {start:.1f} s; wall {wall:,.2f} pairs/s ({wall / best:.2f})")
    finally:
        if load:
            load.kill()
        shutil.rmtree(root)
