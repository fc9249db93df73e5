"""Trainer steps/s (and pairs/s) on the checkerboard-quick preset (the official 2-D student at batch 512, 1 loader
worker), from the trainer's own JSONL log: the mean of its logged rates after the first 100 steps.

    python bench/train_throughput.py [--steps 600]

Prints one line: steps/s and pairs/s. Feeds docs/BENCHMARKS.md, section "trainer steps/s".
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from kdm_pipe.config import GenerateConfig, TrainConfig, build, load_preset  # noqa: E402
from kdm_pipe.training import train  # noqa: E402
from stages import generate  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="≥ 200: the first 100 are left out")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    preset = load_preset("checkerboard-quick")
    generate.run(build(GenerateConfig, preset["generate"], {"out": root / "pairs"}), progress=False)
    cfg = build(TrainConfig, preset["train"], {"data": root / "pairs", "out": root / "run", "steps": args.steps,
                                                "log_every": 100, "ckpt_every": args.steps,
                                                "tensorboard": False})
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (root / "run" / "train.jsonl").read_text().splitlines()][1:]
    sps = sum(r["steps_per_s"] for r in rows) / len(rows)
    print(f"checkerboard-quick preset trainer: {sps:.1f} steps/s, {sps * cfg.batch:,.0f} pairs/s (batch {cfg.batch}, "
          f"MLP {cfg.student.depth}×{cfg.student.hidden}, steps 100–{args.steps})")
    shutil.rmtree(root)
