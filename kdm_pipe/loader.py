"""Streaming pairs from tar shards: shard shuffling, disjoint readers, a shuffle buffer, batches that do not depend
on how the readers are spread over ranks, any batch size with any shard size, and a fast exact resume.

Shards are WebDataset tars; they are read with `shards.read_shard` (one read per member straight into its array, checked
against the file's size: several times WebDataset's streaming reader here; a damaged shard is one DataError naming it).

Readers. P = ranks × loader workers readers each stream a disjoint part of the shards: in epoch e reader p reads
permutation(seed, e)[p::P]. Every reader emits micro-batches of m = batch/P pairs; a rank's step batch is the next
micro-batch of each of its readers, concatenated, so the global batch of a step is the same for 1 rank × 2 workers
as for 2 ranks × 1 worker. A loader worker sends its micro-batches in groups of about ITEM_PAIRS pairs, written
straight into a ring of shared-memory slots it reuses (`Slots`): creating a segment per item cost more than reading.

Epochs. Reader p's epoch e holds c_e carried pairs plus its shards' pairs; it emits ⌊total/m⌋ micro-batches
through a shuffle buffer (SlotPool) that is flushed at the end of the epoch, and carries the last `total mod m`
pairs of its reading order into epoch e+1 (they may span several shards, or epochs when shards are smaller than m).
So every pair is seen exactly once per epoch (a carried pair once, early in the next), and the stream's state at
an epoch boundary is known from the manifest's pair counts alone: resuming at step k replays only the current
epoch, not the whole run.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import signal
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdm_pipe import storage
from kdm_pipe.background import die_with_parent
from kdm_pipe.errors import ConfigError, DataError, one_line
from kdm_pipe.shards import read_shard

ITEM_PAIRS = 512
PREFETCH = 2                           # items in flight per loader worker
Block = dict[str, np.ndarray]


def _cat(blocks: list[Block]) -> Block:
    return blocks[0] if len(blocks) == 1 else {f: np.concatenate([b[f] for b in blocks]) for f in blocks[0]}


def _take(block: Block, sl: slice) -> Block:
    return {f: a[sl] for f, a in block.items()}


def _len(block: Block) -> int:
    return len(block["x_0"])


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
    tail: int                          # last pairs of the epoch's reading order, carried out to the next epoch


class SlotPool:
    """The shuffle buffer: `size` slots; an arriving pair takes a random slot and that slot's pair leaves. Each
    pair is copied twice (in, out) whatever the buffer size; the rest leaves in random order when drained."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng, self.n, self.slots = size, rng, 0, None

    def push(self, block: Block) -> Iterator[tuple[Block, np.ndarray]]:
        """(source, row indices) of the pairs that leave, in order; the caller copies them out before the next."""
        if self.slots is None:
            self.slots = {f: np.empty((self.size, *a.shape[1:]), a.dtype) for f, a in block.items()}
        fill = min(_len(block), self.size - self.n)
        for f, a in block.items():
            self.slots[f][self.n:self.n + fill] = a[:fill]
        self.n += fill
        for b in range(fill, _len(block), self.size):
            incoming = _take(block, slice(b, b + self.size))
            idx = self.rng.choice(self.size, _len(incoming), replace=False)
            yield self.slots, idx
            for f, a in incoming.items():
                self.slots[f][idx] = a

    def drain(self) -> tuple[Block, np.ndarray]:
        idx, self.n = self.rng.permutation(self.n), 0
        return self.slots, idx


class Slots:
    """A ring of `count` items in shared memory per loader worker, allocated once and reused. A fresh segment per
    item was created, zero-filled and faulted in on both sides of the transfer: half of a worker's time. The
    trainer returns a slot (`free`) once it has copied its last micro-batch out; a worker takes one (`take`) before
    filling it, so a slot is never written while the trainer still reads it. count = the items a worker can have
    in flight (prefetch) + the one the trainer holds + the one being filled."""

    def __init__(self, workers: int, count: int) -> None:
        ctx = torch.multiprocessing.get_context()
        self.count, self.free_slots = count, [ctx.Semaphore(count) for _ in range(workers)]
        self.closed = ctx.Event()

    def take(self, worker: int) -> None:
        parent = os.getppid()
        while not self.free_slots[worker].acquire(timeout=1.0):
            if os.getppid() != parent:          # the trainer died: do not wait for a slot forever
                raise SystemExit(0)
        # A worker may already be filling the next prefetch request when the trainer shuts it down; it would take
        # every freed slot and wait again, deaf to the SIGTERM the DataLoader sends: leave instead.
        if self.closed.is_set():
            raise SystemExit(0)

    def free(self, worker: int, times: int = 1) -> None:
        for _ in range(times):
            self.free_slots[worker].release()

    def close(self) -> None:
        """Lets every worker waiting for a slot, now or later, leave."""
        self.closed.set()
        for worker in range(len(self.free_slots)):
            self.free(worker)


