"""The training loop: stream pairs, fit the student (and its discriminator), keep an EMA, probe, checkpoint, resume.

Runs as one process or as N data-parallel ranks under `torchrun` (DDP; gloo on CPU, NCCL on GPU). The global batch
and the latent noise of a step do not depend on N (see loader.py and student/noise.py), so N ranks train what one
process would, up to float summation order. Checkpoints are state dicts (model, EMA, optimisers, discriminator,
RNG states, step) loadable with `weights_only=True`; the run's resolved config sits beside them as JSON. Resuming
restores all of it and replays the data stream from the current epoch's start, so an interrupted run ends bit for
bit where an uninterrupted one does (on CPU). SIGTERM (cluster preemption) ends the step (or the wait for a batch),
writes a checkpoint and stops with status "preempted".

Trust: sizes are bounded by the data and the memory before step 1; rank 0 holds the run's lock (one writer per
run); `nonfinite_steps` consecutive NaN/inf losses stop the run (DataError, exit 1), and checkpoints only ever hold
finite weights, so a diverged run's newest checkpoint is its last finite one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import time
from contextlib import ExitStack, closing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kdm_pipe import normalization, storage
from kdm_pipe.config import TrainConfig
from kdm_pipe.datasets import available_memory
from kdm_pipe.errors import ConfigError, DataError
from kdm_pipe.exclusions import NO_EXCLUSIONS, Exclusions, exclusions
from kdm_pipe.integrity import open_pairs
from kdm_pipe.loader import batches, loader_bytes
from kdm_pipe.locks import Lock, directory_lock
from kdm_pipe.manifest import Manifest
from kdm_pipe.optim import ema_update, sanitize_grads
from kdm_pipe.probes import ProbeStore, probe
from kdm_pipe.run import CKPT_DIR, Run
from kdm_pipe.runtime import pick_device, set_threads
from kdm_pipe.shards import read_pairs
from kdm_pipe.stats import training_moments
from kdm_pipe.stats_update import update
from kdm_pipe.student import is_image
from kdm_pipe.student.discriminator import Discriminator, disc_loss
from kdm_pipe.student.noise import LatentNoise
from kdm_pipe.student.trajectory import with_trajectory_times
from kdm_pipe.trained import student_for


def split_shards(manifest: Manifest, holdout: int) -> tuple[list[str], list[str]]:
    """Training shards and held-out shards (the last `holdout` complete shards)."""
    names = [s.name for s in sorted(manifest.shards, key=lambda s: s.index)]
    if len(names) <= holdout:
        n = manifest.num_pairs
        smaller = (f"pass --holdout-shards {max(1, len(names) // 5)} (held out for evaluation), or "
                   if len(names) > 1 else "")
        raise ConfigError(f"the data has {len(names)} complete shards ({n:,} pairs); holding out {holdout} "
                          f"(holdout_shards) leaves none to train on: {smaller}split the pairs into more shards "
                          f"(`kdm-pipe import … --pairs-per-shard {max(1, n // (holdout + 4))}`, or `generate` with "
                          f"more --shards)")
    return names[: len(names) - holdout], names[len(names) - holdout:]


def resolved(cfg: TrainConfig, manifest: Manifest) -> TrainConfig:
    """`cfg` with the student's unset loss settings, the trajectory times and the normalisation filled in for the
    data's kind (what config.json records)."""
    image = is_image(manifest.shape)
    if image and cfg.normalize == "standard":
        raise ConfigError("normalize: standard is for vector data; images keep EDM's [-1, 1] convention (use none)")
    normalize = cfg.normalize or ("none" if image else normalization.DEFAULT)
    student = with_trajectory_times(cfg.student.for_data(image), manifest, str(cfg.data))
    if student.trajectory is not None and normalize == "standard":
        # The stored states would reach the student in the data's units while x_0 is standardised.
        raise ConfigError("trajectory supervision with normalize: standard is not supported; use --normalize none")
    return cfg.model_copy(update={"student": student, "normalize": normalize})


def data_moments(cfg: TrainConfig, manifest: Manifest, names: list[str]) -> dict[str, np.ndarray] | None:
    """The training shards' μ, s for normalize: standard (stats.zarr, computed first when missing or stale)."""
    if cfg.normalize != "standard":
        return None

    def refresh() -> None:
        # One Ray job, not one per rank; a bucket's store is built and uploaded by `stats` alone.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or storage.is_remote(cfg.data):
            raise ConfigError(f"{cfg.data}/stats.zarr is missing or stale; run `kdm-pipe stats {cfg.data}` before "
                              f"a multi-process run or one on s3://")
        try:
            with directory_lock(cfg.data, f"train --data {cfg.data} (statistics for normalize: standard)"):
                update(Path(cfg.data), manifest)
        except OSError as e:
            raise ConfigError(f"normalize: standard needs {cfg.data}/stats.zarr and it cannot be written "
                              f"({e.strerror or e}); run `kdm-pipe stats` where it can, or use --normalize none"
                              ) from None
    return training_moments(cfg.data, manifest, names, refresh)


