"""The training loop: stream pairs, fit the student, keep an EMA, checkpoint, resume exactly.

Checkpoints are state dicts (model, EMA, optimizer, RNG states, step) loadable with `weights_only=True`, and the
run's resolved config sits beside them as JSON. Resuming restores all of it and replays the data stream up to
the saved step, so an interrupted run ends bit-for-bit where an uninterrupted one does (on CPU).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kdm_pipe.config import ConfigError, TrainConfig
from kdm_pipe.data import loader
from kdm_pipe.runtime import pick_device, set_threads
from kdm_pipe.shards import Manifest, load_manifest
from kdm_pipe.student.vector import build_student

CKPT_DIR = "checkpoints"


def split_shards(manifest: Manifest, holdout: int) -> tuple[list[str], list[str]]:
    """Training shards and held-out shards (the last `holdout` complete shards)."""
    names = [s.name for s in sorted(manifest.shards, key=lambda s: s.index)]
    if len(names) <= holdout:
        raise ConfigError(f"the data has {len(names)} complete shards; holding out {holdout} leaves none to train on "
                          f"(generate more shards or lower holdout_shards)")
    return names[: len(names) - holdout], names[len(names) - holdout:]


def student_for(cfg: TrainConfig, manifest: Manifest) -> torch.nn.Module:
    return build_student(cfg.student, math.prod(manifest.shape), manifest.label_dim, manifest.sigma_max)


def latest_checkpoint(run: Path) -> Path | None:
    ckpts = sorted((Path(run) / CKPT_DIR).glob("ckpt-*.pt"))
    return ckpts[-1] if ckpts else None


def save_checkpoint(run: Path, step: int, model, ema, opt, gen: torch.Generator) -> Path:
    path = Path(run) / CKPT_DIR / f"ckpt-{step:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "noise": gen.get_state()}}, tmp)
    os.replace(tmp, path)
    return path


def load_weights(run: Path, which: str = "ema", ckpt: Path | None = None) -> tuple[torch.nn.Module, TrainConfig, Manifest, int]:
    """A trained student (EMA or raw weights) with its config and data manifest, ready for evaluation."""
    cfg = TrainConfig.model_validate_json((Path(run) / "config.json").read_text())
    manifest = load_manifest(cfg.data)
    ckpt = ckpt or latest_checkpoint(run)
    if ckpt is None:
        raise ConfigError(f"{run} has no checkpoints; train it first with `kdm-pipe train --out {run}`")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = student_for(cfg, manifest)
    model.load_state_dict(state["model" if which == "raw" else "ema"])
    return model.eval(), cfg, manifest, state["step"]


def prepare_run(cfg: TrainConfig, resume: bool) -> None:
    """Refuse to mix runs: a new run needs an empty --out; a resumed one must keep every setting but `steps`."""
    run, saved = Path(cfg.out), Path(cfg.out) / "config.json"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {run} holds no run (no config.json); drop --resume to start one")
        old = json.loads(saved.read_text())
        new = cfg.model_dump(mode="json")
        diff = sorted(k for k in new if k != "steps" and old.get(k) != new[k])
        if diff:
            raise ConfigError(f"--resume: settings differ from the saved run in {', '.join(diff)}; "
                              f"resume with the original settings (only --steps may change)")
    elif latest_checkpoint(run) is not None:
        raise ConfigError(f"{run} already holds a run; pass --resume to continue it or choose another --out")


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    try:
        manifest = load_manifest(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--data {cfg.data}: {e}") from None
    train_names, holdout_names = split_shards(manifest, cfg.holdout_shards)
    if len(train_names) < max(cfg.loader_workers, 1):
        raise ConfigError(f"{len(train_names)} training shards cannot feed {cfg.loader_workers} loader workers; "
                          f"lower --loader-workers or generate more shards")
    prepare_run(cfg, resume)
    run = Path(cfg.out)
    (run / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(cfg.model_dump_json(indent=1))
    (run / "split.json").write_text(json.dumps({"train": train_names, "holdout": holdout_names}, indent=1))

    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = student_for(cfg, manifest).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    step = 0
    if resume and (ckpt := latest_checkpoint(run)) is not None:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        gen.set_state(state["rng"]["noise"])
        step = state["step"]

    batches = iter(loader(cfg.data, train_names, cfg.batch, cfg.shuffle_buffer, cfg.seed, cfg.loader_workers))
    for _ in range(step):                              # replay the stream to the saved position
        next(batches)
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    log = open(run / "train.jsonl", "a")
    t_last, step_last = time.perf_counter(), step
    while step < cfg.steps:
        batch = {k: v.to(device, torch.float32) for k, v in next(batches).items()}
        losses = model.losses(batch["x_0"], batch["x_T"], batch.get("label"), gen)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        for p in model.parameters():                   # one bad batch must not poison the weights
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - cfg.ema)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            rate = (step - step_last) / (now - t_last)
            row = {"step": step, **{k: v.item() for k, v in losses.items()}, "steps_per_s": rate,
                   "pairs_per_s": rate * cfg.batch}
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{row['total']:.4g}", pairs_s=f"{row['pairs_per_s']:,.0f}")
            t_last, step_last = now, step
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(run, step, model, ema, opt, gen)
    bar.close()
    log.close()
    return run
