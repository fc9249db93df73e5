"""Is the loader ever the bottleneck? Student steps/s fed by the streaming loader ÷ the same steps fed from batches
already in memory (same model, batch, shards), for the official 2-D configuration (checkerboard MLPs, batch 4096,
1 loader worker) and the digits U-Nets (batch 64, 1 loader worker). Goal ≥ 0.95 for both. After 3 warm-up steps
each, the two feeds take turns (4 rounds of steps/4 each), so that a change of the machine's load hits both alike.

    .venv/bin/python bench/train_feed.py [--steps 60] [--threads 2]

Prints, per setup, steps/s fed by the loader and from memory and their ratio. Feeds docs/BENCHMARKS.md, section
"trainer fed by the loader ÷ fed from memory".
"""

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import torch  # noqa: E402

from kdm_pipe.config import GenerateConfig, TrainConfig, build, load_preset  # noqa: E402
from kdm_pipe.loader import batches  # noqa: E402
from kdm_pipe.manifest import load_manifest  # noqa: E402
from kdm_pipe.student.noise import LatentNoise  # noqa: E402
from kdm_pipe.trained import student_for  # noqa: E402
from kdm_pipe.training import resolved  # noqa: E402
from stages import generate  # noqa: E402

ROUNDS = 4
SETUPS = {  # preset, generate overrides (pairs only need the right shape), train overrides
    "checkerboard (official MLPs, batch 4096)": ("checkerboard", {"shards": 10, "pairs_per_shard": 4000}, {}),
    "digits (U-Nets, batch 64)": ("digits", {"shards": 8, "pairs_per_shard": 256, "sampler": {"steps": 2}},
                                  {"student": {"w_adv": 0.0}}),
}


def stepper(model, opt):
    """One optimisation step on a batch, as the trainer takes it."""
    noise = LatentNoise(torch.Generator().manual_seed(0))

    def step(b):
        losses = model.losses(b["x_0"].float(), b["x_T"].float(), None, noise)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
    return step


def seconds(step, feed, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        step(next(feed))
    return time.perf_counter() - t


def measure(name: str, preset_name: str, gen_over: dict, train_over: dict, steps: int, root: Path) -> None:
    preset = load_preset(preset_name)
    data = root / preset_name
    generate.run(build(GenerateConfig, preset["generate"], gen_over, {"out": data}), progress=False)
    cfg = build(TrainConfig, preset["train"], train_over, {"data": data, "out": root / "run", "holdout_shards": 0})
    manifest = load_manifest(data)
    cfg = resolved(cfg, manifest)
    torch.manual_seed(0)
    model = student_for(cfg, manifest)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    shards = [(s.name, s.pairs) for s in manifest.shards]
    stream = batches(data, shards, cfg.batch, cfg.shuffle_buffer, 0, cfg.loader_workers)
    held = itertools.cycle([next(stream) for _ in range(8)])
    step = stepper(model, opt)
    seconds(step, stream, 3), seconds(step, held, 3)        # warm-up: workers started, allocator settled
    fed_s = held_s = 0.0
    for _ in range(ROUNDS):            # the two feeds in turn, so that a change of the machine's load hits both
        fed_s += seconds(step, stream, steps // ROUNDS)
        held_s += seconds(step, held, steps // ROUNDS)
    stream.close()
    fed, held = ROUNDS * (steps // ROUNDS) / fed_s, ROUNDS * (steps // ROUNDS) / held_s
    print(f"{name}: loader-fed {fed:.2f} steps/s ({fed * cfg.batch:,.0f} pairs/s), in memory {held:.2f} steps/s; "
          f"ratio {fed / held:.3f} (goal ≥ 0.95)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per feed, in 4 rounds of each in turn")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    root = Path(tempfile.mkdtemp())
    try:
        for name, (preset, gen_over, train_over) in SETUPS.items():
            measure(name, preset, gen_over, train_over, args.steps, root)
    finally:
        shutil.rmtree(root)