def discriminator_for(cfg: TrainConfig, manifest: Manifest) -> nn.Module | None:
    """The DCGAN discriminator when the adversarial term is on (image data only)."""
    if not (is_image(manifest.shape) and cfg.student.w_adv):
        return None
    return Discriminator(manifest.shape[0], manifest.shape[1])


def with_pairs(cfg: TrainConfig, resume: bool) -> TrainConfig:
    """`cfg` with its pairs: --data, or when a resumed run is given none, the run's own (`Run.data_dir`: the
    recorded path, else the same place relative to the run — a run moved together with its pairs)."""
    if cfg.data is not None:
        return cfg
    if not resume:
        raise ConfigError("train needs --data DIR: a pair directory written by `kdm-pipe generate` or import")
    run = Run(cfg.out)
    if not run.exists():
        raise ConfigError(f"--resume: {cfg.out} holds no run (no config.json); drop --resume and pass --data DIR")
    return cfg.model_copy(update={"data": run.data_dir()})


def prepare_run(cfg: TrainConfig, manifest: Manifest, resume: bool, excluded: str) -> None:
    """Refuse to mix runs: a new run needs an empty --out; a resumed one must keep every setting but `steps`
    (and `nonfinite_steps`), and the same pairs (by checksum: the run and its pairs may have moved) with the same
    pairs excluded by the memorisation filter (`excluded`: `Exclusions.digest` of the run's shards)."""
    run = Run(cfg.out)
    if resume:
        if not run.exists():
            raise ConfigError(f"--resume: {cfg.out} holds no run (no config.json); drop --resume to start one")
        old, new = run.read_json("config.json"), cfg.model_dump(mode="json")
        old = {"normalize": "none", "normalize_x_T": False, **old}   # a run from before normalisation existed
        diff = sorted(k for k in new if k not in ("steps", "out", "data", "nonfinite_steps") and old.get(k) != new[k])
        if diff:
            raise ConfigError(f"--resume: settings differ from the saved run in {', '.join(diff)}; "
                              f"resume with the original settings (only --steps may change)")
        if not run.same_pairs(manifest):
            raise ConfigError(f"--resume: --data {cfg.data} does not hold the shards {cfg.out} was trained on "
                              f"(checksums in {cfg.out}/split.json); pass the original pairs")
        if run.split.get("excluded_sha256", NO_EXCLUSIONS) != excluded:
            raise ConfigError(f"--resume: the memorisation filter of {cfg.data} excludes other pairs than when "
                              f"{cfg.out} started (split.json); resuming would change the data under the run: "
                              f"restore that filter, or start a new run")
    elif run.checkpoints():
        raise ConfigError(f"{cfg.out} already holds a run; pass --resume to continue it or choose another --out")


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


class WaitInterrupted(BaseException):
    """SIGTERM arrived while the loop waited for its next batch (a BaseException: a reader's `except Exception`, in
    process with --loader-workers 0, must not turn it into a read error)."""


@contextmanager
def preemption() -> Iterator[dict]:
    """A flag set by SIGTERM while the loop runs, checked between steps; the old handler is restored after. While the
    loop waits for a batch (`waiting`: also between steps) the signal ends the wait, so a stalled reader cannot keep
    a preempted job from its checkpoint until the scheduler's SIGKILL."""
    flag = {"term": False, "waiting": False}

    def handler(*_) -> None:
        flag["term"] = True
        if flag["waiting"]:
            flag["waiting"] = False
            raise WaitInterrupted()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, old)


