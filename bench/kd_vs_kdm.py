"""KDM vs the KD baseline on real data: the `digits` preset's whole pipeline (shipped EDM teacher, 35 NFE →
5,120 pairs; both students trained on the same pairs with the same steps and batch; evaluated on the same
held-out pairs). Prints the Fréchet distance of each student's one-step samples to the teacher's samples (pixel
space), the paired MSE, training steps/s, and the ratio KDM FD ÷ KD FD against the goal ≤ 0.8.

    python bench/kd_vs_kdm.py [--out runs/bench-kd-vs-kdm]
"""

import argparse
import json
from pathlib import Path

from stages import demo

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-kd-vs-kdm"))
    args = ap.parse_args()
    results = demo.run("digits", args.out, progress=False)
    fd = {k: r["student"]["fd_teacher"] for k, r in results.items()}
    for kind, r in results.items():
        rows = [json.loads(line) for line in (args.out / kind / "train.jsonl").read_text().splitlines()]
        sps = sum(row["steps_per_s"] for row in rows[1:]) / max(1, len(rows) - 1)
        print(f"{kind}: FD to teacher {fd[kind]:.4f}, paired MSE {r['student']['mse']:.4f}, {sps:.2f} training steps/s")
    print(f"KDM FD ÷ KD FD = {fd['kdm'] / fd['kd']:.3f} (goal ≤ 0.8)")
