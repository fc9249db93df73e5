"""The pair stream: each pair once per epoch, batches independent of how readers are spread over ranks, and a
resume that starts exactly where the uninterrupted stream was."""

import itertools
from collections import Counter

import numpy as np
import pytest

from kdm_pipe.config import ConfigError
from kdm_pipe.loader import PairStream, batches
from kdm_pipe.shards import write_shard

SIZES = [97, 80, 103, 90, 64]          # unequal shards and records that do not divide the batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    out, start = [], 0
    for k, n in enumerate(SIZES):
        seeds = np.arange(start, start + n)
        recs = [{"x_T": np.stack([s, -s]).T.astype(np.float32), "x_0": s[:, None].astype(np.float32), "seed": s}
                for s in np.array_split(seeds, 3)]
        write_shard(root / f"s{k}.tar", recs)
        out.append((f"s{k}.tar", n))
        start += n
    return root, out


def seeds_of(stream, steps):
    return [b["seed"].numpy().tolist() for b in itertools.islice(stream, steps)]


@pytest.mark.parametrize("micro", [16, 128])         # 128: larger than every shard
def test_every_pair_once_per_epoch(shards, micro):
    root, names = shards
    plan = list(itertools.islice(PairStream(names, micro, 40, 0).plan(0, 1), 3))
    steps = sum(ep.batches for ep in plan)
    got = seeds_of(batches(root, names, micro, 40, seed=0, workers=0), steps)
    assert all(len(b) == micro for b in got)
    first = Counter(itertools.chain(*got[: plan[0].batches]))
    assert max(first.values()) == 1 and len(first) == sum(SIZES) - plan[0].tail
    counts = Counter(itertools.chain(*got))
    assert len(counts) == sum(SIZES)
    # three epochs: every pair three times, except the last epoch's carried tail (emitted early in epoch 4)
    assert sorted(Counter(counts.values()).items()) == [(2, plan[2].tail), (3, sum(SIZES) - plan[2].tail)]


@pytest.mark.parametrize("start", [1, 7, 24, 40])
def test_resume_starts_where_the_stream_was(shards, start):
    root, names = shards
    full = seeds_of(batches(root, names, 16, 40, seed=3, workers=0), start + 12)
    resumed = seeds_of(batches(root, names, 16, 40, seed=3, workers=0, start=start), 12)
    assert resumed == full[start:]


def test_global_batch_does_not_depend_on_how_readers_are_spread(shards):
    root, names = shards
    one_rank = seeds_of(batches(root, names, 32, 40, seed=1, workers=2), 15)
    ranks = [seeds_of(batches(root, names, 32, 40, seed=1, workers=0, rank=r, world=2), 15) for r in (0, 1)]
    assert one_rank == [a + b for a, b in zip(*ranks)]
    assert len(set(one_rank[0])) == 32


def test_refusals(shards):
    root, names = shards
    with pytest.raises(ConfigError, match="divide evenly"):
        batches(root, names, 33, 40, seed=0, workers=2)
    with pytest.raises(ConfigError, match="cannot feed"):
        batches(root, names[:1], 32, 40, seed=0, workers=2)


