"""`kdm-pipe`: parse flags → build a validated config (preset, then flags) → call a stage.

Invalid input of any kind prints one message on stderr and exits with code 2 before anything is written.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import BaseModel
from typer.exceptions import TyperException

from kdm_pipe import storage
from kdm_pipe.config import (
    AnalyzeConfig,
    DemoConfig,
    EvaluateConfig,
    FilterConfig,
    ImportConfig,
    RefStatsConfig,
    SampleConfig,
    StatsConfig,
    TrainConfig,
    VerifyConfig,
    build,
    generate_config,
    resolve,
)
from kdm_pipe.errors import ConfigError, DataError, one_line
from kdm_pipe.teachers import TEACHERS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline one-step distillation of diffusion models with a Koopman student.")

PresetOpt = typer.Option(None, "--preset", "-p", help="preset name in manifests/ or a path to a YAML file")
DryRun = typer.Option(False, "--dry-run", help="print the resolved config and exit")
StorageOpt = typer.Option(None, "--storage-option", metavar="KEY=VALUE",
                          help="for s3:// locations: an s3fs option (repeatable), e.g. endpoint_url=http://minio:9000; "
                               "credentials come from the AWS variables / profiles")


def user_errors(fn):
    """The one error boundary, every failure as one line on stderr: invalid input (ConfigError, a path that cannot
    be read or written) → exit 2; corrupt data (DataError) and runtime failures → exit 1. KDM_DEBUG=1 adds the
    traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException):     # typer's own control flow and usage errors
            raise
        except ConfigError as e:
            fail(2, str(e))
        except (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
            fail(2, f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e))
        except DataError as e:
            fail(1, str(e))
        except Exception as e:  # noqa: BLE001  (a failed Ray task, a torch error, a full disk: exit 1, one line)
            fail(1, f"{fn.__name__.rstrip('_')} failed: {type(e).__name__}: {e}")
    return wrapper


def fail(code: int, message: str) -> None:
    if os.environ.get("KDM_DEBUG"):
        traceback.print_exc()
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def finish(cfg: BaseModel, dry_run: bool) -> bool:
    if dry_run:
        typer.echo(cfg.model_dump_json(indent=2))
    return dry_run


@app.command()
@user_errors
def generate(
    teacher: Optional[str] = typer.Option(None, help=f"teacher: {', '.join(TEACHERS)}"),
    checkpoint: Optional[Path] = typer.Option(None, help="teacher weights (edm: an official .pkl or a .pt + .json)"),
    shards: Optional[int] = typer.Option(None, help="number of tar shards"),
    pairs_per_shard: Optional[int] = typer.Option(None, help="pairs in each shard"),
    out: Optional[Path] = typer.Option(None, help="output directory (manifest.json + shards)"),
    workers: Optional[int] = typer.Option(None, help="concurrent teacher workers (Ray tasks)"),
    address: Optional[str] = typer.Option(None, help="address of an existing Ray cluster (default: start a local one)"),
    steps: Optional[int] = typer.Option(None, help="sampler steps N (NFE = 2N − 1 for Heun)"),
    solver: Optional[str] = typer.Option(None, help="heun | euler"),
    sigma_min: Optional[float] = typer.Option(None), sigma_max: Optional[float] = typer.Option(None),
    rho: Optional[float] = typer.Option(None),
    trajectory: Optional[str] = typer.Option(None, help="store trajectories: none | all | every-K"),
    seed: Optional[int] = typer.Option(None, help="first seed; shard k holds the next pairs_per_shard seeds after k·K"),
    batch: Optional[int] = typer.Option(None, help="pairs per sampler batch / tar record"),
    x0_dtype: Optional[str] = typer.Option(None, "--x-0-dtype", "--x0-dtype",
                                           help="storage dtype of x_0: float16 | float32 | float64"),
    xt_dtype: Optional[str] = typer.Option(None, "--x-T-dtype", "--xT-dtype", help="storage dtype of x_T"),
    threads_per_worker: Optional[int] = typer.Option(None), cpus_per_worker: Optional[float] = typer.Option(None),
    gpus_per_worker: Optional[float] = typer.Option(None), device: Optional[str] = typer.Option(None),
    preset: Optional[str] = PresetOpt, dry_run: bool = DryRun,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    storage_option: Optional[list[str]] = StorageOpt,
):
    """Run the teacher's ODE sampler in Ray workers and write (x_T, x_0) pairs into tar shards."""
    storage.set_options(storage_option)
    flags: dict[str, Any] = dict(shards=shards, pairs_per_shard=pairs_per_shard, out=out, workers=workers,
                                 address=address, trajectory=trajectory, seed=seed, batch=batch, x0_dtype=x0_dtype,
                                 xT_dtype=xt_dtype, threads_per_worker=threads_per_worker,
                                 cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, device=device,
                                 sampler=dict(steps=steps, solver=solver, sigma_min=sigma_min, sigma_max=sigma_max,
                                              rho=rho))
    cfg = generate_config(preset, flags, teacher=teacher, checkpoint=checkpoint)
    if finish(cfg, dry_run):
        return
    from stages import generate as stage
    stage.run(cfg, progress=not quiet)


