"""generate pairs/s on a two-node local Ray cluster (head 1 CPU + node 1 CPU) ÷ one node with 2 CPUs, both
joined with `generate --address`; then the per-NFE cost of a CIFAR-size DDPM++ teacher (FLOPs counted, CPU
time measured) and a projection of wall time for 1M CIFAR pairs at 35 NFE on N GPUs.

    python bench/cluster_throughput.py [--shards 16] [--pairs-per-shard 10000] [--repeats 2]

Prints each layout's pairs/s per run (order A B B A …) and their mean, the ratio 2 nodes ÷ 1 node, then the
DDPM++ teacher's parameters, GFLOP per image per NFE, CPU ms per image per NFE, and the projection for 1M pairs.
Feeds docs/BENCHMARKS.md, sections "generate on two nodes ÷ one node" and "The CIFAR-10 teacher's cost and the
1M-pair projection". SIGTERM stops the private cluster before exiting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from infra import LocalCluster  # noqa: E402

from kdm_pipe.interrupts import stop_on_signals  # noqa: E402

BATCH, STEPS = 1000, 18                                    # as bench/generate_throughput.py
CIFAR_PAIRS, CIFAR_NFE, NET_BATCH, FORWARDS = 1_000_000, 35, 64, 2     # ~30 s a forward here
# NVIDIA A100 datasheet peaks (dense): FP32 19.5 TFLOP/s; TF32 tensor cores 156 TFLOP/s, which PyTorch uses for
# cuDNN convolutions by default. Utilisation is our assumption for a 32×32 U-Net at large batch: its convolutions
# have few pixels per channel and GroupNorm/attention are memory-bound, so well under half of peak.
GPU_ASSUMPTIONS = {"A100, TF32 convs, 25% of 156 TFLOP/s": 156e12 * 0.25,
                   "A100, strict FP32, 50% of 19.5 TFLOP/s": 19.5e12 * 0.50}
# A cross-check from EDM's README: its CIFAR-10 DDPM++ nets trained 200 Mimg in ~2 days on 8 V100s (FP32);
# a training image costs ~3 forwards.
EDM_TRAINING = dict(images=200e6, forwards_per_image=3, gpus=8, seconds=2 * 86400)


def generate_pairs_per_s(nodes: list[int], shards: int, per_shard: int) -> float:
    """generate pairs/s with one Ray node per entry of `nodes` (its CPUs), 2 workers × 1 thread in all."""
    from kdm_pipe.config import GenerateConfig
    from stages import generate

    with LocalCluster() as cluster:
        for cpus in nodes:
            cluster.add_node(cpus)
        out = tempfile.mkdtemp()
        try:
            cfg = GenerateConfig(out=out, shards=shards, pairs_per_shard=per_shard, batch=BATCH,
                                 sampler={"steps": STEPS}, workers=2, threads_per_worker=1, cpus_per_worker=1,
                                 address=cluster.address)
            t = time.perf_counter()      # includes connecting the driver and starting workers, as a real run does
            generate.run(cfg, progress=False)
            return shards * per_shard / (time.perf_counter() - t)
        finally:
            shutil.rmtree(out)


def ddpmpp_cost() -> tuple[int, float, float]:
    """(parameters, FLOPs per image per NFE, CPU seconds per image per NFE) of EDM's CIFAR-10 VP teacher."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kdm_pipe.networks import ARCHITECTURES, build_network

    torch.manual_seed(0)
    net = build_network("VPPrecond", img_resolution=32, img_channels=3, **ARCHITECTURES["ddpmpp"], dropout=0.13,
                        augment_dim=9).eval()
    x, sigma = 80 * torch.randn(NET_BATCH, 3, 32, 32), torch.full((NET_BATCH,), 80.0)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            net(x, sigma)
        t = time.perf_counter()
        for _ in range(FORWARDS):
            net(x, sigma)
        seconds = time.perf_counter() - t
    return (sum(p.numel() for p in net.parameters()), counter.get_total_flops() / NET_BATCH,
            seconds / (FORWARDS * NET_BATCH))


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def main(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores; other jobs on the machine skew every number)")
    layouts = {"1 node × 2 CPUs": [2], "2 nodes × 1 CPU": [1, 1]}
    runs: dict[str, list[float]] = {k: [] for k in layouts}
    for i in range(args.repeats):                  # order A B B A …: drift and warm caches favour neither layout
        for name in (list(layouts) if i % 2 == 0 else reversed(layouts)):
            runs[name].append(generate_pairs_per_s(layouts[name], args.shards, args.pairs_per_shard))
    mean = {k: sum(v) / len(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"generate, {k}: {mean[k]:10,.0f} pairs/s   (runs: {', '.join(f'{r:,.0f}' for r in v)})")
    print(f"2 nodes ÷ 1 node at equal cores: {mean['2 nodes × 1 CPU'] / mean['1 node × 2 CPUs']:.2f}")

    import torch
    torch.set_num_threads(2)
    params, flops, cpu_s = ddpmpp_cost()
    work = CIFAR_PAIRS * CIFAR_NFE * flops
    print(f"\nDDPM++ CIFAR-10 (VPPrecond): {params / 1e6:.1f}M parameters, {flops / 1e9:.2f} GFLOP per image per NFE")
    print(f"this CPU, 2 threads, batch {NET_BATCH}: {cpu_s * 1e3:.1f} ms per image per NFE "
          f"({flops / cpu_s / 1e9:.0f} GFLOP/s); {CIFAR_PAIRS:,} pairs × {CIFAR_NFE} NFE here: "
          f"{CIFAR_PAIRS * CIFAR_NFE * cpu_s / 86400:,.0f} days")
    print(f"{CIFAR_PAIRS:,} pairs × {CIFAR_NFE} NFE = {work / 1e15:,.0f} PFLOP; wall time on N GPUs "
          f"(perfect scaling over shards):")
    e = EDM_TRAINING
    implied = e["images"] * e["forwards_per_image"] * flops / (e["gpus"] * e["seconds"])
    print(f"  (EDM's CIFAR training record implies {implied / 1e12:.1f} TFLOP/s per V100, FP32 peak 15.7: cuDNN's "
          f"Winograd convolutions do fewer FLOPs than counted here)")
    for name, rate in GPU_ASSUMPTIONS.items():
        print(f"  {name} = {rate / 1e12:.1f} TFLOP/s effective: " +
              ", ".join(f"N={n}: {hours(work / (n * rate))}" for n in (1, 8, 32, 128)))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--pairs-per-shard", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each layout")
    args = ap.parse_args()
    with stop_on_signals():          # SIGTERM unwinds through the clusters' `with`: their nodes stop
        main(args)
