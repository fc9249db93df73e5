"""Endpoint-only KDM vs trajectory-supervised KDM at equal budget on the 2-D checkerboard (our teacher, 18 Heun
steps, every-2 trajectory states: 10 states per pair), same pairs, steps, batch, seed and networks.

Settings of the trajectory loss are chosen on the run's selection split (the first half of the held-out shards,
which also chooses EMA vs raw weights); the numbers reported come from the report split after it, never seen by
any choice. Reported per run: one-step (S = 1) sliced Wasserstein and MMD to held-out teacher samples, paired MSE,
the same at S = 2 and 4 (trajectory-supervised students only), training wall time, and the teacher-vs-teacher
floor. Goal: trajectory one-step SW ≤ 0.8 × endpoint-only SW.

    python bench/trajectory_supervision.py [--out runs/bench-traj] [--steps 2000] [--batch 512]
    python bench/trajectory_supervision.py --out runs/bench-traj-dec --pairs runs/bench-traj/pairs \
        --operator decomposed --candidates traj-lat-rec
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import ray

from kdm_pipe.config import EvaluateConfig, GenerateConfig, TrainConfig
from kdm_pipe.evaluation import apply, distribution_metrics, heldout_split, sampler
from kdm_pipe.evaluation import evaluate as evaluate_run
from kdm_pipe.shards import load_manifest
from kdm_pipe.training import load_weights, train
from stages import generate

CANDIDATES = {                                    # trajectory-loss weights tried on the selection split
    "traj-lat-rec": {"w_latent": 1.0, "w_rec": 1.0, "w_push": 0.0},
    "traj-lat-rec-push": {"w_latent": 1.0, "w_rec": 1.0, "w_push": 1.0},
    "traj-lat-rec-onward": {"w_latent": 1.0, "w_rec": 1.0, "w_push": 0.0, "w_onward": 1.0},
}


def pairs(out: Path, shards: int, per_shard: int) -> Path:
    if not (out / "manifest.json").is_file() or len(load_manifest(out).shards) < shards:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
        try:
            generate.run(GenerateConfig(out=out, shards=shards, pairs_per_shard=per_shard, batch=per_shard,
                                        trajectory="every-2"), progress=False)
        finally:
            ray.shutdown()
    return out


def run(data: Path, out: Path, args, trajectory: dict | None) -> float:
    """Train (unless done); returns the training wall time in seconds."""
    stamp = out / "wall.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())["seconds"]
    student = {"hidden": args.hidden, "depth": args.depth, "latent_dim": args.latent, "operator": args.operator,
               "trajectory": trajectory}
    cfg = TrainConfig.model_validate({"data": data, "out": out, "student": student, "steps": args.steps,
                                      "batch": args.batch, "lr": 1e-3, "ema": 0.999, "holdout_shards": 2,
                                      "log_every": 100, "ckpt_every": args.steps, "probe_every": args.steps,
                                      "loader_workers": 1, "tensorboard": False, "seed": 0})
    t = time.perf_counter()
    train(cfg, progress=False)
    seconds = time.perf_counter() - t
    stamp.write_text(json.dumps({"seconds": seconds}))
    return seconds


def selection_sw(run_dir: Path) -> float:
    """One-step sliced Wasserstein on the selection split: samples of its first half's x_T vs its second half's
    x_0 (the split that chooses EMA vs raw; the report split is not read)."""
    select, _ = heldout_split(run_dir)
    model, _, manifest, _ = load_weights(run_dir, "ema")
    h = len(select["x_0"]) // 2
    x = apply(sampler(model, 1), select["x_T"][:h], None, "cpu")
    return distribution_metrics(x, select["x_0"][h:], 0, manifest.teacher)["sliced_wasserstein"]


def report(run_dir: Path, steps: list[int], num: int) -> dict[int, dict]:
    out = {}
    for s in steps:
        r = evaluate_run(EvaluateConfig(run=run_dir, num=num, steps=s, batch=1000))
        out[s] = {"sw": r["student"]["sliced_wasserstein"], "mmd": r["student"]["mmd"], "mse": r["student"]["mse"],
                  "off_support": r["student"].get("off_support"), "floor_sw": r["teacher_floor"]["sliced_wasserstein"],
                  "untrained_sw": r["untrained"]["sliced_wasserstein"],
                  "network_passes": r["speed"]["student_network_passes"], "weights": r["weights"]}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-traj"))
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--pairs-per-shard", type=int, default=2500)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--num", type=int, default=2500, help="report-split pairs")
    ap.add_argument("--operator", default="affine", help="affine (official) | linear | decomposed")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="trajectory settings tried")
    ap.add_argument("--pairs", type=Path, help="an existing trajectory pair directory (default: OUT/pairs)")
    args = ap.parse_args()
    data = args.pairs or pairs(args.out / "pairs", args.shards, args.pairs_per_shard)
    wall = {"endpoint": run(data, args.out / "endpoint", args, None)}
    chosen = {}
    for name in args.candidates:
        weights = CANDIDATES[name]
        wall[name] = run(data, args.out / name, args, weights)
        chosen[name] = selection_sw(args.out / name)
    best = min(chosen, key=chosen.get)
    print("selection split, one-step SW: endpoint %.4f; " % selection_sw(args.out / "endpoint")
          + ", ".join(f"{n} {v:.4f}" for n, v in chosen.items()) + f" → {best}")
    results = {"endpoint": report(args.out / "endpoint", [1], args.num), best: report(args.out / best, [1, 2, 4],
                                                                                          args.num)}
    (args.out / "results.json").write_text(json.dumps({"wall_s": wall, "selection_sw": chosen, "best": best,
                                                       "report": results, "args": vars(args)}, indent=1, default=str))
    print(f"{'run':22} {'S':>2} {'passes':>6} {'SW':>8} {'MMD':>8} {'paired MSE':>10} {'off':>6} {'wall s':>7}")
    for name, rows in results.items():
        for s, r in rows.items():
            print(f"{name:22} {s:>2} {r['network_passes']:>6} {r['sw']:8.4f} {r['mmd']:8.4f} {r['mse']:10.4f} "
                  f"{r['off_support'] or float('nan'):6.3f} {wall[name]:7.0f}")
    e, t = results["endpoint"][1], results[best][1]
    print(f"teacher-vs-teacher floor SW {e['floor_sw']:.4f}; untrained SW {e['untrained_sw']:.4f}")
    print(f"trajectory ÷ endpoint one-step SW = {t['sw'] / e['sw']:.3f} (goal ≤ 0.8); paired MSE ratio "
          f"{t['mse'] / e['mse']:.3f}; wall-time ratio {wall[best] / wall['endpoint']:.2f}")
    print(f"(other candidates' wall s: {json.dumps({k: round(v) for k, v in wall.items()})}; "
          f"selection SW spread: {np.ptp(list(chosen.values())):.4f})")