class Batcher:
    """Packs leaving pairs into items of `group` micro-batches (the unit that crosses to the trainer process),
    dropping the first `skip` pairs (a resume). Inside a loader worker, items are the worker's shared-memory slots,
    written in place, so the DataLoader sends only their handles."""

    def __init__(self, size: int, skip: int, slots: Slots | None = None, worker: int = 0) -> None:
        self.size, self.skip, self.item, self.pos = size, skip, None, 0
        self.slots, self.worker, self.ring, self.turn = slots, worker, [], 0

    def _empty(self, source: Block) -> dict[str, torch.Tensor]:
        return {f: torch.empty((self.size, *a.shape[1:]), dtype=torch.from_numpy(a[:0]).dtype)
                for f, a in source.items()}

    def _next_item(self, source: Block) -> dict[str, torch.Tensor]:
        if self.slots is None:
            return self._empty(source)
        self.slots.take(self.worker)
        if len(self.ring) < self.slots.count:
            self.ring.append({f: t.share_memory_() for f, t in self._empty(source).items()})
        item, self.turn = self.ring[self.turn], (self.turn + 1) % self.slots.count
        return item

    def put(self, source: Block, idx: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        drop = min(self.skip, len(idx))
        self.skip -= drop
        idx = idx[drop:]
        while len(idx):
            if self.item is None:
                self.item = self._next_item(source)
            k = min(len(idx), self.size - self.pos)
            for f, a in source.items():
                np.take(a, idx[:k], axis=0, out=self.item[f][self.pos:self.pos + k].numpy())
            self.pos, idx = self.pos + k, idx[k:]
            if self.pos == self.size:
                yield self.item
                self.item, self.pos = None, 0


class PairStream(IterableDataset):
    def __init__(self, shards: list[tuple[str, int]], micro: int, buffer: int, seed: int, rank: int = 0,
                 world: int = 1, start: int = 0, group: int = 1, slots: Slots | None = None,
                 read: Callable = read_shard, fields: frozenset[str] | None = None):
        self.shards, self.micro, self.buffer, self.seed = shards, micro, buffer, seed
        self.rank, self.world, self.start, self.group = rank, world, start, group
        self.slots, self.read, self.fields = slots, read, fields

    def _read(self, url: str) -> Iterator[Block]:
        # Dropped as they are read: a field kept is copied into the shuffle buffer, the item and the batch.
        for rec in self.read(url):
            yield rec if self.fields is None else {f: a for f, a in rec.items() if f in self.fields}

    def plan(self, part: int, parts: int) -> Iterator[Epoch]:
        carried = 0
        for e in itertools.count():
            order = np.random.default_rng([self.seed, e]).permutation(len(self.shards))
            mine = [self.shards[i] for i in order[part::parts]]
            batches, tail = divmod(carried + sum(n for _, n in mine), self.micro)
            yield Epoch(e, mine, carried, batches, tail)
            carried = tail

    def _epoch(self, ep: Epoch, carry: Block | None, rng: np.random.Generator,
               out: Batcher) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's pairs through the shuffle buffer into `out`'s items; returns the pairs carried out."""
        pool, keep, seen, tail = SlotPool(self.buffer, rng), ep.batches * self.micro, 0, []
        reading = itertools.chain([carry] if carry else [], *(self._read(url) for url, _ in ep.shards))
        for block in reading:
            n = min(_len(block), keep - seen)
            if n < _len(block):                 # the epoch's last `tail` pairs wait for the next epoch
                tail.append(_take(block, slice(n, None)))
                block = _take(block, slice(0, n))
            seen += n
            for source, idx in pool.push(block) if n else ():
                yield from out.put(source, idx)
        if pool.n:
            yield from out.put(*pool.drain())
        return _cat(tail) if tail else None

    def _carry(self, history: list[Epoch]) -> Block | None:
        """The pairs carried into history[-1], re-read from the end of the epochs before it (a resume)."""
        need = history[-1].carried
        if not need:
            return None
        blocks, got = [], 0
        for url, n in reversed(history[-2].shards):
            blocks.insert(0, _cat(list(self._read(url))))
            got += n
            if got >= need:
                break
        if got < need:                              # shards smaller than a micro-batch: the carry spans epochs
            blocks.insert(0, self._carry(history[:-1]))
        pairs = _cat(blocks)
        return _take(pairs, slice(_len(pairs) - need, None))

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
        skip, history, carry, out = self.start, [], None, None
        depth = self.micro // min(n for _, n in self.shards) + 2     # epochs a carry can reach back over
        for ep in self.plan(part, parts):
            history = (history + [ep])[-depth:]
            if out is None:
                if skip >= ep.batches:              # fast-forward whole epochs by arithmetic
                    skip -= ep.batches
                    continue
                out = Batcher(self.group * self.micro, skip * self.micro, self.slots if info else None, wid)
                carry = self._carry(history) if len(history) > 1 else None
            rng = np.random.default_rng([self.seed, part, ep.index, 1])
            carry = yield from self._epoch(ep, carry, rng, out)


def batches(directory: Path, shards: list[tuple[str, int]], batch: int, buffer: int, seed: int, workers: int,
            rank: int = 0, world: int = 1, start: int = 0, read: Callable = read_shard,
            fields: frozenset[str] | None = None) -> "Loader":
    """This rank's endless stream of step batches (batch/world pairs each), beginning after `start` steps.

    `shards` are (file name, pairs) pairs, `read` reads one shard's records: with a memorisation filter,
    `Exclusions.read` and the kept counts. Batches hold the records' `fields` that the shards have (all of them
    when None). `buffer` is the shuffle buffer of each reader. Close the result (in a
    `finally`) to stop its worker processes: a live persistent worker keeps the interpreter from exiting.
    """
    readers = world * max(workers, 1)
    if batch % readers:
        raise ConfigError(f"batch {batch} must divide evenly among {readers} readers (ranks × loader workers)")
    micro = batch // readers
    if len(shards) < readers:
        raise ConfigError(f"{len(shards)} training shards cannot feed {readers} readers (ranks × loader workers); "
                          f"lower --loader-workers or generate more shards")
    # Micro-batches cross from a loader worker in groups of about ITEM_PAIRS pairs: per-item IPC costs dominated.
    group = max(1, ITEM_PAIRS // micro) if workers else 1
    slots = Slots(workers, PREFETCH + 2) if workers else None
    # Shards by URL string: a loader worker opens its own connection (an s3fs client is not fork-safe).
    where = storage.location(directory)
    stream = PairStream([(str(where / u), n) for u, n in shards], micro, buffer, seed, rank, world, start, group,
                        slots, read, fields)
    # Its own generator: the DataLoader draws its worker seeds from it, not from the global RNG that dropout uses
    # (those draws came after a resume's RNG restore and shifted every later dropout mask).
    dl = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                    prefetch_factor=PREFETCH if workers else None,
                    worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers else None,
                    generator=torch.Generator().manual_seed(seed))
    return Loader(iter(dl), max(workers, 1), micro, slots)


def loader_bytes(batch: int, buffer: int, workers: int, world: int, pair_bytes: int) -> int:
    """About the memory one rank's stream holds: each reader's shuffle buffer, the shared-memory slots of its
    workers (items of at least ITEM_PAIRS pairs), and the step batch as it is assembled (three copies)."""
    readers, micro = max(workers, 1), max(1, batch // (world * max(workers, 1)))
    slots = workers * (PREFETCH + 2) * max(micro, ITEM_PAIRS)
    return pair_bytes * (readers * buffer + slots + 3 * (batch // world))


def _worker_init(parent: int, _: int) -> None:
    # Schedulers send SIGTERM to every process of a job; the trainer finishes its step and checkpoints, so its
    # loader workers must keep serving until it shuts them down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # And a worker busy reading checks no parent: it would outlive a trainer killed any other way, holding its memory.
    die_with_parent(parent, signal.SIGKILL)


class Loader:
    """Step batches: the next micro-batch of each of this rank's readers, concatenated (a copy: a batch never aliases
    a worker's slot, which is refilled once returned). Readers send items of equal size (groups of micro-batches),
    so they run out together and the DataLoader's turn order is the one needed: item k comes from reader k mod R."""

    def __init__(self, items: Iterator, readers: int, micro: int, slots: Slots | None = None) -> None:
        self._it, self.micro, self.slots = items, micro, slots
        self.items: list[dict[str, torch.Tensor] | None] = [None] * readers
        self.pos = [0] * readers
        _OPEN.add(self)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        parts = []
        for r, item in enumerate(self.items):
            if item is None:
                item = next(self._it)
                if isinstance(item, Failure):
                    raise (DataError if item.data else RuntimeError)(item.message)
                self.items[r], self.pos[r] = item, 0
            parts.append({f: t[self.pos[r]:self.pos[r] + self.micro] for f, t in item.items()})
            self.pos[r] += self.micro
        batch = {f: torch.cat([p[f] for p in parts]) for f in parts[0]}
        for r, item in enumerate(self.items):
            if self.pos[r] == len(item["x_0"]):
                self.items[r] = None
                if self.slots is not None:
                    self.slots.free(r)
        return batch

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()
            self.slots = None
        shutdown = getattr(self._it, "_shutdown_workers", None)     # multiprocess iterators only
        if shutdown is not None:
            shutdown()
            # A worker still alive after the DataLoader's grace is stuck in a read (a stalled store) and ignores the
            # DataLoader's SIGTERM: multiprocessing's exit handler would wait for it forever.
            for worker in self._it._workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join()

    def __del__(self) -> None:
        self.close()


# Loader workers ignore SIGTERM, so multiprocessing's exit handler (terminate, then join) would wait forever for the
# workers of a stream nobody closed. This handler, registered after multiprocessing's, runs before it.
_OPEN: weakref.WeakSet[Loader] = weakref.WeakSet()
atexit.register(lambda: [loader.close() for loader in list(_OPEN)])
