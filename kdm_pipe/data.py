"""Streaming pairs from tar shards with WebDataset: shard shuffling, disjoint readers, a shuffle buffer, batches
that do not depend on how the readers are spread over ranks, and a fast exact resume.

Readers. P = ranks × loader workers readers each stream a disjoint part of the shards: in epoch e reader p reads
permutation(seed, e)[p::P]. Every reader yields micro-batches of batch/P pairs; a rank's step batch is its workers'
micro-batches concatenated (DataLoader returns workers in turn), so the global batch of a step is the same for
1 rank × 2 workers as for 2 ranks × 1 worker.

Epochs. Reader p's epoch e holds c_e carried pairs plus its shards' pairs; it emits ⌊total/m⌋ micro-batches of m
pairs through a shuffle buffer that is flushed at the end of the epoch, and carries the last `total mod m` pairs of
its last shard into epoch e+1. So every pair is seen exactly once per epoch (a carried pair once, early in the
next), and the stream's state at an epoch boundary is known from the manifest's pair counts alone: resuming at
step k replays only the current epoch, not the whole run.
"""

from __future__ import annotations

import io
import itertools
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdm_pipe.errors import ConfigError, DataError, one_line

FIELDS = ("x_T", "x_0", "label", "seed")
Block = dict[str, np.ndarray]


def _decode(sample: dict) -> Block:
    # WebDataset lower-cases member suffixes: x_T.npy arrives as x_t.npy.
    return {f: np.load(io.BytesIO(sample[k]), allow_pickle=False) for f in FIELDS if (k := f"{f.lower()}.npy") in sample}


def _records(url: str) -> Iterator[Block]:
    """One shard's records; a structural error (truncated tar, bad member) becomes a DataError naming the shard."""
    # Splitting by reader is done here, so WebDataset must not split or shuffle again.
    ds = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    try:
        for sample in ds:
            block = _decode(sample)
            sizes = {len(block.get(f, ())) for f in ("x_T", "x_0", "seed")} | {len(a) for a in block.values()}
            if len(sizes) != 1 or 0 in sizes:
                raise ValueError(f"record {sample.get('__key__')} lacks fields or has unequal lengths")
            yield block
    except (tarfile.TarError, OSError, ValueError, EOFError, KeyError) as e:
        what = str(e.args[0]).split(" @ <")[0] if isinstance(e, tarfile.TarError) and e.args else e
        raise DataError(f"shard {url} is unreadable ({what}); `kdm-pipe verify {Path(url).parent}` lists every bad "
                        f"shard, and rerunning the command that wrote the pairs (generate or import) repairs them") from e


def _cat(blocks: list[Block]) -> Block:
    return {f: np.concatenate([b[f] for b in blocks]) for f in blocks[0]}


def _take(block: Block, sl: slice) -> Block:
    return {f: a[sl] for f, a in block.items()}


@dataclass(frozen=True)
class Failure:
    """An exception raised in a reader, carried to the trainer as a stream item and raised there as one line."""
    message: str
    data: bool                         # corrupt data (DataError, exit 1 naming the shard) rather than a bug


@dataclass(frozen=True)
class Epoch:
    index: int
    shards: list[tuple[str, int]]      # (url, pairs) in reading order
    carried: int                       # pairs carried in from the previous epoch
    batches: int                       # micro-batches emitted
    tail: int                          # pairs of the last shard carried out to the next epoch


