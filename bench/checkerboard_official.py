"""The official 2-D configuration (`checkerboard` preset) for a stated fraction of its 20,001 iterations, once per MLP
variant (`student.mlp`: official | linear-head), on the same pairs: generate → train → evaluate through the CLI.

    nice -n 5 .venv/bin/python bench/checkerboard_official.py --out runs/bench-cb --steps 1000

Prints, per variant, the CPU seconds of training (user + sys of the train process and its loader worker), and the
metrics of evaluate on the report split (sliced Wasserstein, MMD, off-support fraction, paired MSE against the
held-out teacher pairs) for both the EMA and the raw weights, with the weights the run chose.

Feeds docs/BENCHMARKS.md, section "The official 2-D configuration, both MLP variants".
"""

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "kdm_pipe.cli"]
VARIANTS = ("official", "linear-head")
METRICS = ("sliced_wasserstein", "mmd", "off_support", "mse")


def cpu_of(cmd: list[str]) -> float:
    """Run `cmd`; the CPU seconds (user + sys) it and its children used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1000, help="of the official 20,001")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    pairs = args.out / "pairs"
    if not (pairs / "manifest.json").is_file():
        subprocess.run(CLI + ["generate", "--preset", "checkerboard", "--out", str(pairs), "--quiet"], check=True)
    rows = {}
    for v in VARIANTS:
        run = args.out / v
        cpu = None
        if not (run / "config.json").is_file():
            cpu = cpu_of(CLI + ["train", "--preset", "checkerboard", "--data", str(pairs), "--out", str(run),
                                "--mlp", v, "--steps", str(args.steps), "--threads", str(args.threads),
                                "--device", "cpu", "--quiet"])
        subprocess.run(CLI + ["evaluate", str(run), "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
        rows[v] = (cpu, json.loads((run / "eval.json").read_text()))
    print(f"checkerboard preset, {args.steps} of 20,001 iterations ({100 * args.steps / 20001:.1f}%), batch 4096")
    print("variant      weights  chosen  " + "  ".join(f"{m:>18}" for m in METRICS) + "  train CPU s")
    floor = next(iter(rows.values()))[1]["teacher_floor"]
    for v, (cpu, res) in rows.items():
        for w, m in res["by_weights"].items():
            print(f"{v:<12} {w:<8} {'*' if w == res['weights'] else ' ':<7} "
                  + "  ".join(f"{m.get(k, float('nan')):>18.4g}" for k in METRICS)
                  + (f"  {cpu:,.0f}" if cpu is not None and w == res["weights"] else ""))
    print(f"{'teacher floor':<29} " + "  ".join(f"{floor.get(k, float('nan')):>18.4g}" for k in METRICS))
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