class LossStep(nn.Module):
    """The student's losses as a forward(), so DDP sees the pass whose gradients it must average."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_0, x_T, labels, noise, defer_adv=False, traj=None):
        return self.model.losses(x_0, x_T, labels, noise, **({"defer_adv": True} if defer_adv else {}),
                                 **({"traj": traj} if traj is not None else {}))


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """The EMA decay for the update after `step` steps (step ≥ 1).

    Warm-up as in EDM (Karras et al. 2022: ema_rampup_ratio 0.05): the half-life, in steps, is
    min(half-life of `cfg.ema`, ema_rampup · step). A constant 0.9999 has a half-life of 6,931 steps: on a run of a
    few thousand steps that EMA is still mostly the random initialisation (the 2-D board measured sliced Wasserstein
    0.107 for EMA 0.999 vs 0.033 raw after 5,000 steps). Tying the half-life to the steps taken keeps the EMA an
    average over the last ~5% of training at any length, and reaches the configured decay on long runs (0.9999 after
    138,623 steps at 0.05). It depends on the step alone, so resumed runs stay exact.
    """
    if cfg.ema_rampup <= 0 or cfg.ema == 0:
        return cfg.ema
    half_life = min(math.log(0.5) / math.log(cfg.ema), cfg.ema_rampup * step)
    return 0.5 ** (1 / half_life)


def discriminator_step(disc: nn.Module, opt_d, real: torch.Tensor, fake: torch.Tensor, autocast, world: int):
    """One discriminator step on teacher outputs (real) and the student's detached samples (fake); its loss."""
    with autocast:
        loss = disc_loss(disc, real, fake.detach())
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        average_grads(disc.parameters(), world)
    sanitize_grads(disc.parameters())
    opt_d.step()
    return loss.detach()


def average_grads(params, world: int) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def rng_state(device: torch.device) -> list[torch.Tensor]:
    """The global generators dropout draws from: CPU, and the device's on CUDA."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def set_rng_state(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0].cpu())
    if device.type == "cuda" and len(states) > 1:
        torch.cuda.set_rng_state(states[1].cpu(), device)


def probe_pairs(cfg: TrainConfig, holdout: list[str], device, drop: Exclusions) -> dict[str, torch.Tensor] | None:
    """The first `probe_pairs` held-out pairs (fixed for the whole run), or None without held-out shards."""
    pairs = read_pairs(cfg.data, holdout, cfg.probe_pairs, drop.read)
    if pairs is None:
        return None
    return {k: torch.from_numpy(pairs[k]).to(device, torch.float32) for k in ("x_0", "x_T", "label") if k in pairs}


def trained_fields(cfg: TrainConfig) -> frozenset[str]:
    """The record fields a training step reads, all the loader ships: trajectory states are most of a trajectory
    set's bytes, and each field kept is copied three more times on its way to the step."""
    return frozenset({"x_0", "x_T", "label"} | ({"traj"} if cfg.student.trajectory is not None else set()))


def check_sizes(cfg: TrainConfig, manifest: Manifest, pairs: int) -> None:
    """Refuse, before anything is written, a batch the training pairs (`pairs`, after the memorisation filter)
    cannot fill or loader buffers memory cannot hold: a batch of 10^12 pairs once hung at step 0."""
    if cfg.batch > pairs:
        raise ConfigError(f"--batch {cfg.batch:,} is larger than the {pairs:,} training pairs of {cfg.data}; use "
                          f"--batch {pairs:,} or less (or more pairs)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    need = loader_bytes(cfg.batch, cfg.shuffle_buffer, cfg.loader_workers, world, step_pair_bytes(cfg, manifest))
    have = available_memory()
    if have is not None and need > have:
        raise ConfigError(f"--batch {cfg.batch:,} with --shuffle-buffer {cfg.shuffle_buffer:,} and "
                          f"{cfg.loader_workers} loader worker(s) needs ~{need / 2**30:,.1f} GiB for the loader's "
                          f"buffers alone, but {have / 2**30:,.1f} GiB of memory is available; lower them")


def step_pair_bytes(cfg: TrainConfig, manifest: Manifest) -> int:
    """Bytes of one pair as a step reads it (the trained fields, float32)."""
    d = math.prod(manifest.shape)
    states = len(manifest.trajectory_steps or []) if cfg.student.trajectory is not None else 0
    return 4 * (d * (2 + states) + manifest.label_dim)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) the run `cfg.out`; returns {"run", "step", "status": "done" | "preempted"}."""
    cfg = with_pairs(cfg, resume)
    manifest = open_pairs(cfg.data, label="--data")    # every shard checked: nothing corrupt is learned silently
    drop = exclusions(manifest, cfg.data)              # pairs the memorisation filter excluded: never read
    cfg = resolved(cfg, manifest)
    train_names, holdout_names = split_shards(manifest, cfg.holdout_shards)
    counts = {s.name: drop.kept(s) for s in manifest.shards}
    check_sizes(cfg, manifest, sum(counts[n] for n in train_names))
    run, lead = Run(cfg.out), os.environ.get("RANK", "0") == "0"
    if run.location.exists() and not run.location.is_dir():
        raise ConfigError(f"--out {cfg.out} is a file; pass a directory")
    created, locked = not run.path.exists(), False  # (a run on s3:// gets a mirror; nothing is uploaded before
                                                     # its first checkpoint)
    try:
        # Everything opened in the run (the lock, loader workers, logs) is closed by `cleanup`, whatever ends it: a
        # live persistent loader worker would keep the process from exiting after an error.
        with ExitStack() as cleanup:
            lock = cleanup.enter_context(run.lock(f"train --out {cfg.out}")) if lead else None   # one writer
            locked = True
            prepare_run(cfg, manifest, resume, drop.digest(train_names + holdout_names))
            moments = data_moments(cfg, manifest, train_names)
            set_threads(cfg.threads)
            device = pick_device(cfg.device)
            rank, world, local = cleanup.enter_context(process_group(device.type))
            if device.type == "cuda":
                device = torch.device("cuda", local)
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
            return _train(Session(cfg, manifest, train_names, holdout_names, counts, drop, moments, resume, progress,
                                  device, rank, world, cleanup, lock))
    except BaseException:
        if created and locked and Path(run.path).is_dir() and not run.checkpoints():     # nothing worth keeping
            shutil.rmtree(run.path, ignore_errors=True)
        raise


@dataclass
class Session:
    """What one process's training loop works with (`train` sets it up)."""
    cfg: TrainConfig
    manifest: Manifest
    train_names: list[str]
    holdout_names: list[str]
    counts: dict[str, int]                 # pairs each shard keeps after the memorisation filter
    drop: Exclusions
    moments: dict[str, np.ndarray] | None  # μ, s of normalize: standard
    resume: bool
    progress: bool
    device: torch.device
    rank: int
    world: int
    cleanup: ExitStack                     # closes what the loop opens, however it ends
    lock: Lock | None                      # the run's lock (rank 0)


