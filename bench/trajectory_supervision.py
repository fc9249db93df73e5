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

With --preset (digits): that preset's teacher, sampler, pair count and student (U-Nets, discriminator and all),
pairs generated with --trajectory (every-3 of 18 steps: 7 states), its statistics store (for the FD to the whole
teacher set), and a reduced --steps; selection by the Fréchet distance of pooled pixels (the weight choice's
criterion), reports FD to the teacher set, FD to held-out teacher samples, paired MSE and PSNR.

    python bench/trajectory_supervision.py --preset digits --out runs/bench-traj-digits --shards 12 --steps 300 \
        --num 512 --candidates traj-lat-rec traj-lat-rec-onward

Feeds docs/BENCHMARKS.md, section "Trajectory-supervised ÷ endpoint-only KDM at equal budget".
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import ray

from kdm_pipe.config import EvaluateConfig, GenerateConfig, StatsConfig, TrainConfig, build, load_preset
from kdm_pipe.evaluation import apply, choice_distance, distribution_metrics, heldout_split, sampler
from kdm_pipe.evaluation import evaluate as evaluate_run
from kdm_pipe.manifest import load_manifest
from kdm_pipe.trained import load_weights
from kdm_pipe.training import train
from stages import generate, stats

CANDIDATES = {                                    # trajectory-loss weights tried on the selection split
    "traj-lat-rec": {"w_latent": 1.0, "w_rec": 1.0, "w_push": 0.0},
    "traj-lat-rec-push": {"w_latent": 1.0, "w_rec": 1.0, "w_push": 1.0},
    "traj-lat-rec-onward": {"w_latent": 1.0, "w_rec": 1.0, "w_push": 0.0, "w_onward": 1.0},
}


def pairs(out: Path, args) -> Path:
    if args.preset:
        cfg = build(GenerateConfig, load_preset(args.preset)["generate"],
                    {"out": out, "trajectory": args.trajectory, "shards": args.shards})
    else:
        cfg = GenerateConfig(out=out, shards=args.shards, pairs_per_shard=args.pairs_per_shard,
                             batch=args.pairs_per_shard, trajectory=args.trajectory)
    if not (out / "manifest.json").is_file() or len(load_manifest(out).shards) < cfg.shards:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
        try:
            generate.run(cfg, progress=False)
            if args.preset:                        # the whole teacher set's statistics: evaluate's fd_set
                stats.run(StatsConfig(data=out, workers=2), progress=False)
        finally:
            ray.shutdown()
    return out


def train_config(data: Path, out: Path, args, trajectory: dict | None) -> TrainConfig:
    """The preset's training settings (or the checkerboard bench's own) at --steps, with `trajectory`."""
    common = {"data": data, "out": out, "steps": args.steps, "ckpt_every": args.steps, "probe_every": args.steps,
              "tensorboard": False, "seed": 0, "student": {"trajectory": trajectory}}
    if args.preset:
        return build(TrainConfig, load_preset(args.preset)["train"], common)
    student = {"hidden": args.hidden, "depth": args.depth, "latent_dim": args.latent, "operator": args.operator}
    return build(TrainConfig, {"student": student, "batch": args.batch, "lr": 1e-3, "ema": 0.999,
                               "holdout_shards": 2, "log_every": 100, "loader_workers": 1}, common)


def run(data: Path, out: Path, args, trajectory: dict | None) -> float:
    """Train (unless done); returns the training wall time in seconds."""
    stamp = out / "wall.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())["seconds"]
    cfg = train_config(data, out, args, trajectory)
    t = time.perf_counter()
    train(cfg, progress=False)
    seconds = time.perf_counter() - t
    stamp.write_text(json.dumps({"seconds": seconds}))
    return seconds


def selection_distance(run_dir: Path, steps: int = 1) -> float:
    """Distance of `steps`-step samples on the selection split: samples of its first half's x_T vs its second
    half's x_0 (the split that chooses EMA vs raw; the report split is not read). Sliced Wasserstein for vectors,
    FD of pooled pixels for images."""
    select, _ = heldout_split(run_dir)
    model, _, manifest, _ = load_weights(run_dir, "ema")
    h = len(select["x_0"]) // 2
    x = apply(sampler(model, steps), select["x_T"][:h], None, "cpu")
    if x.ndim == 4:
        return choice_distance(x, select["x_0"][h:])
    return distribution_metrics(x, select["x_0"][h:], 0, manifest.teacher)["sliced_wasserstein"]


