"""KDM vs the KD baseline on real data: the `digits` preset's whole pipeline (shipped EDM teacher, 35 NFE →
5,120 pairs; both students trained on the same pairs with the same steps and batch; evaluated on the same
held-out pairs). Prints the Fréchet distance of each student's one-step samples to the teacher's samples (pixel
space), the paired MSE, training steps/s, and the ratio KDM FD ÷ KD FD against the goal ≤ 0.8.

    python bench/kd_vs_kdm.py [--out runs/bench-kd-vs-kdm]
"""

import argparse
import json
from pathlib import Path

from kdm_pipe.config import DemoConfig, EvaluateConfig
from kdm_pipe.evaluation import evaluate
from stages import demo

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-kd-vs-kdm"))
    args = ap.parse_args()
    results = demo.run(DemoConfig(preset="digits", out=args.out), progress=False)
    pairs = args.out / "pairs"
    n = sum(1 for _ in pairs.glob("shard-*.tar")) * 256
    # The held-out FD compares 256 vs 256 samples; a second, lower-variance one compares n fresh one-step samples
    # (seeds the teacher never used) with all n teacher samples.
    fd, fd_all = {}, {}
    for kind, r in results.items():
        full = evaluate(EvaluateConfig(run=args.out / kind, ref=str(pairs), fid_num=n, fid_seed=10**6,
                                                num=512, batch=256))
        fd[kind], fd_all[kind] = full["student"]["fd_teacher"], full["fid"]["frechet_distance"]
        rows = [json.loads(line) for line in (args.out / kind / "train.jsonl").read_text().splitlines()]
        sps = sum(row["steps_per_s"] for row in rows[1:]) / max(1, len(rows) - 1)
        print(f"{kind}: FD to teacher held-out {fd[kind]:.4f} (floor {full['teacher_floor']['fd_teacher']:.4f}), "
              f"FD {n} fresh vs {n} teacher {fd_all[kind]:.4f}, paired MSE {full['student']['mse']:.4f}, "
              f"{sps:.2f} training steps/s")
    print(f"KDM FD ÷ KD FD = {fd['kdm'] / fd['kd']:.3f} held-out, {fd_all['kdm'] / fd_all['kd']:.3f} on {n} samples "
          f"(goal ≤ 0.8)")
