"""Peak memory of `train`, `stats` and `verify` on 1M checkerboard pairs ÷ on 10k (issue 12; goal ≤ 1.1 each):
memory must not grow with the size of the pair set.

    .venv/bin/python bench/memory.py [--steps 300] [--big 1000000]

Each command runs as the real CLI in a subprocess; its memory is the peak, over 20 ms samples, of the summed RSS of
the command's whole process tree (loader workers, the local Ray cluster and its workers included). Shared pages
are counted once per process that maps them, the same way for both sizes.

Below `IN_PROCESS_PAIRS` pairs `stats` works in its own process and starts no Ray cluster, so at 10k pairs it
is measured without the cluster's processes that it carries at 1M; its ratio is therefore taken against a set just
above the threshold (10,000 pairs more, Ray as at 1M), and the 10k figure is printed beside it.

Prints, per command, the peak MiB at each size and their ratio. Feeds docs/BENCHMARKS.md, section "memory: 1M
pairs ÷ 10k pairs".
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kdm_pipe.stats_update import IN_PROCESS_PAIRS

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Summed RSS (bytes) of `root` and all its descendants."""
    parent, rss = {}, {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(p)], rss[int(p)] = int(fields[1]), int(fields[21]) * PAGE
            except (OSError, IndexError):
                continue
    mine, todo = set(), [root]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo += [c for c, pp in parent.items() if pp == pid and c not in mine]
    return sum(rss.get(p, 0) for p in mine)


def peak(*args: str) -> tuple[int, float]:
    """(peak tree RSS in bytes, seconds) of `kdm-pipe ARGS`."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kdm_pipe.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    high, done = 0, threading.Event()

    def sample():
        nonlocal high
        while not done.is_set():
            high = max(high, tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"kdm-pipe {' '.join(args)} failed:\n{err}")
    return high, time.perf_counter() - t


def pairs(root: Path, n: int) -> Path:
    out = root / f"pairs-{n}"
    shards = 10 if n <= 100_000 else 100
    subprocess.run([sys.executable, "-m", "kdm_pipe.cli", "generate", "--teacher", "checkerboard", "--shards",
                    str(shards), "--pairs-per-shard", str(n // shards), "--batch", "1000", "--out", str(out)],
                   env=ENV, check=True, stdout=subprocess.DEVNULL)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--big", type=int, default=1_000_000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    try:
        ray_floor = IN_PROCESS_PAIRS + 10_000
        sets = {n: pairs(root, n) for n in (args.small, ray_floor, args.big)}
        print(f"load average {os.getloadavg()[0]:.2f}")
        commands = {
            "train": lambda d, n: ("train", "--preset", "checkerboard-quick", "--data", d, "--out",
                                   root / f"run-{n}", "--steps", args.steps),
            "stats": lambda d, n: ("stats", d),
            "verify": lambda d, n: ("verify", d),
        }
        for name, command in commands.items():
            sizes = (args.small, ray_floor, args.big) if name == "stats" else (args.small, args.big)
            measured = {n: peak(*map(str, command(sets[n], n))) for n in sizes}
            print(f"{name:6s}: " + "; ".join(f"{n:,} pairs {m / 2**20:8,.0f} MiB ({t:.0f} s)"
                                             for n, (m, t) in measured.items())
                  + f"; ratio {measured[args.big][0] / measured[sizes[-2]][0]:.2f} (goal ≤ 1.1)")
    finally:
        shutil.rmtree(root)
