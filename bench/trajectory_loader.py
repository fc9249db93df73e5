"""Loader throughput and bytes per pair with trajectory states on vs off, on the same pairs: a pair directory with
trajectories (e.g. the one bench/trajectory_supervision.py generates) and an ends-only copy of it written here
(the same records without `traj`). Streams batches of 4096 with one loader worker, as training does: every
field, as the loader did before it shipped only the trainer's (trajectory supervision on), and the fields of a
plain (endpoint-only) training run. Also CPU µs per pair of the same stream read in-process (no worker), which
a loaded machine does not distort as it does wall rates.

    python bench/trajectory_loader.py runs/bench-traj/pairs [--batches 60]

Prints bytes per pair on disk (and generate's estimate), loader pairs/s and CPU µs per pair for each field
selection. Feeds docs/BENCHMARKS.md, section "loader with trajectory states".
"""

import argparse
import time
from pathlib import Path

from kdm_pipe.config import TrainConfig
from kdm_pipe.loader import batches
from kdm_pipe.manifest import ShardInfo, load_manifest, save_manifest
from kdm_pipe.shards import read_shard, write_shard
from kdm_pipe.training import trained_fields


def ends_only(src: Path, dst: Path) -> Path:
    if (dst / "manifest.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    m = load_manifest(src)
    infos = []
    for s in m.shards:
        size, digest = write_shard(dst / s.name, ({k: v for k, v in r.items() if k != "traj"}
                                                  for r in read_shard(src / s.name)))
        infos.append(ShardInfo(**{**s.model_dump(), "bytes": size, "sha256": digest}))
    save_manifest(dst, m.model_copy(update={"shards": infos, "trajectory_steps": None, "trajectory_sigmas": None}))
    return dst


def rate(data: Path, n: int, fields: frozenset[str] | None, workers: int = 1, batch: int = 4096) -> float:
    """Pairs per second of wall time with `workers` loader workers; with none, CPU µs per pair of this process
    (reader and batching in one process: a reading that holds on a loaded machine)."""
    m = load_manifest(data)
    stream = batches(data, [(s.name, s.pairs) for s in m.shards], batch, 8192, seed=0, workers=workers,
                     fields=fields)
    clock = time.perf_counter if workers else time.process_time
    try:
        next(stream)                                   # worker started
        t = clock()
        for _ in range(n):
            next(stream)
        spent = clock() - t
        return n * batch / spent if workers else 1e6 * spent / (n * batch)
    finally:
        stream.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--batches", type=int, default=60)
    args = ap.parse_args()
    plain = ends_only(args.data, args.data.with_name(args.data.name + "-ends"))
    endpoint = trained_fields(TrainConfig(data=args.data, out=args.data))
    for name, d, fields in (("every field", args.data, None), ("plain training", args.data, endpoint),
                            ("every field", plain, None), ("plain training", plain, endpoint)):
        m = load_manifest(d)
        per_pair = sum(s.bytes for s in m.shards) / m.num_pairs
        states = len(m.trajectory_steps or [])
        print(f"{name:15} {states:2d} states  {per_pair:7.1f} bytes/pair on disk  "
              f"{rate(d, args.batches, fields):10,.0f} pairs/s  {rate(d, args.batches, fields, 0):6.2f} CPU µs/pair")
