"""Loader pairs/s for CIFAR-shaped pairs (3×32×32; x_T float32, x_0 float16, 250 pairs per record) streamed from
tar shards ÷ a folder of one float64 .npz per pair read with np.load in a DataLoader (the official KDM layout);
both with 2 loader workers, at batch 128 and 512. Also bytes per pair ÷ the official npz.

--s3 s3://BUCKET/PREFIX: instead, the same shards streamed from an object store ÷ from local files (the shards are
uploaded there first; the bucket is made if missing). The endpoint and credentials come from the AWS variables, e.g.
a local moto server: `python -m moto.server -p 5555 &` then AWS_ENDPOINT_URL=http://127.0.0.1:5555
AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x python bench/loader_throughput.py --s3 s3://bench/loader.

Prints pairs/s of both sides and their ratio at each batch, bytes per pair, and the load average (with --s3: also
CPU µs per pair of each side). Feeds docs/BENCHMARKS.md, sections "loader ÷ the official npz folder" and
"loader from an S3 server ÷ from local files".
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdm_pipe.loader import batches
from kdm_pipe.shards import write_shard

N, PER_SHARD, REC, BATCH, BATCHES = 20000, 2500, 250, 128, 150


class NpzFolder(Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        a = np.load(self.files[i])["arr_0"]
        return torch.from_numpy(a[0]), torch.from_numpy(a[1])


def cpu(loader) -> float:
    """CPU seconds so far of this process and of `loader`'s worker processes (read from /proc while they run)."""
    tick = os.sysconf("SC_CLK_TCK")
    workers = getattr(getattr(loader, "_it", None), "_workers", [])
    total = time.process_time()
    for w in workers:
        with open(f"/proc/{w.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick          # utime, stime
    return total


def rate(batches, batch: int, cpu_too: bool = False) -> float | tuple[float, float]:
    """Pairs/s (and, with cpu_too, CPU µs per pair of the trainer and its loader workers, start-up excluded: the
    number that stays put on a loaded machine)."""
    it = iter(batches)
    next(it)                                          # workers started
    t, c = time.perf_counter(), cpu(batches) if cpu_too else 0.0
    n = BATCHES * BATCH // batch
    for _ in range(n):
        next(it)
    rate = n * batch / (time.perf_counter() - t)
    used = cpu(batches) - c if cpu_too else 0.0
    getattr(batches, "close", lambda: None)()
    return (rate, 1e6 * used / (n * batch)) if cpu_too else rate


def shards(root: Path, rng: np.random.Generator) -> list[str]:
    names = []
    for k in range(N // PER_SHARD):
        recs = []
        for r in range(PER_SHARD // REC):
            seeds = np.arange(k * PER_SHARD + r * REC, k * PER_SHARD + (r + 1) * REC)
            recs.append({"x_T": (80 * rng.standard_normal((REC, 3, 32, 32))).astype(np.float32),
                         "x_0": rng.uniform(-1, 1, (REC, 3, 32, 32)).astype(np.float16), "seed": seeds})
        names.append(f"shard-{k:06d}.tar")
        write_shard(root / names[-1], recs)
    return names


def versus_npz(root: Path, names: list[str], rng: np.random.Generator) -> None:
    (root / "npz").mkdir()
    files = []
    for i in range(N):
        f = root / "npz" / f"{i:06d}.npz"
        np.savez(f, arr_0=np.stack([80 * rng.standard_normal((3, 32, 32)), rng.uniform(-1, 1, (3, 32, 32))]))
        files.append(f)
    print(f"load average {os.getloadavg()[0]:.2f}")
    for batch in (BATCH, 512):
        ours = rate(batches(root, [(n, PER_SHARD) for n in names], batch, 4096, 0, workers=2), batch)
        theirs = rate(DataLoader(NpzFolder(files), batch_size=batch, shuffle=True, num_workers=2), batch)
        print(f"batch {batch}: tar shards + kdm-pipe stream {ours:10,.0f} pairs/s; npz folder + np.load DataLoader "
              f"{theirs:10,.0f} pairs/s; ratio {ours / theirs:.1f}× (goal ≥ 5×, ≥ 30,000/s)")
    tar_bytes = sum((root / n).stat().st_size for n in names) / N
    npz_bytes = sum(f.stat().st_size for f in files) / N
    print(f"bytes per pair: {tar_bytes:,.0f} vs {npz_bytes:,.0f}   ratio {tar_bytes / npz_bytes:.2f} (goal ≤ 0.4)")


def versus_s3(root: Path, names: list[str], url: str) -> None:
    from kdm_pipe import storage
    remote = storage.location(url)
    remote.fs.makedirs(storage.bucket(remote), exist_ok=True)
    for n in names:
        remote.fs.put_file(str(root / n), f"{remote.path}/{n}")
    print(f"load average {os.getloadavg()[0]:.2f}; {len(names)} shards of {(root / names[0]).stat().st_size:,} bytes "
          f"at {url} ({os.environ.get('AWS_ENDPOINT_URL', 'the default endpoint')})")
    for batch in (BATCH, 512):
        there, cpu_there = rate(batches(remote, [(n, PER_SHARD) for n in names], batch, 4096, 0, workers=2), batch,
                                cpu_too=True)
        here, cpu_here = rate(batches(root, [(n, PER_SHARD) for n in names], batch, 4096, 0, workers=2), batch,
                              cpu_too=True)
        print(f"batch {batch}: from {url} {there:10,.0f} pairs/s, {cpu_there:.1f} CPU µs/pair; from local files "
              f"{here:10,.0f} pairs/s, {cpu_here:.1f} CPU µs/pair; ratio {there / here:.2f} (pairs/s), "
              f"{cpu_there / cpu_here:.2f} (CPU per pair; the S3 server's own CPU not counted)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--s3", metavar="URL", help="compare streaming from this s3:// prefix with local files")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    names = shards(root, rng)
    if args.s3:
        versus_s3(root, names, args.s3)
    else:
        versus_npz(root, names, rng)
    shutil.rmtree(root)