@pytest.mark.parametrize("batch,workers", [(128, 0), (512, 2)])
def test_any_batch_with_any_shard_size(shards, batch, workers):
    """Micro-batches larger than every shard (the carry then spans shards, even epochs), still each pair once per
    epoch, resumable anywhere and independent of how the readers are spread."""
    root, names = shards
    readers = max(workers, 1)
    plans = [list(itertools.islice(PairStream(names, batch // readers, 40, 5).plan(p, readers), 8))
             for p in range(readers)]
    assert any(ep.batches == 0 for plan in plans for ep in plan) or batch == 128
    steps = 9
    full = seeds_of(batches(root, names, batch, 40, seed=5, workers=workers), steps)
    assert all(len(b) == batch for b in full)
    for p, plan in enumerate(plans):                 # reader p's pairs, epoch by epoch, each exactly once
        micro = batch // readers
        mine = list(itertools.chain(*(b[p * micro:(p + 1) * micro] for b in full)))
        first = plan[0].batches * micro
        assert len(set(mine[:first])) == first
    for start in (1, 4, 7):
        resumed = batches(root, names, batch, 40, seed=5, workers=workers, start=start)
        assert seeds_of(resumed, 2) == full[start:start + 2]
    if workers:
        ranks = [seeds_of(batches(root, names, batch, 40, seed=5, workers=0, rank=r, world=2), steps) for r in (0, 1)]
        assert full == [a + b for a, b in zip(*ranks)]


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_held_by_the_trainer_never_change(shards, workers):
    """Workers refill their shared-memory slots once the trainer has taken its batch: a batch kept for many steps
    (long after its slot was reused several times) must still hold its own pairs, each x_0 with its seed."""
    root, names = shards
    stream = batches(root, names, 32, 40, seed=2, workers=workers)
    try:
        held = list(itertools.islice(stream, 200))            # 6,400 pairs: every slot of every worker reused
    finally:
        stream.close()
    ranks = [seeds_of(batches(root, names, 32, 40, seed=2, workers=0, rank=r, world=workers), 200)
             for r in range(workers)]
    assert [b["seed"].tolist() for b in held] == [sum(parts, []) for parts in zip(*ranks)]
    assert all(np.array_equal(b["x_0"][:, 0].numpy(), b["seed"].numpy()) for b in held)


def test_close_frees_a_worker_waiting_for_a_slot(shards, monkeypatch):
    """With one slot per worker, each worker waits for its slot as soon as it is asked for a second item; closing the
    stream must let it go at once, even when the trainer is descheduled between freeing the slots and telling the
    workers to stop (a worker then takes its next prefetch request and waits again, deaf to the DataLoader's SIGTERM:
    the interpreter hung at exit)."""
    import os
    import signal
    import threading
    import time

    from kdm_pipe import loader

    class OneSlot(loader.Slots):
        def __init__(self, workers: int, count: int) -> None:
            super().__init__(workers, 1)

    monkeypatch.setattr(loader, "Slots", OneSlot)
    root, names = shards
    stream = batches(root, names, 32, 40, seed=0, workers=2)
    first = [b["seed"].tolist() for b in itertools.islice(stream, 40)]       # slots freed and refilled: no deadlock
    workers = list(stream._it._workers)
    shutdown = stream._it._shutdown_workers
    stream._it._shutdown_workers = lambda: (time.sleep(1.0), shutdown())   # the trainer descheduled mid-close
    time.sleep(0.5)                                                           # both workers now wait for a slot
    closing = threading.Thread(target=stream.close, daemon=True)
    closing.start()
    closing.join(timeout=4)
    alive = [w.pid for w in workers if w.is_alive()]
    for pid in alive:                                                         # they ignore SIGTERM
        os.kill(pid, signal.SIGKILL)
    assert not closing.is_alive() and not alive, f"close() left workers {alive} waiting for a slot"
    monkeypatch.undo()
    assert first == seeds_of(batches(root, names, 32, 40, seed=0, workers=2), 40)


def test_a_dropped_stream_lets_the_interpreter_exit(shards, tmp_path):
    """A stream never closed, its workers waiting for slots the trainer holds: the process must still exit."""
    root, names = shards
    script = tmp_path / "drop.py"
    script.write_text(
        "import itertools, sys\n"
        "from kdm_pipe import loader\n"
        "class OneSlot(loader.Slots):\n"
        "    def __init__(self, workers, count):\n"
        "        super().__init__(workers, 1)\n"
        "loader.Slots = OneSlot\n"
        f"stream = loader.batches({str(root)!r}, {names!r}, 32, 40, seed=0, workers=2)\n"
        "held = list(itertools.islice(stream, 3))\n"
        "print('ok')\n")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
