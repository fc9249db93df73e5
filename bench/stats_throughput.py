"""`kdm-pipe stats` pairs/s through the pipeline (Ray tasks per shard writing zarr rows, then the merge) ÷ the same
computation in one process (the same per-shard sums over the same shards, in a loop, merged in memory): pixel
features, and detector features (a TorchScript file given with --detector, else a small conv net made here as a
stand-in). CIFAR-shaped pairs by default (3×32×32, x_0 float16, 250 pairs per record); --cov-max-dim (default 3072)
applies to both sides alike, so pixel features (d = C·H·W) are computed. Ray workers are started and have imported
the library before the clock starts (the stage's own timing excludes start-up the same way).

    OMP_NUM_THREADS=1 python bench/stats_throughput.py [--shards 16] [--pairs-per-shard 2000] [--workers 2]

Prints, for pixel and detector features, pairs/s of the pipeline and of one process and their ratio. Feeds
docs/BENCHMARKS.md, section "stats: pipeline ÷ one process".
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from kdm_pipe.feature_stats import ShardFeatures, feature_space
from kdm_pipe.manifest import Manifest, ShardInfo, save_manifest, shard_name
from kdm_pipe.shards import read_shard, write_shard
from kdm_pipe.stats import STORE, ShardMoments, checked_digest, field_specs
from kdm_pipe.stats_update import update


class ToyDetector(torch.nn.Module):
    """uint8 NCHW → 256 features: two strided convolutions, pooled (a stand-in with real per-image work)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(32, 3, 3, 3, generator=g) / 5)
        self.w2 = torch.nn.Parameter(torch.randn(256, 32, 3, 3, generator=g) / 17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.nn.functional.conv2d(x.float() / 127.5 - 1, self.w1, stride=2, padding=1))
        return torch.relu(torch.nn.functional.conv2d(h, self.w2, stride=2, padding=1)).mean(dim=(2, 3))


def make_pairs(out: Path, shards: int, per_shard: int, shape: tuple[int, ...]) -> Manifest:
    rng = np.random.default_rng(0)
    infos = []
    for k in range(shards):
        recs = [{"seed": np.arange(k * per_shard + b, k * per_shard + b + 250),
                 "x_T": (80 * rng.standard_normal((250, *shape))).astype(np.float32),
                 "x_0": np.tanh(rng.standard_normal((250, *shape))).astype(np.float16)}
                for b in range(0, per_shard, 250)]
        size, sha = write_shard(out / shard_name(k), recs)
        infos.append(ShardInfo(index=k, name=shard_name(k), pairs=per_shard, seed_start=k * per_shard,
                               seed_end=(k + 1) * per_shard, bytes=size, sha256=sha))
    m = Manifest(teacher={"name": "bench"}, source={}, shape=list(shape), sigma_max=80.0, num_shards=shards,
                 pairs_per_shard=per_shard, dtypes={"x_T": "float32", "x_0": "float16"}, shards=infos)
    save_manifest(out, m)
    return m


def one_process(directory: Path, m: Manifest, detector: Path | None, cov_max_dim: int) -> float:
    """pairs/s of the same per-shard work in a loop (sha256 check, moments, features), summed in memory."""
    specs, space = field_specs(m, cov_max_dim), feature_space(detector, tuple(m.shape))
    t = time.perf_counter()
    total = 0.0
    for info in m.shards:
        checked_digest(directory, info)
        moments, feats = ShardMoments(directory / info.name, specs, 0), ShardFeatures(space)
        for rec in read_shard(directory / info.name):
            moments.add(rec)
            feats.add(rec["x_0"])
        total += feats.arrays()["outer"].sum() + sum(a["sum"].sum() for a in moments.arrays().values())
    return m.num_pairs / (time.perf_counter() - t)


def pipeline(directory: Path, m: Manifest, detector: Path | None, workers: int, cov_max_dim: int) -> float:
    shutil.rmtree(directory / STORE, ignore_errors=True)
    t = time.perf_counter()
    update(directory, m, workers=workers, detector=detector, cov_max_dim=cov_max_dim)
    return m.num_pairs / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--pairs-per-shard", type=int, default=2000)
    p.add_argument("--shape", default="3,32,32")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cov-max-dim", type=int, default=3072)
    p.add_argument("--detector", type=Path, default=None, help="TorchScript net (default: a toy conv net)")
    a = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="stats-bench-"))
    try:
        m = make_pairs(tmp, a.shards, a.pairs_per_shard, tuple(int(s) for s in a.shape.split(",")))
        detector = a.detector
        if detector is None:
            detector = tmp / "toy-detector.pt"
            torch.jit.script(ToyDetector()).save(str(detector))
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False)
        warm = ray.remote(lambda: __import__("kdm_pipe.stats_update") and time.sleep(1))
        ray.get([warm.remote() for _ in range(a.workers)])           # workers up, library imported, before timing
        print(f"{m.num_pairs} pairs {a.shape} in {a.shards} shards, {a.workers} workers")
        for name, det in (("pixel features", None), (f"detector {detector.name}", detector)):
            single = one_process(tmp, m, det, a.cov_max_dim)
            piped = pipeline(tmp, m, det, a.workers, a.cov_max_dim)
            print(f"{name:32s} pipeline {piped:9,.0f} pairs/s   one process {single:9,.0f} pairs/s   "
                  f"ratio {piped / single:.2f}")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
