"""Training steps/s beside a busy 2-thread job, ÷ steps/s without it, for several thread settings of the trainer.

The `digits` preset's student (a KDM or KD U-Net at 8 px, batch 64) trains on an existing pair set for a few
dozen steps in a fresh process per setting; the same is repeated with a 2-thread matmul loop running beside it.
Each setting's ratio (loaded ÷ alone) is measured minutes apart in one session, so it stays meaningful on a shared
machine where absolute times are not.

    python bench/train_under_load.py --data runs/demo/pairs [--steps 40] [--student kdm]

Prints, per setting, steps/s alone and beside the job and the slowdown, and the load average before and after.
Feeds docs/BENCHMARKS.md, section "Training beside other jobs".
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BURNER = ("import torch; torch.set_num_threads(2); a = torch.randn(2000, 2000)\n"
          "while True: a @ a")

TRAIN = """
import json, sys, time
from kdm_pipe.config import TrainConfig, build, load_preset
from kdm_pipe.training import train
t = load_preset("digits")["train"]
over = json.loads(sys.argv[1])
cfg = build(TrainConfig, t, over, where="train")
t0 = time.perf_counter()
train(cfg, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def steps_per_s(run: Path) -> float:
    """Mean steps/s of train.jsonl after its first row (the first interval includes start-up)."""
    rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["steps_per_s"] for r in rows[1:] if "steps_per_s" in r]
    return sum(rates) / len(rates)


def one(data: Path, steps: int, student: str, threads: int | None, env: dict, loaded: bool) -> float:
    burner = subprocess.Popen([sys.executable, "-c", BURNER]) if loaded else None
    try:
        time.sleep(2 if loaded else 0)
        with tempfile.TemporaryDirectory() as tmp:
            over = {"data": str(data), "out": f"{tmp}/run", "steps": steps, "log_every": 2, "ckpt_every": steps,
                    "probe_every": steps, "tensorboard": False, "student": {"kind": student}}
            if threads is not None:
                over["threads"] = threads
            subprocess.run([sys.executable, "-c", TRAIN, json.dumps(over)], check=True, env={**os.environ, **env},
                           stdout=subprocess.DEVNULL)
            return steps_per_s(Path(tmp) / "run")
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--student", default="kdm")
    ap.add_argument("--alone-only", action="store_true", help="no run beside the 2-thread job")
    ap.add_argument("--settings", default="2-active,2-passive,1-passive",
                    help="comma list of THREADS-POLICY: torch threads (or 'default') and how OpenMP threads wait "
                         "(active: spin; passive: sleep at once; spinN: spin N times, then sleep "
                         "(GOMP_SPINCOUNT); kdm-pipe's default is passive)")
    args = ap.parse_args()
    print(f"load before: {open('/proc/loadavg').read().strip()}")
    for setting in args.settings.split(","):
        n, _, policy = setting.partition("-")
        threads = None if n == "default" else int(n)
        env = ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": policy[4:]} if policy.startswith("spin")
               else {"OMP_WAIT_POLICY": policy.upper()})
        alone = one(args.data, args.steps, args.student, threads, env, loaded=False)
        if args.alone_only:
            print(f"{setting:>10}: alone {alone:6.2f} steps/s", flush=True)
            continue
        busy = one(args.data, args.steps, args.student, threads, env, loaded=True)
        print(f"{setting:>10}: alone {alone:6.2f} steps/s, beside a 2-thread job {busy:6.2f} steps/s, "
              f"slowdown {alone / busy:5.2f}×", flush=True)
    print(f"load after: {open('/proc/loadavg').read().strip()}")