class PairStream(IterableDataset):
    def __init__(self, shards: list[tuple[str, int]], micro: int, buffer: int, seed: int, rank: int = 0,
                 world: int = 1, start: int = 0):
        self.shards, self.micro, self.buffer, self.seed = shards, micro, buffer, seed
        self.rank, self.world, self.start = rank, world, start

    def plan(self, part: int, parts: int) -> Iterator[Epoch]:
        carried = 0
        for e in itertools.count():
            order = np.random.default_rng([self.seed, e]).permutation(len(self.shards))
            mine = [self.shards[i] for i in order[part::parts]]
            batches, tail = divmod(carried + sum(n for _, n in mine), self.micro)
            yield Epoch(e, mine, carried, batches, tail)
            carried = tail

    def _epoch(self, ep: Epoch, carry: Block | None, rng: np.random.Generator) -> Iterator[Block | tuple[str, Block]]:
        """The epoch's micro-batches, then ("tail", pairs carried out)."""
        held, size = ([carry], len(carry["x_0"])) if carry else ([], 0)
        last_url, last_n = ep.shards[-1]
        seen_last, tail = 0, []
        for i, url in enumerate(u for u, _ in ep.shards):
            for rec in _records(url):
                if i == len(ep.shards) - 1:        # hold back the last `tail` pairs of the epoch
                    n, cut = len(rec["x_0"]), max(0, last_n - ep.tail - seen_last)
                    seen_last += n
                    if cut < n:
                        tail.append(_take(rec, slice(cut, None)))
                        rec = _take(rec, slice(0, cut))
                held.append(rec)
                size += len(rec["x_0"])
                if size >= 2 * self.buffer + self.micro:   # refill to 2× buffer: each shuffle moves O(1) per pair
                    pool = _cat(held)
                    pool = _take(pool, rng.permutation(size))
                    keep = size - (size - self.buffer) // self.micro * self.micro
                    yield from (_take(pool, slice(b, b + self.micro)) for b in range(keep, size, self.micro))
                    held, size = [_take(pool, slice(0, keep))], keep
        if size:                                    # flush: `size` is a whole number of micro-batches by construction
            pool = _take(_cat(held), rng.permutation(size))
            yield from (_take(pool, slice(b, b + self.micro)) for b in range(0, size, self.micro))
        yield "tail", (_cat(tail) if tail else None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | Failure]:
        # A loader worker's exception would reach the trainer wrapped in a multi-line traceback: pass it as an item.
        try:
            yield from self._stream()
        except DataError as e:
            yield Failure(one_line(str(e)), data=True)
        except Exception as e:  # noqa: BLE001
            yield Failure(f"loader: {type(e).__name__}: {one_line(str(e))}", data=False)

    def _stream(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        parts, part = self.world * nw, self.rank * nw + wid
        skip, carry, prev = self.start, None, None
        for ep in self.plan(part, parts):
            if skip >= ep.batches:                  # fast-forward whole epochs by arithmetic
                skip -= ep.batches
                prev = ep
                continue
            if prev is not None and carry is None and ep.carried:   # resuming: re-read the carried pairs
                url, n = prev.shards[-1]
                carry = _take(_cat(list(_records(url))), slice(n - ep.carried, n))
            rng = np.random.default_rng([self.seed, part, ep.index, 1])
            for out in self._epoch(ep, carry, rng):
                if isinstance(out, tuple):
                    carry = out[1]
                elif skip:
                    skip -= 1
                else:
                    yield {f: torch.from_numpy(a) for f, a in out.items()}
            prev = ep


def batches(directory: Path, shards: list[tuple[str, int]], batch: int, buffer: int, seed: int, workers: int,
            rank: int = 0, world: int = 1, start: int = 0) -> "Loader":
    """This rank's endless stream of step batches (batch/world pairs each), beginning after `start` steps.

    `shards` are (file name, pairs) pairs; `buffer` is the shuffle buffer of each reader. Close the result (in a
    `finally`) to stop its worker processes: a live persistent worker keeps the interpreter from exiting.
    """
    readers = world * max(workers, 1)
    if batch % readers:
        raise ConfigError(f"batch {batch} must divide evenly among {readers} readers (ranks × loader workers)")
    micro = batch // readers
    if len(shards) < readers:
        raise ConfigError(f"{len(shards)} training shards cannot feed {readers} readers (ranks × loader workers); "
                          f"lower --loader-workers or generate more shards")
    if min(n for _, n in shards) < micro:
        raise ConfigError(f"shards of {min(n for _, n in shards)} pairs are smaller than a reader's micro-batch "
                          f"({micro}); lower --batch or generate larger shards")
    stream = PairStream([(str(Path(directory) / u), n) for u, n in shards], micro, buffer, seed, rank, world, start)
    # Its own generator: the DataLoader draws its worker seeds from it, not from the global RNG that dropout uses
    # (those draws came after a resume's RNG restore and shifted every later dropout mask).
    dl = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                    prefetch_factor=4 if workers else None, worker_init_fn=_ignore_sigterm if workers else None,
                    generator=torch.Generator().manual_seed(seed))
    return Loader(iter(dl), max(workers, 1))


def _ignore_sigterm(_: int) -> None:
    # Schedulers send SIGTERM to every process of a job; the trainer finishes its step and checkpoints, so its
    # loader workers must keep serving until it shuts them down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loader:
    """Step batches from the DataLoader's micro-batches (one per worker, in turn); reader failures raised here."""

    def __init__(self, micro_batches: Iterator, per_step: int) -> None:
        self._it, self.per_step = micro_batches, per_step

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        parts = []
        for _ in range(self.per_step):
            item = next(self._it)
            if isinstance(item, Failure):
                raise (DataError if item.data else RuntimeError)(item.message)
            parts.append(item)
        return parts[0] if self.per_step == 1 else {f: torch.cat([p[f] for p in parts]) for f in parts[0]}

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)     # multiprocess iterators only
        if shutdown is not None:
            shutdown()