@app.command()
@user_errors
def verify(directory: Path = typer.Argument(..., help="pair directory written by generate"),
           storage_option: Optional[list[str]] = StorageOpt):
    """Recompute every shard's checksum and contents against the manifest; non-zero exit naming each bad shard."""
    storage.set_options(storage_option)
    cfg = build(VerifyConfig, dict(data=directory), where="verify config")
    from stages import verify as stage
    stage.run(cfg)


@app.command()
@user_errors
def stats(
    target: str = typer.Argument(..., help="a pair directory written by generate, or `ref` (then SOURCE)"),
    source: Optional[str] = typer.Argument(None, help="with `ref`: images (folder, EDM zip, .npy, "
                                           "sklearn-digits, a pair directory or a `sample` output)"),
    from_: Optional[Path] = typer.Option(None, "--from", help="with `ref`: export a pair directory's teacher-set "
                                         "statistics (computed first when missing or stale)"),
    out: Optional[Path] = typer.Option(None, help="with `ref`: the reference .npz to write (mu, sigma)"),
    detector: Optional[Path] = typer.Option(None, help="TorchScript feature net, e.g. inception-2015-12-05.pt "
                                            "(default: pixel features)"),
    num: Optional[int] = typer.Option(None, help="with `ref SOURCE`: images used (default: all)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(2, min=1), address: Optional[str] = typer.Option(None),
    cov_max_dim: int = typer.Option(1024, min=0, help="store covariances only up to this flattened dimension"),
    batch: int = typer.Option(250, min=1, help="images per detector / student batch"),
    run: Optional[Path] = typer.Option(None, "--run", help="a trained run: statistics of its latents over DIR's "
                                       "pairs → RUN/latents.zarr"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    storage_option: Optional[list[str]] = StorageOpt,
):
    """`stats DIR [--detector PATH]`: per-shard sufficient statistics and x_0 feature statistics (Ray) merged into
    DIR/stats.zarr. `stats ref SOURCE --out REF.npz`: FID reference statistics (EDM format) of SOURCE's images;
    `stats ref --from DIR --out REF.npz`: the same from DIR's stats.zarr (the whole teacher set).
    `stats DIR --run RUN`: statistics of RUN's latents over DIR's pairs (RUN/latents.zarr)."""
    storage.set_options(storage_option)
    stats_flags = dict(workers=workers, address=address, cov_max_dim=cov_max_dim, detector=detector, batch=batch)
    if target == "ref":
        if (source is None and from_ is None) or out is None:
            raise ConfigError("usage: kdm-pipe stats ref (SOURCE | --from DIR) --out REF.npz [--detector PATH] "
                              "[--num N]")
        ref = build(RefStatsConfig, dict(source=source, data=from_, out=out, detector=detector, num=num,
                                         device=device), where="stats ref config")
        from stages import stats as stage
        stage.reference(ref, build(StatsConfig, dict(data=from_, **stats_flags), where="stats config")
                        if from_ is not None else None, progress=not quiet)
        return
    if source is not None or from_ is not None:
        raise ConfigError(f"stats {target}: unexpected second argument {source or '--from'!r} (only `stats ref` "
                          f"takes one)")
    cfg = build(StatsConfig, dict(data=Path(target), run=run, **stats_flags), where="stats config")
    from stages import stats as stage
    stage.run(cfg, progress=not quiet)


@app.command("filter")
@user_errors
def filter_(
    directory: Path = typer.Argument(..., help="pair directory written by generate or import"),
    ref: str = typer.Option(..., help="the teacher's training images: folder of PNGs, EDM zip, .npy, sklearn-digits"),
    metric: str = typer.Option("l2", help="l2 (pixels) | features (--detector's feature space)"),
    detector: Optional[Path] = typer.Option(None, help="TorchScript feature net, e.g. inception-2015-12-05.pt"),
    rule: str = typer.Option("relative", help="relative: d1 < threshold · mean(d2..dk) (Carlini et al. 2023) | "
                             "absolute: d1 < threshold"),
    threshold: Optional[float] = typer.Option(None, help="default: 0.5 (relative), 0.1 (absolute: RMS distance)"),
    k: int = typer.Option(50, "-k", "--k", help="nearest reference images searched"),
    chunk: int = typer.Option(2048, help="queries × reference rows per distance block (bounds memory)"),
    workers: int = typer.Option(2, min=1), address: Optional[str] = typer.Option(None),
    gpus_per_worker: float = typer.Option(0.0), device: str = typer.Option("auto", help="auto | cpu | cuda"),
    replace: bool = typer.Option(False, "--replace", help="replace a filter recorded with other settings"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    storage_option: Optional[list[str]] = StorageOpt,
):
    """Flag the teacher samples that copy its training data (nearest reference images) and exclude them from train,
    stats and evaluate; the decision is recorded in DIR/manifest.json, the report in DIR/filter.html."""
    storage.set_options(storage_option)
    cfg = build(FilterConfig, dict(data=directory, ref=ref, metric=metric, detector=detector, rule=rule,
                                   threshold=threshold, k=k, chunk=chunk, workers=workers, address=address,
                                   gpus_per_worker=gpus_per_worker, device=device, replace=replace),
                where="filter config")
    from stages import filter_pairs as stage
    stage.run(cfg, progress=not quiet)


@app.command()
@user_errors
def train(
    data: Optional[Path] = typer.Option(None, help="pair directory"),
    out: Optional[Path] = typer.Option(None, help="run directory"),
    steps: Optional[int] = typer.Option(None), batch: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None), ema: Optional[float] = typer.Option(None),
    ema_rampup: Optional[float] = typer.Option(None, help="EMA half-life ≤ this fraction of the steps so far (0: off)"),
    update_order: Optional[str] = typer.Option(None, help="disc-first (official) | student-first"),
    seed: Optional[int] = typer.Option(None),
    student: Optional[str] = typer.Option(None, help="kdm | kd (the direct-regression baseline)"),
    operator: Optional[str] = typer.Option(None, help="affine | linear | decomposed"),
    spectrum_prior: Optional[str] = typer.Option(None, help="none | uniform | gradual | circle (eigenvalue prior)"),
    mlp: Optional[str] = typer.Option(None, help="vector students: official (the KDM 2-D nets) | linear-head"),
    distance: Optional[str] = typer.Option(None, help="l2 | pseudo_huber | lpips | l2+lpips"),
    w_adv: Optional[float] = typer.Option(None, help="adversarial weight (images; 0 turns the discriminator off)"),
    lpips_vgg: Optional[Path] = typer.Option(None, help="torchvision's vgg16-397923af.pth (for LPIPS)"),
    lpips_lin: Optional[Path] = typer.Option(None, help="lpips' weights/v0.1/vgg.pth (for LPIPS)"),
    loader_workers: Optional[int] = typer.Option(None), device: Optional[str] = typer.Option(None),
    threads: Optional[int] = typer.Option(None),
    ckpt_every: Optional[int] = typer.Option(None), probe_every: Optional[int] = typer.Option(None),
    holdout_shards: Optional[int] = typer.Option(None, help="last shards kept out of training, for evaluation"),
    amp: Optional[str] = typer.Option(None, help="off | bf16 (autocast)"),
    tf32: Optional[bool] = typer.Option(None, "--tf32/--no-tf32", help="TF32 matmuls on NVIDIA GPUs"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the student"),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard"),
    normalize: Optional[str] = typer.Option(None, help="vector data: none | standard (x_0 by the training shards' "
                                            "mean/std from stats.zarr; default none; images: none only)"),
    normalize_x_t: Optional[bool] = typer.Option(None, "--normalize-x-T/--no-normalize-x-T",
                                                 help="with --normalize standard, standardise x_T too"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    preset: Optional[str] = PresetOpt, dry_run: bool = DryRun, quiet: bool = typer.Option(False, "--quiet", "-q"),
    storage_option: Optional[list[str]] = StorageOpt,
):
    """Fit the Koopman student on streamed pairs; checkpoints and logs under --out.
    Multi-GPU: torchrun ... -m kdm_pipe.cli train."""
    storage.set_options(storage_option)
    student_flags = dict(kind=student, operator=operator, spectrum_prior=spectrum_prior, mlp=mlp, distance=distance,
                         w_adv=w_adv, lpips_vgg=lpips_vgg, lpips_lin=lpips_lin)
    flags = dict(data=data, out=out, steps=steps, batch=batch, lr=lr, ema=ema, ema_rampup=ema_rampup,
                 update_order=update_order, seed=seed,
                 loader_workers=loader_workers, device=device, threads=threads, ckpt_every=ckpt_every,
                 probe_every=probe_every, holdout_shards=holdout_shards, amp=amp, tf32=tf32, compile=compile,
                 tensorboard=tensorboard, normalize=normalize, normalize_x_T=normalize_x_t,
                 student={k: v for k, v in student_flags.items() if v is not None})
    cfg = resolve(TrainConfig, "train", preset, flags)
    if finish(cfg, dry_run):
        return
    from stages import train as stage
    if stage.run(cfg, resume=resume, progress=not quiet)["status"] == "preempted":
        raise typer.Exit(stage.PREEMPTED_EXIT)


@app.command()
@user_errors
def evaluate(
    run: Path = typer.Argument(..., help="run directory written by train"),
    data: Optional[Path] = typer.Option(None, help="pair directory (default: the run's)"),
    num: Optional[int] = typer.Option(None, help="held-out pairs for the reported metrics"),
    weights: Optional[str] = typer.Option(None, help="auto | ema | raw"),
    seed: Optional[int] = typer.Option(None), device: Optional[str] = typer.Option(None),
    detector: Optional[Path] = typer.Option(None, help="TorchScript feature net (inception-2015-12-05.pt); "
                                            "default: pixel features"),
    ref: Optional[str] = typer.Option(None, help="FID reference: EDM .npz (mu, sigma) or images to compute it from"),
    fid_num: Optional[int] = typer.Option(None, help="fresh one-step samples for the FID against --ref (50000)"),
    batch: Optional[int] = typer.Option(None, help="images per batch"),
    set_num: Optional[int] = typer.Option(None, help="fresh samples compared with the whole teacher set "
                                          "(stats.zarr; default: min(set size, 50000))"),
    steps: Optional[int] = typer.Option(None, help="student sampling steps (> 1: trajectory-supervised students)"),
    preset: Optional[str] = PresetOpt, dry_run: bool = DryRun,
    storage_option: Optional[list[str]] = StorageOpt,
):
    """Metrics of the student's one-step samples against held-out teacher pairs → RUN/eval.json and figures."""
    storage.set_options(storage_option)
    cfg = resolve(EvaluateConfig, "evaluate", preset,
                  dict(run=run, data=data, num=num, weights=weights, seed=seed, device=device, detector=detector,
                       ref=ref, fid_num=fid_num, batch=batch, set_num=set_num, steps=steps))
    if finish(cfg, dry_run):
        return
    from stages import evaluate as stage
    stage.run(cfg)


@app.command()
@user_errors
def sample(
    run: Path = typer.Argument(..., help="run directory written by train"),
    out: Path = typer.Option(..., help="output directory (PNGs per seed, samples.npz, grid.png, samples.json)"),
    num: int = typer.Option(64, min=1, help="samples, from seeds SEED … SEED+NUM−1"),
    seed: int = typer.Option(0, min=0, help="first seed"),
    weights: str = typer.Option("auto", help="auto (the run's recorded choice, RUN/weights.json) | ema | raw"),
    class_label: Optional[int] = typer.Option(None, "--class", help="class for every sample (conditional runs)"),
    batch: int = typer.Option(250, min=1), device: str = typer.Option("auto", help="auto | cpu | cuda"),
    steps: int = typer.Option(1, help="sampling steps (> 1: trajectory-supervised students)"),
    storage_option: Optional[list[str]] = StorageOpt,
):
    """One-step samples of a trained student, written as EDM writes them."""
    storage.set_options(storage_option)
    cfg = build(SampleConfig, dict(run=run, out=out, num=num, seed=seed, weights=weights, class_label=class_label,
                                   batch=batch, device=device, steps=steps), where="sample config")
    from stages import sample as stage
    stage.run(cfg)


@app.command("import")
@user_errors
def import_(
    src: Optional[Path] = typer.Argument(None, help="kdm-npz / get: the folder; npy: a (T, N, ...) stack "
                                         "(x_T at index 0, x_0 at −1); omit with --x-T/--x-0"),
    out: Optional[Path] = typer.Option(None, help="output directory (manifest.json + shards)"),
    format: str = typer.Option(..., "--format", help="kdm-npz | get | npy"),
    x_t: Optional[Path] = typer.Option(None, "--x-T", help="npy: (N, ...) x_T array"),
    x_0: Optional[Path] = typer.Option(None, "--x-0", help="npy: (N, ...) x_0 array"),
    labels: Optional[Path] = typer.Option(None, help="npy: (N,) int classes or (N, label_dim) one-hot"),
    label_dim: Optional[int] = typer.Option(None, help="number of classes for int labels (default: max + 1)"),
    order: Optional[str] = typer.Option(None, help="kdm-npz / npy stack: auto | xT-first | x0-first "
                                        "(auto: the end that looks like N(0, sigma_max²) noise is x_T)"),
    sigma_max: Optional[float] = typer.Option(None, help="std of x_T in the source (default 80; 1 for a stack)"),
    tolerance: Optional[float] = typer.Option(None, help="relative tolerance of the check std(x_T) ≈ sigma_max"),
    pairs_per_shard: Optional[int] = typer.Option(None, help="at most this many pairs per shard"),
    batch: Optional[int] = typer.Option(None, help="pairs per tar record"),
    x0_dtype: Optional[str] = typer.Option(None, "--x-0-dtype", "--x0-dtype",
                                           help="storage dtype of x_0: float16 | float32 | float64"),
    xt_dtype: Optional[str] = typer.Option(None, "--x-T-dtype", "--xT-dtype", help="storage dtype of x_T"),
    ends_only: bool = typer.Option(False, "--ends-only", help="keep only x_T and x_0 of trajectory sources"),
    times: Optional[str] = typer.Option(None, help="time of each stored state in source order, comma-separated "
                                        "(EDM σ_max … 0, flow matching 1 … 0; default: evenly from sigma_max to 0)"),
    dry_run: bool = DryRun,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    storage_option: Optional[list[str]] = StorageOpt,
):
    """Convert an existing pair set (official KDM .npz folder, GET files, .npy arrays) into verified shards."""
    storage.set_options(storage_option)
    flags: dict[str, Any] = dict(src=src, out=out, format=format, x_T=x_t, x_0=x_0, labels=labels,
                                 label_dim=label_dim, order=order, sigma_max=sigma_max, tolerance=tolerance,
                                 pairs_per_shard=pairs_per_shard, batch=batch, x0_dtype=x0_dtype, xT_dtype=xt_dtype,
                                 trajectory=False if ends_only else None, times=times)
    cfg = build(ImportConfig, flags, where="import config")
    if finish(cfg, dry_run):
        return
    from stages import import_pairs as stage
    stage.run(cfg, progress=not quiet)


@app.command()
@user_errors
def analyze(
    run: Path = typer.Argument(..., help="run directory written by train"),
    num: int = typer.Option(2000, min=2, help="held-out pairs analysed"),
    seed: int = typer.Option(0, help="seed of the clusterings, the noise baseline and the interpolation endpoints"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    storage_option: Optional[list[str]] = StorageOpt,
):
    """Koopman spectrum, 2-D noise structure and outliers, latent proximity, interpolations → RUN/analysis/."""
    storage.set_options(storage_option)
    cfg = build(AnalyzeConfig, dict(run=run, num=num, seed=seed, device=device), where="analyze config")
    from stages import analyze as stage
    stage.run(cfg)


@app.command()
@user_errors
def demo(
    preset: str = typer.Option("digits", "--preset", "-p", help="preset to run end to end (digits: real 8×8 images; "
                               "checkerboard-quick: a reduced 2-D setup; checkerboard: the official one, hours "
                               "on a CPU)"),
    out: Path = typer.Option(Path("runs/demo"), help="directory for pairs/, kdm/, kd/ and report.html"),
    scale: float = typer.Option(1.0, min=0.01, max=1.0, help="shrink pairs per shard and training steps (quick look)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """The whole pipeline on a preset: generate → verify → filter (memorised samples) → stats → train KDM and the KD
    baseline → evaluate → report. `--scale 0.1` is the quick look (≈ 2 min on 2 quiet cores; the full digits demo
    ≈ 7 min)."""
    cfg = build(DemoConfig, dict(preset=preset, out=out, scale=scale), where="demo config")
    from stages import demo as stage
    stage.run(cfg, progress=not quiet)


teacher_app = typer.Typer(no_args_is_help=True, help="Train EDM teachers on image data.")
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("train")
@user_errors
def teacher_train(
    data: Optional[str] = typer.Option(None, help="folder or EDM .zip of images, an .npy array, or sklearn-digits"),
    out: Optional[Path] = typer.Option(None, help="run directory (config.json, train.jsonl, teacher.pt + .json)"),
    arch: Optional[str] = typer.Option(None, help="U-Net preset: ddpmpp | ncsnpp | adm"),
    model_channels: Optional[int] = typer.Option(None, help="overrides the preset"),
    channel_mult: Optional[str] = typer.Option(None, help="comma-separated, e.g. 1,2 (overrides the preset)"),
    num_blocks: Optional[int] = typer.Option(None, help="blocks per resolution (overrides the preset)"),
    attn_resolutions: Optional[str] = typer.Option(None, help="comma-separated, e.g. 16 ('' for none)"),
    dropout: Optional[float] = typer.Option(None),
    precond: Optional[str] = typer.Option(None, help="edm | vp | ve (each with EDM's matching loss)"),
    cond: Optional[bool] = typer.Option(None, "--cond/--uncond", help="condition on the data's class labels"),
    steps: Optional[int] = typer.Option(None), batch: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None), lr_warmup: Optional[int] = typer.Option(None),
    ema_halflife_kimg: Optional[float] = typer.Option(None),
    ema_beta: Optional[float] = typer.Option(None, help="fixed EMA decay per step (overrides the half-life)"),
    seed: Optional[int] = typer.Option(None), device: Optional[str] = typer.Option(None),
    threads: Optional[int] = typer.Option(None), log_every: Optional[int] = typer.Option(None),
    ckpt_every: Optional[int] = typer.Option(None),
    grid: Optional[int] = typer.Option(None, help="samples drawn into samples.png at the end (0: none)"),
    dry_run: bool = DryRun, quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Train an EDM teacher (EDM loss, Adam, EMA) on images; use it with `generate --teacher edm --checkpoint`."""
    from kdm_pipe.teachers.training import TeacherTrainConfig
    flags = dict(data=data, out=out, arch=arch, model_channels=model_channels, channel_mult=channel_mult,
                 num_blocks=num_blocks, attn_resolutions=attn_resolutions, dropout=dropout, precond=precond,
                 cond=cond, steps=steps, batch=batch, lr=lr, lr_warmup=lr_warmup,
                 ema_halflife_kimg=ema_halflife_kimg, ema_beta=ema_beta, seed=seed, device=device, threads=threads,
                 log_every=log_every, ckpt_every=ckpt_every, grid=grid)
    cfg = build(TeacherTrainConfig, flags, where="teacher train config")
    if finish(cfg, dry_run):
        return
    from stages import teacher as stage
    stage.run_train(cfg, progress=not quiet)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
