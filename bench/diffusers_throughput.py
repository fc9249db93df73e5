"""generate pairs/s with a diffusers teacher (Ray task → tar shard → manifest) ÷ the bare diffusers scheduler loop on
the same model, batch, threads and network evaluations (issue 24):

    python bench/diffusers_throughput.py            # a random 32×32×3 UNet2DModel (3 levels, attention), DDIM schedule

The pipeline runs Heun with 18 steps (35 NFE) in 1 Ray worker × 1 thread; the bare loop is DDIMScheduler with 35
steps (35 NFE) calling the UNet directly in this process with 1 thread: `unet(x, t)` then `scheduler.step`. The
pipeline's rate is taken over its sampling time (the per-shard seconds of generate.jsonl, drawing noise, solving and
writing the tar), as in bench/generate_throughput.py. The bare loop runs before and after the pipeline and the
ratio is to their mean, so that a change in the machine's load during the run shows as their spread. Goal ≥ 0.95.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_throughput import pipeline  # noqa: E402

from kdm_pipe.config import GenerateConfig  # noqa: E402


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


def bare_loop(root: Path, n: int, batch: int, nfe: int) -> float:
    """pairs/s of the plain diffusers loop: noise, then `nfe` UNet calls each followed by a DDIM step."""
    import diffusers

    torch.set_num_threads(1)
    unet = diffusers.UNet2DModel.from_pretrained(root, local_files_only=True, use_safetensors=True,
                                                 low_cpu_mem_usage=False).eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(root)
    scheduler.set_timesteps(nfe)
    size = unet.config.sample_size
    t0 = time.perf_counter()
    for b in range(0, n, batch):
        x = torch.randn(min(batch, n - b), 3, size, size, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return n / (time.perf_counter() - t0)


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
                                         "workers": 1, "threads_per_worker": 1, "cpus_per_worker": 1})
    print(f"load average {open('/proc/loadavg').read().strip()}; UNet2DModel {args.size}×{args.size}×3, "
          f"{params / 1e6:.2f}M parameters; {n} pairs, batch {args.batch}, {nfe} NFE, 1 thread", flush=True)
    before = bare_loop(root, n, args.batch, nfe)
    rate, wall, start, _, _ = pipeline(cfg)
    after = bare_loop(root, n, args.batch, nfe)
    bare = (before + after) / 2
    print(f"bare diffusers loop (DDIM, {nfe} steps): {before:8.2f} then {after:8.2f} pairs/s (mean {bare:.2f})")
    print(f"pipeline (Heun {args.steps} steps, 1 worker × 1 thread): {rate:8.2f} pairs/s sampling; ratio "
          f"{rate / bare:.2f} (goal ≥ 0.95); start-up {start:.1f} s; wall {wall:.2f} pairs/s")
    print(f"load average {open('/proc/loadavg').read().strip()} at the end; {os.cpu_count()} cores")
