"""The training loop: stream pairs, fit the student (and its discriminator), keep an EMA, probe, checkpoint, resume.

Runs as one process or as N data-parallel ranks under `torchrun` (DDP; gloo on CPU, NCCL on GPU). The global batch
and the latent noise of a step do not depend on N (see data.py and student/noise.py), so N ranks train what one
process would, up to float summation order. Checkpoints are state dicts (model, EMA, optimisers, discriminator,
RNG states, step) loadable with `weights_only=True`; the run's resolved config sits beside them as JSON. Resuming
restores all of it and replays the data stream from the current epoch's start, so an interrupted run ends bit for
bit where an uninterrupted one does (on CPU). SIGTERM (cluster preemption) ends the step, writes a checkpoint and
stops with status "preempted".
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kdm_pipe.config import ConfigError, TrainConfig
from kdm_pipe.data import batches
from kdm_pipe.probes import ProbeStore, probe
from kdm_pipe.runtime import pick_device, set_threads
from kdm_pipe.shards import Manifest, load_manifest, read_pairs
from kdm_pipe.student import build_student, is_image
from kdm_pipe.student.discriminator import Discriminator, disc_loss
from kdm_pipe.student.noise import LatentNoise

CKPT_DIR = "checkpoints"


def split_shards(manifest: Manifest, holdout: int) -> tuple[list[str], list[str]]:
    """Training shards and held-out shards (the last `holdout` complete shards)."""
    names = [s.name for s in sorted(manifest.shards, key=lambda s: s.index)]
    if len(names) <= holdout:
        raise ConfigError(f"the data has {len(names)} complete shards; holding out {holdout} leaves none to train on "
                          f"(generate more shards or lower holdout_shards)")
    return names[: len(names) - holdout], names[len(names) - holdout:]


def resolved(cfg: TrainConfig, manifest: Manifest) -> TrainConfig:
    """`cfg` with the student's unset loss settings filled in for the data's kind (what config.json records)."""
    return cfg.model_copy(update={"student": cfg.student.for_data(is_image(manifest.shape))})


def student_for(cfg: TrainConfig, manifest: Manifest) -> nn.Module:
    return build_student(cfg.student, manifest.shape, manifest.label_dim, manifest.sigma_max)


def discriminator_for(cfg: TrainConfig, manifest: Manifest) -> nn.Module | None:
    """The DCGAN discriminator when the adversarial term is on (image data only)."""
    if not (is_image(manifest.shape) and cfg.student.w_adv):
        return None
    return Discriminator(manifest.shape[0], manifest.shape[1])


def latest_checkpoint(run: Path) -> Path | None:
    ckpts = sorted((Path(run) / CKPT_DIR).glob("ckpt-*.pt"))
    return ckpts[-1] if ckpts else None


def save_checkpoint(run: Path, step: int, state: dict) -> Path:
    path = Path(run) / CKPT_DIR / f"ckpt-{step:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_weights(run: Path, which: str = "ema", ckpt: Path | None = None,
                 device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig, Manifest, int]:
    """A trained student (EMA or raw weights) with its config and data manifest, ready for evaluation."""
    cfg = TrainConfig.model_validate_json((Path(run) / "config.json").read_text())
    manifest = load_manifest(cfg.data)
    ckpt = ckpt or latest_checkpoint(run)
    if ckpt is None:
        raise ConfigError(f"{run} has no checkpoints; train it first with `kdm-pipe train --out {run}`")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = student_for(cfg, manifest)
    model.load_state_dict(state["model" if which == "raw" else "ema"])
    return model.to(device).eval(), cfg, manifest, state["step"]


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


@contextmanager
def process_group(device_kind: str) -> Iterator[tuple[int, int, int]]:
    """(rank, world, local_rank) from torchrun's environment; joins and leaves the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        yield 0, 1, 0
        return
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    try:
        yield rank, world, local
    finally:
        dist.destroy_process_group()


@contextmanager
def preemption() -> Iterator[dict]:
    """A flag set by SIGTERM (checked between steps) while the loop runs; the old handler is restored after."""
    flag = {"term": False}
    old = signal.signal(signal.SIGTERM, lambda *_: flag.update(term=True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, old)


class LossStep(nn.Module):
    """The student's losses as a forward(), so DDP sees the pass whose gradients it must average."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_0, x_T, labels, noise, disc=None):
        return self.model.losses(x_0, x_T, labels, noise, **({"disc": disc} if disc is not None else {}))


def average_grads(params, world: int) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def sanitize_grads(params) -> None:
    for p in params:                                   # one bad batch must not poison the weights
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)


def rng_state(device: torch.device) -> list[torch.Tensor]:
    """The global generators dropout draws from: CPU, and the device's on CUDA."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def set_rng_state(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0].cpu())
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1].cpu(), device)