def diverged(cfg: TrainConfig, run: Run, step: int, streak: int) -> DataError:
    """The one line of a run stopped for non-finite losses or weights: when, what was kept, what to try."""
    found = run.checkpoints()
    kept = (f"the last finite checkpoint {run.location}/{CKPT_DIR}/{found[-1].name} is kept" if found else
            "no finite checkpoint was written")
    what = (f"the loss was NaN or inf for {streak} consecutive steps (since step {step - streak + 1}; limit "
            f"nonfinite_steps = {cfg.nonfinite_steps})" if streak else "the weights became NaN or inf")
    return DataError(f"training diverged at step {step}: {what}; {kept}; try a lower --lr than {cfg.lr:g} (or a "
                     f"larger --batch; pairs far from unit scale diverge too) in a new --out")


def _train(s: Session) -> dict:
    cfg, device, world = s.cfg, s.device, s.world
    run, lead = Run(cfg.out), s.rank == 0

    # The student, its EMA, the discriminator and their optimisers.
    torch.manual_seed(cfg.seed)                        # the same initial weights on every rank
    model = student_for(cfg, s.manifest).to(device)    # (a bad student config fails here, before anything is written)
    if s.moments is not None:                          # buffers: the EMA copy and every checkpoint carry them
        model.set_moments(s.moments)
    disc = discriminator_for(cfg, s.manifest)
    disc = disc.to(device) if disc is not None else None
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas) if disc is not None else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, s.rank]).generate_state(1)[0]))  # dropout differs by rank

    # Resume from the newest intact checkpoint.
    step = 0
    if lead:                                           # fails early (exit 2) when --out cannot be written
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    if s.resume and (loaded := run.load_checkpoint(map_location=device, set_aside=lead)) is not None:
        state = loaded[0]
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        set_rng_state(state["rng"]["torch"][s.rank % len(state["rng"]["torch"])], device)
        gen.set_state(state["rng"]["noise"])
        step = state["step"]

    # The step function (DDP, compiled), the latent noise and the data stream from `step` on.
    stepper: nn.Module = LossStep(model)
    if world > 1:
        stepper = nn.parallel.DistributedDataParallel(
            stepper, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        stepper = torch.compile(stepper)
    noise = LatentNoise(gen, s.rank, world)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext())
    # The loader's epochs are built on the kept counts (a shard the filter emptied is left out), so exact resume
    # and once-per-epoch hold over the kept pairs.
    stream = s.cleanup.enter_context(closing(batches(
        cfg.data, [(n, s.counts[n]) for n in s.train_names if s.counts[n]], cfg.batch, cfg.shuffle_buffer, cfg.seed,
        cfg.loader_workers, s.rank, world, start=step, read=s.drop.read, fields=trained_fields(cfg))))

    # The run's files, probes and logs.
    if lead:                                           # the run's files re-anchored where it is now (it may have moved)
        storage.write_text(run.path / "config.json", cfg.model_dump_json(indent=1))
        run.write_split(cfg.data, s.manifest, s.train_names, s.holdout_names,
                        s.drop.digest(s.train_names + s.holdout_names))
        run.trim_log(step)
    probes = probe_pairs(cfg, s.holdout_names, device, s.drop) if lead else None
    store = ProbeStore(run.path / "latents.zarr", step) if probes is not None else None
    tb = tensorboard(run.path, step) if lead and cfg.tensorboard else None
    if tb is not None:
        s.cleanup.callback(tb.close)
    bar = tqdm(total=cfg.steps, initial=step, disable=not (s.progress and lead), desc="train", unit="step",
               dynamic_ncols=True)
    s.cleanup.callback(bar.close)
    log = s.cleanup.enter_context(open(run.path / "train.jsonl", "a")) if lead else None
    t_last, step_last, status = time.perf_counter(), step, "done"
    streak = 0                                         # consecutive steps whose loss was NaN or inf

    def checkpoint() -> bool:
        """Save the step's state (rank 0); False when the weights went non-finite and nothing was written."""
        rngs = [rng_state(device)]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(device))
        if lead:
            s.lock.check(run.location)                 # a lease taken over by another run: stop before writing
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     "rng": {"torch": rngs, "noise": gen.get_state()}}
            if disc is not None:
                state.update(disc=disc.state_dict(), opt_d=opt_d.state_dict())
            return run.save_checkpoint(step, state) is not None
        return True

    with preemption() as flag:
        while step < cfg.steps:
            # One student step (and one discriminator step). Ranks of a DDP job wait out their batch: a rank leaving
            # alone would meet the others' step in the checkpoint's collective.
            try:
                flag["waiting"] = world == 1
                item = next(stream)
                flag["waiting"] = False
            except WaitInterrupted:
                if not checkpoint():
                    raise diverged(cfg, run, step, streak) from None
                status = "preempted"
                break
            batch = {k: v.to(device, torch.float32) for k, v in item.items()}
            with autocast:                             # the forward pass; the adversarial term comes below
                losses = stepper(batch["x_0"], batch["x_T"], batch.get("label"), noise, disc is not None,
                                 batch["traj"] if cfg.student.trajectory else None)
            if disc is not None:                       # one discriminator step per student step
                fake = model.last_sample               # x̂ of this pass, graph attached
                if cfg.update_order == "disc-first":   # official: the discriminator first, on this pass's samples
                    losses["disc"] = discriminator_step(disc, opt_d, batch["x_0"], fake, autocast, world)
                with autocast:                         # then the student against the (updated) discriminator
                    losses["adv"] = model.adversarial_loss(disc)
                losses["total"] = losses["total"] + model.adv_weight * losses["adv"]
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            sanitize_grads(model.parameters())
            opt.step()
            if disc is not None and cfg.update_order == "student-first":
                losses["disc"] = discriminator_step(disc, opt_d, batch["x_0"], fake, autocast, world)
            ema_update(ema, model, ema_decay(cfg, step + 1))
            step += 1
            bar.update(1)

            # Log.
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

            # Probe the EMA on the held-out pairs.
            if store is not None and (step % cfg.probe_every == 0 or step == cfg.steps):
                row = probe(ema, probes["x_0"], probes["x_T"], probes.get("label"))
                store.append(step, row)
                if tb is not None:
                    tb.add_scalar("probe/paired_mse_ema", float(row["paired_mse"]), step)
                    if "latent_mse" in row:
                        tb.add_scalar("probe/latent_mse_ema", float(row["latent_mse"]), step)

            # Stop on SIGTERM or divergence (every rank at the same step), checkpoint.
            stop, bad = flag["term"], not bool(torch.isfinite(losses["total"].detach()))
            if world > 1:
                t = torch.tensor([float(stop), float(bad)], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                stop, bad = bool(t[0].item()), bool(t[1].item())
            streak = streak + 1 if bad else 0
            if streak >= cfg.nonfinite_steps or (streak and step == cfg.steps):
                raise diverged(cfg, run, step, streak)
            if (step % cfg.ckpt_every == 0 or step == cfg.steps or stop) and not checkpoint() and (
                    stop or step == cfg.steps):       # the run would end on weights nothing can use
                raise diverged(cfg, run, step, streak)
            if stop:
                status = "preempted"
                break
    return {"run": str(run), "step": step, "status": status}


def tensorboard(run: Path, step: int):
    """A TensorBoard writer for RUN/tensorboard; on resume, events past `step` are purged."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow and only rank 0 needs it
    return SummaryWriter(str(run / "tensorboard"), purge_step=step or None)
