"""generate pairs/s with a diffusers teacher (Ray task → tar shard → manifest) ÷ the bare diffusers scheduler loop on
the same model, batch, threads and network evaluations (issue 24):

    python bench/diffusers_throughput.py            # a random 32×32×3 UNet2DModel (3 levels, attention), DDIM schedule

The pipeline runs Heun with 18 steps (35 NFE) in 1 Ray worker × 1 thread, one shard at a time; the bare loop is
DDIMScheduler with 35 steps (35 NFE) calling the UNet directly in this process with 1 thread: `unet(x, t)` then
`scheduler.step`. The pipeline's rate is taken over its shards (generate.jsonl's per-shard seconds: drawing noise,
solving and writing the tar; its start-up is left out, as in bench/generate_throughput.py), in wall and in CPU
seconds: on a shared machine the CPU time of the one busy thread shows the work itself, the wall time also the wait
for a core. The bare loop runs before and after the pipeline and the ratios are to their mean, so that a change of
the machine's load during the run shows as their spread. Goal ≥ 0.95.

Prints the bare loop's and the pipeline's pairs per wall second and per CPU second and their ratios. Feeds
docs/BENCHMARKS.md, section "generate with a diffusers teacher ÷ the bare diffusers loop".
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")         # as kdm-pipe starts its private clusters
import ray  # noqa: E402

from kdm_pipe.config import GenerateConfig  # noqa: E402
from stages import generate  # noqa: E402


def save_model(root: Path, size: int, seed: int = 0) -> int:
    """A randomly initialised (non-trivial: 3 levels, attention at the lowest) UNet2DModel and its DDIM schedule."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 64, 64),
                                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(root, safe_serialization=True)
    diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True).save_pretrained(root)
    return sum(p.numel() for p in unet.parameters())


def pipeline(cfg: GenerateConfig) -> tuple[float, float]:
    """(pairs per second, pairs per CPU second) of generate.run over its shards (generate.jsonl)."""
    out = Path(tempfile.mkdtemp()) / "pairs"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        generate.run(cfg.model_copy(update={"out": out}), progress=False)
    finally:
        ray.shutdown()
    log = [json.loads(line) for line in (out / generate.LOG).read_text().splitlines()]
    n = sum(e["info"]["pairs"] for e in log)
    return n / sum(e["seconds"] for e in log), n / sum(e["cpu_seconds"] for e in log)


def bare_loop(root: Path, n: int, batch: int, nfe: int) -> tuple[float, float]:
    """(pairs per second, pairs per CPU second) of the plain diffusers loop: noise, then `nfe` UNet calls each
    followed by a DDIM step."""
    import diffusers

    torch.set_num_threads(1)
    unet = diffusers.UNet2DModel.from_pretrained(root, local_files_only=True, use_safetensors=True,
                                                 low_cpu_mem_usage=False).eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(root)
    scheduler.set_timesteps(nfe)
    size = unet.config.sample_size
    t0, cpu0 = time.perf_counter(), time.process_time()
    for b in range(0, n, batch):
        x = torch.randn(min(batch, n - b), 3, size, size, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return n / (time.perf_counter() - t0), n / (time.process_time() - cpu0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--pairs-per-shard", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=18, help="Heun steps of the pipeline (the bare loop: 2N − 1 NFE)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp()) / "model"
    params = save_model(root, args.size)
    nfe, n = 2 * args.steps - 1, args.shards * args.pairs_per_shard
    cfg = GenerateConfig.model_validate({"teacher": {"name": "diffusers", "checkpoint": str(root)},
                                         "sampler": {"steps": args.steps}, "shards": args.shards,
                                         "pairs_per_shard": args.pairs_per_shard, "batch": args.batch,
                                         "workers": 1, "threads_per_worker": 1, "cpus_per_worker": 1,
                                         "max_in_flight": 1})     # one shard at a time: the bare loop's one process
    print(f"load average {open('/proc/loadavg').read().strip()}; UNet2DModel {args.size}×{args.size}×3, "
          f"{params / 1e6:.2f}M parameters; {n} pairs, batch {args.batch}, {nfe} NFE, 1 thread", flush=True)
    runs = [bare_loop(root, n, args.batch, nfe), pipeline(cfg), bare_loop(root, n, args.batch, nfe)]
    (b1, c1), (p, pc), (b2, c2) = runs
    print(f"bare diffusers loop (DDIM, {nfe} steps): {b1:.2f} then {b2:.2f} pairs/s, {c1:.2f} then {c2:.2f} pairs "
          f"per CPU second")
    print(f"pipeline (Heun {args.steps} steps, 1 worker × 1 thread): {p:.2f} pairs/s, {pc:.2f} pairs per CPU second")
    print(f"ratio pipeline ÷ mean bare: {p / ((b1 + b2) / 2):.2f} in wall time, {pc / ((c1 + c2) / 2):.2f} in CPU "
          f"time (goal ≥ 0.95)")
    print(f"load average {open('/proc/loadavg').read().strip()} at the end; {os.cpu_count()} cores")