def report(run_dir: Path, steps: list[int], num: int) -> dict[int, dict]:
    out = {}
    for s in steps:
        r = evaluate_run(EvaluateConfig(run=run_dir, num=num, steps=s, batch=1000))
        student, floor, untrained = r["student"], r["teacher_floor"], r["untrained"]
        row = {"mse": student["mse"], "network_passes": r["speed"]["student_network_passes"], "weights": r["weights"]}
        if "fd_teacher" in student:
            row.update(fd_set=r["fd_set"]["fd"], fd=student["fd_teacher"], psnr=student["psnr"],
                       floor_fd=floor["fd_teacher"], untrained_fd=untrained["fd_teacher"])
        else:
            row.update(sw=student["sliced_wasserstein"], mmd=student["mmd"], off_support=student.get("off_support"),
                       floor_sw=floor["sliced_wasserstein"], untrained_sw=untrained["sliced_wasserstein"])
        out[s] = row
    return out


def table(results: dict, wall: dict) -> None:
    """The report split's rows (FD/SW: the distribution distance; `dist` below)."""
    image = "fd" in results["endpoint"][1]
    head = ["FD set", "FD held", "MSE", "PSNR"] if image else ["SW", "MMD", "MSE", "off"]
    keys = ["fd_set", "fd", "mse", "psnr"] if image else ["sw", "mmd", "mse", "off_support"]
    print(f"{'run':22} {'S':>2} {'passes':>6} " + " ".join(f"{h:>8}" for h in head) + f" {'wall s':>7}")
    for name, rows in results.items():
        for s, r in rows.items():
            print(f"{name:22} {s:>2} {r['network_passes']:>6} "
                  + " ".join(f"{(r[k] if r[k] is not None else float('nan')):8.4f}" for k in keys)
                  + f" {wall[name]:7.0f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-traj"))
    ap.add_argument("--preset", help="a preset's pairs and student (digits) instead of the checkerboard's")
    ap.add_argument("--trajectory", help="states kept (default every-2; with --preset every-3)")
    ap.add_argument("--shards", type=int, help="shards of pairs (default 12; with --preset the preset's)")
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
    args.trajectory = args.trajectory or ("every-3" if args.preset else "every-2")
    args.shards = args.shards or (None if args.preset else 12)
    data = args.pairs or pairs(args.out / "pairs", args)
    wall = {"endpoint": run(data, args.out / "endpoint", args, None)}
    chosen, few = {}, {}
    for name in args.candidates:
        wall[name] = run(data, args.out / name, args, CANDIDATES[name])
        chosen[name] = selection_distance(args.out / name)
        few[name] = selection_distance(args.out / name, 2)
    best = min(chosen, key=chosen.get)
    dist = "FD (pooled pixels)" if len(load_manifest(data).shape) == 3 else "SW"
    print(f"selection split, one-step {dist}: endpoint %.4f; " % selection_distance(args.out / "endpoint")
          + ", ".join(f"{n} {v:.4f}" for n, v in chosen.items()) + f" → {best}")
    print("(for information, not used to choose: selection split at S = 2: "
          + ", ".join(f"{n} {v:.4f}" for n, v in few.items()) + ")")
    results = {"endpoint": report(args.out / "endpoint", [1], args.num), best: report(args.out / best, [1, 2, 4],
                                                                                          args.num)}
    (args.out / "results.json").write_text(json.dumps({"wall_s": wall, "selection": chosen, "selection_2": few,
                                                       "best": best, "report": results, "args": vars(args)},
                                                      indent=1, default=str))
    table(results, wall)
    e, t = results["endpoint"][1], results[best][1]
    key = "fd_set" if "fd_set" in e else "sw"
    floor, untrained = ("floor_fd", "untrained_fd") if "fd" in e else ("floor_sw", "untrained_sw")
    print(f"held-out teacher-vs-teacher floor {e[floor]:.4f}; untrained {e[untrained]:.4f}")
    print(f"trajectory ÷ endpoint one-step {key} = {t[key] / e[key]:.3f} (goal ≤ 0.8); paired MSE ratio "
          f"{t['mse'] / e['mse']:.3f}; wall-time ratio {wall[best] / wall['endpoint']:.2f}")
    print(f"(other candidates' wall s: {json.dumps({k: round(v) for k, v in wall.items()})}; "
          f"selection spread: {np.ptp(list(chosen.values())):.4f})")
