"""Start-up of the command line: `kdm-pipe --help` as a whole process (start to exit), now ÷ before the options were
generated from the config models and the configs stopped importing torch (issue 22 item 2; goal: ≤ 1 s on a quiet
machine, where it took 3.6 s before).

    python bench/cli_startup.py [--runs 8] [--before 2c5218a]

"Before" is the `kdm_pipe/`, `stages/` and `manifests/` of commit --before (git archive into a temp dir) put first
on PYTHONPATH, with the same interpreter and packages. The two are run in turn (now, before, now, …) and the ratio
is taken pair by pair, so a change of the machine's load hits both sides of a pair alike.

Prints the median and range over the runs of the ratios now ÷ before of wall time, CPU time (user + system of the
process) and peak memory, the medians of each side, whether `import kdm_pipe.cli` imports torch, and the load
average before and after. Feeds docs/BENCHMARKS.md, section "Start-up of the command line".
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KDM_PIPE = Path(sys.executable).with_name("kdm-pipe")


def one(env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak MiB) of one `kdm-pipe --help`."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(KDM_PIPE), "--help"], env=env, stdout=subprocess.DEVNULL, cwd="/")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"error: kdm-pipe --help exited {proc.returncode} ({'before' if 'PYTHONPATH' in env else 'now'})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def summary(name: str, ratios: list[float]) -> str:
    return f"{name:<12} {statistics.median(ratios):.3f} ({min(ratios):.3f} … {max(ratios):.3f})"


def main(runs: int, before: str) -> None:
    tree = Path(tempfile.mkdtemp(prefix="kdm-before-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", before, "kdm_pipe", "stages", "manifests"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        now_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        before_env = {**now_env, "PYTHONPATH": str(tree)}
        where = subprocess.run([sys.executable, "-c", "import kdm_pipe; print(kdm_pipe.__file__)"], env=before_env,
                               capture_output=True, text=True, check=True, cwd="/").stdout.strip()
        assert where.startswith(str(tree)), f"the before tree is not the one imported: {where}"
        print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
        now, old = [], []
        for _ in range(runs):
            now.append(one(now_env))
            old.append(one(before_env))
        for i, name in enumerate(("wall", "CPU", "peak memory")):
            print(summary(name, [a[i] / b[i] for a, b in zip(now, old)]) +
                  f"   medians: now {statistics.median(a[i] for a in now):.3f}, "
                  f"before {statistics.median(b[i] for b in old):.3f} {'MiB' if i == 2 else 's'}")
        torch = subprocess.run([sys.executable, "-c", "import sys, kdm_pipe.cli; print('torch' in sys.modules)"],
                               env=now_env, capture_output=True, text=True, check=True, cwd="/").stdout.strip()
        print(f"import kdm_pipe.cli imports torch: {torch}")
        print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    finally:
        shutil.rmtree(tree)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=8, help="pairs of runs (now, before)")
    ap.add_argument("--before", default="2c5218a", help="the commit to compare with (default: before issue 22's "
                    "generated options and torch-free configs)")
    args = ap.parse_args()
    main(args.runs, args.before)
