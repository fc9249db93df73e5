"""Streaming pairs from tar shards with WebDataset: shard shuffling, disjoint shards per rank × loader worker,
a shuffle buffer, fixed-size batches.

The stream is endless and deterministic: epoch e visits the shards in permutation(seed, e), rank r / worker w
reads every (world·workers)-th of them, and a per-(seed, rank, worker) generator shuffles the buffer. Within an
epoch every pair is seen exactly once across all ranks and workers; what is left in the buffer at the end of an
epoch carries over into the next, so no pair is dropped. The same (seed, world, workers) gives the same batches.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

FIELDS = ("x_T", "x_0", "label", "seed")


def _decode(sample: dict) -> dict[str, np.ndarray]:
    # WebDataset lower-cases member suffixes: x_T.npy arrives as x_t.npy.
    return {f: np.load(io.BytesIO(sample[k]), allow_pickle=False) for f in FIELDS if (k := f"{f.lower()}.npy") in sample}


class PairStream(IterableDataset):
    def __init__(self, urls: list[str], batch: int, buffer: int, seed: int, rank: int = 0, world: int = 1):
        self.urls, self.batch, self.buffer, self.seed, self.rank, self.world = urls, batch, buffer, seed, rank, world

    def _records(self, rng_epoch: int, part: int, parts: int) -> Iterator[dict[str, np.ndarray]]:
        order = np.random.default_rng([self.seed, rng_epoch]).permutation(len(self.urls))
        mine = [self.urls[i] for i in order[part::parts]]
        # Splitting is done above (by rank and worker together), so WebDataset must not split again.
        ds = wds.WebDataset(mine, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        for sample in ds:
            yield _decode(sample)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        parts, part = self.world * nw, self.rank * nw + wid
        if len(self.urls) < parts:
            raise ValueError(f"{len(self.urls)} shards cannot feed {parts} readers (ranks × loader workers)")
        rng = np.random.default_rng([self.seed, self.rank, wid, 1])
        held: list[dict[str, np.ndarray]] = []
        size, epoch = 0, 0
        while True:
            for rec in self._records(epoch, part, parts):
                held.append(rec)
                size += len(rec["x_0"])
                if size < 2 * self.buffer + self.batch:   # refill to 2× buffer: each shuffle copies O(1) per pair out
                    continue
                pool = {f: np.concatenate([r[f] for r in held]) for f in held[0]}
                perm = rng.permutation(size)
                pool = {f: a[perm] for f, a in pool.items()}
                cut = size - (size - self.buffer) // self.batch * self.batch   # emit whole batches, keep ≥ buffer
                for b in range(cut, size, self.batch):
                    yield {f: torch.from_numpy(a[b:b + self.batch]) for f, a in pool.items()}
                held, size = [{f: a[:cut] for f, a in pool.items()}], cut
            epoch += 1


def loader(directory: Path, shard_names: list[str], batch: int, buffer: int, seed: int, workers: int,
           rank: int = 0, world: int = 1) -> DataLoader:
    urls = [str(Path(directory) / n) for n in shard_names]
    stream = PairStream(urls, batch, buffer, seed, rank, world)
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)
