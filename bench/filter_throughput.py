"""Memorisation filter pairs/s: the `filter` stage end to end (Ray workers, real tar shards, reference put once)
on (a) digits-shaped pairs against scikit-learn's 1,797 digits and (b) CIFAR-shaped pairs (3×32×32) against a
50,000-image reference; and the search kernel alone (`memorisation.nearest`, one process) beside a brute-force
torch.cdist + sort of the same queries, with the GFLOP/s it reaches. From the kernel's FLOP count it projects the
time for 1M CIFAR pairs × 50k references on a GPU of a given FP32 throughput (matrix products dominate: 2·D FLOP
per query–reference pair; the exact re-ranking adds k/N of that).

Pairs and reference are seeded random images in [−1, 1]: exact search costs the same whatever the pixels.

    python bench/filter_throughput.py                       # the recorded sizes
    python bench/filter_throughput.py --tiny                # a seconds-long check that it runs

Feeds docs/BENCHMARKS.md, section "filter: throughput".
"""

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdm_pipe.config import FilterConfig, ImportConfig
from kdm_pipe.memorisation import K, nearest
from stages import filter_pairs as memorisation_filter
from stages import import_pairs


def pair_set(root: Path, shape: tuple, n: int, per_shard: int, rng: np.random.Generator) -> Path:
    x_0 = rng.uniform(-1, 1, (n, *shape)).astype(np.float32)
    np.save(root / "x_0.npy", x_0)
    np.save(root / "x_T.npy", (80 * rng.standard_normal(x_0.shape)).astype(np.float32))
    import_pairs.run(ImportConfig(format="npy", x_T=root / "x_T.npy", x_0=root / "x_0.npy", out=root / "pairs",
                                  pairs_per_shard=per_shard, batch=min(per_shard, 1024)), progress=False)
    return root / "pairs"


def stage_rate(pairs: Path, ref: str, workers: int, chunk: int) -> float:
    t = time.perf_counter()
    memorisation_filter.run(FilterConfig(data=pairs, ref=ref, workers=workers, chunk=chunk, device="cpu"),
                            progress=False)
    return time.perf_counter() - t


def kernel(queries: torch.Tensor, ref: torch.Tensor, chunk: int) -> tuple[float, float]:
    """(pairs/s of `nearest`, pairs/s of cdist + sort) on the same queries, one process."""
    ref_sq = (ref * ref).sum(1)
    t = time.perf_counter()
    nearest(queries, ref, ref_sq, K, chunk)
    ours = len(queries) / (time.perf_counter() - t)
    t = time.perf_counter()
    for s in range(0, len(queries), chunk):                  # brute force, chunked only to fit memory
        torch.cdist(queries[s:s + chunk], ref).topk(K, dim=1, largest=False)
    return ours, len(queries) / (time.perf_counter() - t)


def case(name: str, shape: tuple, ref_images: np.ndarray | None, ref_source: str | None, n: int, per_shard: int,
         workers: int, chunk: int, kernel_queries: int, gpu_tflops: float) -> None:
    root = Path(tempfile.mkdtemp(prefix="filter-bench-"))
    rng = np.random.default_rng(0)
    try:
        if ref_source is None:
            np.save(root / "ref.npy", ref_images)
            ref_source = str(root / "ref.npy")
        from kdm_pipe.datasets import load_images
        ref = torch.from_numpy(load_images(ref_source).images.reshape(-1, math.prod(shape)))
        pairs = pair_set(root, shape, n, per_shard, rng)
        print(f"\n== {name}: {n:,} pairs {shape} against {len(ref):,} reference images, {workers} Ray workers, "
              f"chunk {chunk}")
        seconds = stage_rate(pairs, ref_source, workers, chunk)
        print(f"stage end to end (reference load + hash, Ray start, search, manifest, report): {seconds:.1f} s, "
              f"{n / seconds:,.0f} pairs/s")
        torch.set_num_threads(1)
        q = torch.from_numpy(rng.uniform(-1, 1, (kernel_queries, math.prod(shape))).astype(np.float32))
        ours, brute = kernel(q, ref, chunk)
        flop = 2 * math.prod(shape) * len(ref)                 # per query
        print(f"kernel, 1 thread: nearest {ours:,.0f} pairs/s ({ours * flop / 1e9:.1f} GFLOP/s); "
              f"cdist + topk {brute:,.0f} pairs/s; ratio {ours / brute:.2f}")
        t_gpu = 1e6 * 2 * math.prod(shape) * 50_000 / (gpu_tflops * 1e12)
        print(f"projection: 1M pairs {shape} × 50,000 references = {1e6 * 2 * math.prod(shape) * 50_000:.2e} FLOP "
              f"→ {t_gpu:.0f} s at {gpu_tflops:g} TFLOP/s FP32 (matrix-product bound; ×1.5 for realistic "
              f"efficiency), vs {1e6 / ours / 3600:.1f} h for this CPU thread")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small sizes: checks that the benchmark runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu-tflops", type=float, default=19.5, help="FP32 throughput of the GPU (A100: 19.5)")
    a = ap.parse_args()
    digits_pairs, cifar_pairs, cifar_ref = (512, 512, 2_000) if a.tiny else (20_480, 10_000, 50_000)
    case("digits", (1, 8, 8), None, "sklearn-digits", digits_pairs, min(digits_pairs, 2048), a.workers, 2048,
         min(digits_pairs, 4096), a.gpu_tflops)
    ref_images = np.random.default_rng(1).uniform(-1, 1, (cifar_ref, 3, 32, 32)).astype(np.float32)
    case("CIFAR-shaped", (3, 32, 32), ref_images, None, cifar_pairs, min(cifar_pairs, 2500), a.workers, 2048,
         256 if a.tiny else 1024, a.gpu_tflops)
