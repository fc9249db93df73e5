"""Loader pairs/s for CIFAR-shaped pairs (3×32×32; x_T float32, x_0 float16, 250 pairs per record) streamed from
tar shards ÷ a folder of one float64 .npz per pair read with np.load in a DataLoader (the official KDM layout);
both with 2 loader workers, at batch 128 and 512. Also bytes per pair ÷ the official npz."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdm_pipe.data import batches
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


def rate(batches, batch: int) -> float:
    it = iter(batches)
    next(it)                                          # workers started
    t = time.perf_counter()
    n = BATCHES * BATCH // batch
    for _ in range(n):
        next(it)
    rate = n * batch / (time.perf_counter() - t)
    getattr(batches, "close", lambda: None)()
    return rate


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    names = []
    for k in range(N // PER_SHARD):
        recs = []
        for r in range(PER_SHARD // REC):
            seeds = np.arange(k * PER_SHARD + r * REC, k * PER_SHARD + (r + 1) * REC)
            recs.append({"x_T": (80 * rng.standard_normal((REC, 3, 32, 32))).astype(np.float32),
                         "x_0": rng.uniform(-1, 1, (REC, 3, 32, 32)).astype(np.float16), "seed": seeds})
        names.append(f"shard-{k:06d}.tar")
        write_shard(root / names[-1], recs)
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
    shutil.rmtree(root)