def probe_pairs(cfg: TrainConfig, holdout: list[str], device) -> dict[str, torch.Tensor] | None:
    """The first `probe_pairs` held-out pairs (fixed for the whole run), or None without held-out shards."""
    pairs = read_pairs(cfg.data, holdout, cfg.probe_pairs)
    if pairs is None:
        return None
    return {k: torch.from_numpy(pairs[k]).to(device, torch.float32) for k in ("x_0", "x_T", "label") if k in pairs}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) the run `cfg.out`; returns {"run", "step", "status": "done" | "preempted"}."""
    try:
        manifest = load_manifest(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--data {cfg.data}: {e}") from None
    cfg = resolved(cfg, manifest)
    train_names, holdout_names = split_shards(manifest, cfg.holdout_shards)
    counts = {s.name: s.pairs for s in manifest.shards}
    prepare_run(cfg, resume)
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    with process_group(device.type) as (rank, world, local):
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        return _train(cfg, manifest, train_names, holdout_names, counts, resume, progress, device, rank, world)


def _train(cfg, manifest, train_names, holdout_names, counts, resume, progress, device, rank, world) -> dict:
    run, lead = Path(cfg.out), rank == 0
    torch.manual_seed(cfg.seed)                        # the same initial weights on every rank
    model = student_for(cfg, manifest).to(device)      # (a bad student config fails here, before anything is written)
    disc = discriminator_for(cfg, manifest)
    disc = disc.to(device) if disc is not None else None
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas) if disc is not None else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0]))   # dropout differs by rank
    step = 0
    if resume and (ckpt := latest_checkpoint(run)) is not None:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        set_rng_state(state["rng"]["torch"][rank % len(state["rng"]["torch"])], device)
        gen.set_state(state["rng"]["noise"])
        step = state["step"]

    stepper: nn.Module = LossStep(model)
    if world > 1:
        stepper = nn.parallel.DistributedDataParallel(stepper, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        stepper = torch.compile(stepper)
    noise = LatentNoise(gen, rank, world)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext())
    stream = batches(cfg.data, [(n, counts[n]) for n in train_names], cfg.batch, cfg.shuffle_buffer, cfg.seed,
                     cfg.loader_workers, rank, world, start=step)
    if lead:
        (run / CKPT_DIR).mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(cfg.model_dump_json(indent=1))
        (run / "split.json").write_text(json.dumps({"train": train_names, "holdout": holdout_names}, indent=1))
    probes = probe_pairs(cfg, holdout_names, device) if lead else None
    store = ProbeStore(run / "latents.zarr", step) if probes is not None else None
    tb = tensorboard(run, step) if lead and cfg.tensorboard else None
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and lead), desc="train", unit="step",
               dynamic_ncols=True)
    log = open(run / "train.jsonl", "a") if lead else None
    t_last, step_last, status = time.perf_counter(), step, "done"

    def checkpoint() -> None:
        rngs = [rng_state(device)]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(device))
        if lead:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     "rng": {"torch": rngs, "noise": gen.get_state()}}
            if disc is not None:
                state.update(disc=disc.state_dict(), opt_d=opt_d.state_dict())
            save_checkpoint(run, step, state)

    with preemption() as flag:
        while step < cfg.steps:
            batch = {k: v.to(device, torch.float32) for k, v in next(stream).items()}
            with autocast:
                losses = stepper(batch["x_0"], batch["x_T"], batch.get("label"), noise, disc)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            sanitize_grads(model.parameters())
            opt.step()
            if disc is not None:                       # one discriminator step per student step
                with autocast:
                    losses["disc"] = disc_loss(disc, batch["x_0"], model.last_sample)
                opt_d.zero_grad(set_to_none=True)
                losses["disc"].backward()
                if world > 1:
                    average_grads(disc.parameters(), world)
                sanitize_grads(disc.parameters())
                opt_d.step()
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - cfg.ema)
            step += 1
            bar.update(1)
            if lead and (step % cfg.log_every == 0 or step == cfg.steps):
                now = time.perf_counter()
                rate = (step - step_last) / (now - t_last)
                row = {"step": step, **{k: v.item() for k, v in losses.items()}, "steps_per_s": rate,
                       "pairs_per_s": rate * cfg.batch}
                log.write(json.dumps(row) + "\n")
                log.flush()
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(f"train/{k}", v, step)
                bar.set_postfix(loss=f"{row['total']:.4g}", pairs_s=f"{row['pairs_per_s']:,.0f}")
                t_last, step_last = now, step
            if store is not None and (step % cfg.probe_every == 0 or step == cfg.steps):
                row = probe(ema, probes["x_0"], probes["x_T"], probes.get("label"))
                store.append(step, row)
                if tb is not None:
                    tb.add_scalar("probe/paired_mse_ema", float(row["paired_mse"]), step)
                    if "latent_mse" in row:
                        tb.add_scalar("probe/latent_mse_ema", float(row["latent_mse"]), step)
            stop = flag["term"]
            if world > 1:                              # every rank stops at the same step
                t = torch.tensor(float(stop), device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                stop = bool(t.item())
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop:
                checkpoint()
            if stop:
                status = "preempted"
                break
    bar.close()
    if lead:
        log.close()
        if tb is not None:
            tb.close()
    return {"run": str(run), "step": step, "status": status}


def tensorboard(run: Path, step: int):
    """A TensorBoard writer for RUN/tensorboard; on resume, events past `step` are purged."""
    from torch.utils.tensorboard import SummaryWriter     # imported here: it is slow and only rank 0 needs it
    return SummaryWriter(str(run / "tensorboard"), purge_step=step or None)
