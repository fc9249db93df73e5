"""KDM vs the KD baseline on real data, over several training seeds: the `digits` preset's whole pipeline once
(`kdm-pipe demo`: shipped EDM teacher, 35 NFE → pairs, filter, stats, both students at seed 0), then both students
again at seeds 1, 2, … on the same pairs with the same steps and batch. Prints, per student, the headline numbers of
`evaluate` — the Fréchet distance of fresh one-step samples to the whole teacher set (`fd_set`, pixel space) and
the paired MSE on held-out pairs — as mean ± spread (half the range) over the seeds, and whether KDM's lead on the
whole-set FD exceeds the seeds' spread.

    python bench/kd_vs_kdm.py [--out runs/bench-kd-vs-kdm] [--seeds 3] [--scale 1]

Feeds docs/BENCHMARKS.md, section "KDM ÷ KD on digits, three seeds (demo budget)".
"""

import argparse
import statistics
from pathlib import Path

from kdm_pipe.config import DemoConfig, EvaluateConfig, Preset, TrainConfig, build, load_preset
from stages import demo, evaluate, train


def spread(values: list[float]) -> str:
    mid, half = (max(values) + min(values)) / 2, (max(values) - min(values)) / 2
    return f"{statistics.mean(values):.4g} ± {half:.2g} (range {min(values):.4g}–{max(values):.4g}, mid {mid:.4g})"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-kd-vs-kdm"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="as demo --scale (a quick check of this script)")
    args = ap.parse_args()
    cfg = DemoConfig(preset="digits", out=args.out, scale=args.scale)
    first = demo.run(cfg, progress=False)                    # seed 0 of both students, and the pairs
    preset = Preset.model_validate(load_preset("digits"))
    results = {kind: [first[kind]] for kind in demo.STUDENTS}
    for seed in range(1, args.seeds):
        for kind in demo.STUDENTS:
            run = args.out / f"{kind}-seed{seed}"
            tcfg = build(TrainConfig, preset.train.model_dump(exclude_unset=True),
                         {"data": args.out / "pairs", "out": run, "seed": seed, "student": {"kind": kind},
                          **demo.scaled(preset.train, args.scale)}, where="train")
            if not (run / "config.json").exists():
                train.run(tcfg, progress=False)
            ecfg = build(EvaluateConfig, preset.evaluate.model_dump(exclude_unset=True),
                         {"run": run, "data": args.out / "pairs"}, where="evaluate")
            results[kind].append(evaluate.run(ecfg))
    fd_set = first["kdm"]["fd_set"]
    print(f"\n{args.seeds} seeds, {tcfg.steps} steps × batch {tcfg.batch} each, {fd_set['num_samples']} fresh samples "
          f"vs the set's {fd_set['num_reference']} pairs")
    fd = {kind: [r["fd_set"]["fd"] for r in rs] for kind, rs in results.items()}
    for kind, rs in results.items():
        print(f"{kind}: FD to the whole set {spread(fd[kind])}; paired MSE {spread([r['student']['mse'] for r in rs])}")
    print(f"teacher floor (half the set's shards vs the other half): {fd_set['floor']['fd']:.4g}")
    lead = statistics.mean(fd["kd"]) - statistics.mean(fd["kdm"])
    noise = max((max(v) - min(v)) / 2 for v in fd.values())
    print(f"KDM's lead on the whole-set FD: {lead:.4g} (KD − KDM, means); largest seed spread {noise:.2g}: "
          + ("lead exceeds the spread" if lead > noise else "lead within the spread"))
