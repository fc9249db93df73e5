"""Evaluation of a trained student against held-out teacher pairs, for vector and image data.

Held-out shards never reach the trainer. Their pairs are split in two (`heldout_split`): the selection split
(the first half, at most SELECTION_MAX pairs) chooses which weights a run's consumers use — EMA or raw, whichever
one-step samples are closer *in distribution* to the teacher's (`weight_choice`: sliced Wasserstein for vectors,
Fréchet distance of pooled pixels for images; a paired error would favour blurry, regression-like students) —
and the report split (the pairs after it) is what every reported number is computed on, for both weights. The
choice is recorded once per checkpoint in RUN/weights.json, so `evaluate`, `sample` and `analyze` pick the same
weights whichever runs first. Each number comes with two references: an untrained student of the same init (the
floor of "learned nothing") and, for distribution metrics, teacher-vs-teacher on the two halves of the report split
(the metric's own noise floor).
Images are also compared in a feature space (`--detector`, default pixels) and, with `--ref`, by FID of fresh
one-step samples from seeds 0… against reference statistics.
Latent pairs (a VAE's latents, manifest `latent`) are decoded through the recorded VAE (kdm_pipe/teachers/vae.py) for
every image metric and figure (the whole-set FD against the decoded set's statistics that `stats` computed); their
paired errors are reported twice: in latent space (`latent_mse`, …) and on the decoded images (`mse`, `psnr`, …). The
weights are chosen on the latents.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from sklearn.cluster import KMeans

from kdm_pipe import storage
from kdm_pipe.config import CheckerboardTeacherConfig, ConfigError, EvaluateConfig, GenerateConfig
from kdm_pipe.datasets import BUILTIN
from kdm_pipe.exclusions import Exclusions, exclusions
from kdm_pipe.feature_stats import set_halves, set_reference, space_name
from kdm_pipe.integrity import open_pairs
from kdm_pipe.metrics import checkerboard_mask, frechet_distance_between, mmd_rbf, paired_errors, sliced_wasserstein
from kdm_pipe.metrics.detectors import features, load_detector
from kdm_pipe.metrics.fid import (
    FID_NUM,
    FeatureStats,
    fid_from_stats,
    image_metrics,
    load_ref_stats,
    reference_stats,
    stream_sums,
)
from kdm_pipe.normalization import copy_moments
from kdm_pipe.plots import image_rows, pairs_scatter
from kdm_pipe.run import EVAL, Run, per_steps
from kdm_pipe.runtime import pick_device
from kdm_pipe.sampling import schedule, seed_noise, solve
from kdm_pipe.shards import read_pairs
from kdm_pipe.stats import STORE
from kdm_pipe.student import is_image
from kdm_pipe.teachers import build_teacher
from kdm_pipe.teachers.vae import decoder as vae_decoder
from kdm_pipe.trained import latest_checkpoint, load_students, student_for

WEIGHTS_JSON = "weights.json"
SELECTION_MAX = 4096          # held-out pairs that choose the weights (the rest is the report split)
POOL_TO = 16                  # images are average-pooled to at most POOL_TO × POOL_TO pixels for the choice


def heldout_pairs(data: Path, names: list[str], num: int, drop: Exclusions | None = None) -> dict[str, np.ndarray]:
    """The first `num` pairs of held-out shards `names`, without those the memorisation filter excluded; the shards
    are checked against the manifest first (`open_pairs`) and their values must be finite (`read_pairs`)."""
    manifest = open_pairs(data, names)
    drop = drop if drop is not None else exclusions(manifest, data)
    pairs = read_pairs(data, names, num, drop.read)
    if pairs is None:
        raise ConfigError(f"no held-out pairs in {data}: train with holdout_shards ≥ 1")
    return pairs


def heldout_split(run: Path, data: Path | None = None, num: int | None = None) -> tuple[dict, dict | None]:
    """(selection pairs, report pairs) of a run's held-out shards: the first ⌊n/2⌋ (at most SELECTION_MAX) pairs
    select the weights, up to `num` of the pairs after them are reported on (None: the report split not read)."""
    r = Run(run)
    data, holdout = r.data_dir(data), r.split["holdout"]
    manifest = r.manifest(data)
    drop = exclusions(manifest, data)
    counts = {s.name: drop.kept(s) for s in manifest.shards}
    n = sum(counts.get(name, 0) for name in holdout)
    if n < 2:
        raise ConfigError(f"{run} has {n} held-out pairs in {data}; evaluation needs ≥ 2: "
                          f"train with holdout_shards ≥ 1")
    select = min(n // 2, SELECTION_MAX)
    pairs = heldout_pairs(data, holdout, select + (num or 0), drop)
    head = {k: v[:select] for k, v in pairs.items()}
    return head, ({k: v[select:] for k, v in pairs.items()} if num else None)


def pooled(x: np.ndarray) -> np.ndarray:
    """Images (N, C, H, W) average-pooled by an integer factor to at most POOL_TO px a side, flattened."""
    f = max(1, -(-x.shape[-1] // POOL_TO))
    n, c, h, w = x.shape
    x = x[:, :, : h - h % f, : w - w % f].reshape(n, c, h // f, f, w // f, f).mean(axis=(3, 5))
    return x.reshape(n, -1)


def choice_distance(samples: np.ndarray, ref: np.ndarray) -> float:
    """The distribution distance the weights are chosen on (see `weight_choice`)."""
    if samples.ndim == 4:
        return frechet_distance_between(pooled(samples), pooled(ref))
    return sliced_wasserstein(samples.reshape(len(samples), -1), ref.reshape(len(ref), -1), seed=0)


def weight_choice(run: Path, device: torch.device | str = "cpu", batch: int = 512, data: Path | None = None,
                  models: dict | None = None, ckpt: Path | None = None) -> dict[str, Any]:
    """The run's choice between its EMA and raw weights, computed once per checkpoint and kept in RUN/weights.json.

    Both weights' one-step samples from the first half of the selection split's x_T are compared with the teacher
    outputs x_0 of its second half — samples against independent teacher samples, as the reported distribution
    metrics are, so that being close to one's own pair earns nothing: sliced Wasserstein on vectors, Fréchet
    distance on images pooled to ≤ 16 px (pixels, so that every consumer can compute it without a feature
    network). The lower one is chosen.
    """
    run = Path(run)
    ckpt = ckpt or latest_checkpoint(run)             # `models` were loaded from `ckpt` (checked once, by the caller)
    if ckpt is None:
        raise ConfigError(f"{run} has no checkpoints; train it first with `kdm-pipe train --out {run}`")
    path = run / WEIGHTS_JSON
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("checkpoint") == ckpt.name:
            return record
    device = pick_device(device) if isinstance(device, str) else device
    models = models or load_students(run, ckpt=ckpt, device=device)[0]
    select, _ = heldout_split(run, data)
    h = len(select["x_0"]) // 2
    labels = None if select.get("label") is None else select["label"][:h]
    samples = {w: apply(m, select["x_T"][:h], labels, device, batch) for w, m in models.items()}
    scores = {w: choice_distance(x, select["x_0"][h:]) for w, x in samples.items()}
    record = {"weights": min(scores, key=scores.get), "checkpoint": ckpt.name,
              "criterion": "fd_pooled_pixels" if select["x_0"].ndim == 4 else "sliced_wasserstein",
              "scores": scores, "selection_pairs": len(select["x_0"]),
              "note": "EMA or raw: the lower distribution distance of one-step samples to the teacher's outputs on the "
                      "held-out selection split (never the reported split)"}
    try:
        storage.write_text(path, json.dumps(record, indent=1))
    except OSError:                                    # a read-only run directory: choose, do not record
        pass
    return record


def chosen_weights(run: Path, weights: str = "auto", device: torch.device | str = "cpu", models: dict | None = None,
                   ckpt: Path | None = None) -> str:
    """`ema` / `raw` as given; `auto`: the run's recorded choice (`weight_choice`), computed now if not yet (from
    `models`, both weights as `load_students` gives them with `ckpt`, when the caller has them)."""
    if weights != "auto":
        return weights
    Run(run).require()
    return weight_choice(run, device, models=models, ckpt=ckpt)["weights"]


@torch.no_grad()
def apply(fn: Callable, x: np.ndarray, labels: np.ndarray | None, device, batch: int = 512) -> np.ndarray:
    """fn(x, labels) over `x` in batches on `device` (one-step sampling: fn = the student), back as numpy."""
    out = []
    for b in range(0, len(x), batch):
        y = None if labels is None else torch.as_tensor(labels[b:b + batch], dtype=torch.float32, device=device)
        out.append(fn(torch.as_tensor(x[b:b + batch], dtype=torch.float32, device=device), y).cpu().numpy())
    return np.concatenate(out)


def sampler(model: torch.nn.Module, steps: int) -> Callable:
    """The student's `steps`-step sampler fn(x_T, labels): the student itself for one step (today's sampler, bit for
    bit), else KDM.sample (trajectory-supervised students); ConfigError if the student cannot take `steps`."""
    if steps == 1:
        return model
    try:
        model.schedule(steps)
    except AttributeError:
        raise ConfigError(f"--steps {steps}: only KDM students sample in several steps; this one is "
                          f"{type(model).__name__}") from None
    except ValueError as e:
        raise ConfigError(f"--steps {steps}: {e}") from None
    return lambda x, y: model.sample(x, y, steps)


def network_passes(kind: str, steps: int) -> int:
    """Network passes per sample of a `steps`-step student (the one vocabulary of `sample`, `evaluate` and the
    reports; a teacher's NFE counts the same thing): KD is one network, KDM runs its encoder E_T and decoder D, plus
    a decode and a re-encode at each of the steps − 1 stops (the operator is a matrix product, not a network)."""
    return steps if kind == "kd" else 2 * steps


def declared_support(teacher: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray] | None:
    """The support the pairs' teacher declares (the checkerboard's black squares), or None (the Gaussian mixture,
    EDM and image teachers, imported pairs)."""
    if teacher.get("name") != "checkerboard":
        return None
    board = CheckerboardTeacherConfig.model_validate(teacher.get("params", {}))
    return functools.partial(checkerboard_mask, size=board.size, extent=board.extent)


def distribution_metrics(x: np.ndarray, ref: np.ndarray, seed: int, teacher: dict[str, Any]) -> dict:
    m = {"sliced_wasserstein": sliced_wasserstein(x, ref, seed=seed), "mmd": mmd_rbf(x, ref, seed=seed)}
    support = declared_support(teacher)
    if support is not None:
        m["off_support"] = float(1.0 - support(x).mean())
    return m


def speed(fn, n: int, repeats: int = 3) -> float:
    """Best-of samples/s (the first call is a warm-up)."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    run = Path(cfg.run)
    if not (run / "config.json").is_file():
        raise ConfigError(f"{run} is not a training run (no config.json); pass the --out directory of `kdm-pipe train`")
    device = pick_device(cfg.device)
    net = load_detector(cfg.detector, device)          # bad --detector / --ref: refused before any work
    if cfg.ref and not Path(cfg.ref).exists() and cfg.ref not in BUILTIN:
        raise ConfigError(f"--ref {cfg.ref} does not exist; pass an EDM-format .npz (mu, sigma) or images to compute "
                          f"it from (a folder, EDM zip, .npy, sklearn-digits)")
    data = Run(run).data_dir(cfg.data)
    models, tcfg, manifest, step, ckpt = load_students(run, device=device, data=cfg.data)
    decode = vae_decoder(manifest, cfg.vae, device, data)     # latent pairs: a VAE not found is refused here
    # The whole teacher set's feature statistics (stats.zarr); a stale store is refused here, before any work.
    space = space_name(net.name, manifest.latent)
    set_ref = (set_reference(data, manifest, space, "" if cfg.detector is None else f" --detector {cfg.detector}")
               if is_image(manifest.shape) else None)
    sampler(models["ema"], cfg.steps)                  # a --steps the student cannot take: refused before any write
    # EMA or raw: the run's recorded choice (computed now on the selection split if no consumer has yet).
    choice = weight_choice(run, device, cfg.batch, data, models, ckpt)
    chosen = choice["weights"] if cfg.weights == "auto" else cfg.weights
    _, report = heldout_split(run, data, cfg.num)
    if not len(report["x_0"]):
        raise ConfigError(f"{run}: no held-out pairs left to report on after the selection split; generate more "
                          f"shards or raise holdout_shards")
    labels = lambda p: p.get("label")  # noqa: E731
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731

    torch.manual_seed(tcfg.seed)                       # the same init the run started from
    untrained = student_for(tcfg, manifest).to(device).eval()
    copy_moments(models[chosen], untrained)            # normalised runs start in the data's units too
    x_T, x_0 = report["x_T"], report["x_0"]
    other = "raw" if chosen == "ema" else "ema"
    fns = {"student": sampler(models[chosen], cfg.steps), f"{other}_weights": sampler(models[other], cfg.steps),
           "untrained": sampler(untrained, cfg.steps)}
    outputs = {name: apply(fn, x_T, labels(report), device, cfg.batch) for name, fn in fns.items()}
    model = fns["student"]
    results: dict[str, Any] = {"run": str(run), "data": str(data), "step": step, "weights": chosen,
                               "weights_choice": choice, "num_pairs": len(x_0), "steps": cfg.steps}
    figure = run / per_steps("samples.png", cfg.steps)
    if decode is not None:                             # latent errors, then images from here on
        for name, x in outputs.items():
            results[name] = {f"latent_{k}": v for k, v in paired_errors(flat(x), flat(x_0)).items() if k != "psnr"}
        outputs = {name: decode(x, cfg.batch) for name, x in outputs.items()}
        x_0 = decode(x_0, cfg.batch)
        results["latent"] = manifest.latent.model_dump()
    for name, x in outputs.items():
        results.setdefault(name, {}).update(paired_errors(flat(x), flat(x_0)))
    # Distribution metrics compare samples of the first half's x_T with the teacher's samples of the second half:
    # the same sizes as the teacher-vs-teacher floor, and no pairing between the two sides.
    h = len(x_0) // 2
    samples = {**{name: x[:h] for name, x in outputs.items()}, "teacher_floor": x_0[:h]}
    if is_image(manifest.shape):
        image_results(results, cfg, net, samples, x_0[h:], device)
        results["fd_teacher_samples"] = [h, len(x_0) - h]     # (samples, held-out teacher samples) it compares
        results["fid"] = fid_report(cfg, net, model, manifest, device, decode) if cfg.ref else None
        results["fd_set"] = set_fd_report(cfg, net, model, manifest, data, set_ref, device, decode)
        shown = (f"{tcfg.student.kind.upper()} student x̂_0 ({chosen} weights, step {step}), {cfg.steps} step(s) "
                 f"from the same x_T")
        image_rows(figure, {"teacher x_0 (held-out pairs)": x_0[:16],
                                         shown: outputs["student"][:16]}, scale=max(1, 64 // x_0.shape[-1]))
        results["figures"] = [str(figure)]
    else:
        for name, x in samples.items():
            results.setdefault(name, {}).update(distribution_metrics(x, x_0[h:], cfg.seed, manifest.teacher))

    # Both weights' numbers on the report split (the chosen ones are also "student").
    results["by_weights"] = {chosen: results["student"], other: results.pop(f"{other}_weights")}
    results["speed"] = speed_report(model, tcfg, manifest, x_T[:cfg.batch], labels(report), device, cfg.steps)
    modes = KMeans(8, n_init=4, random_state=cfg.seed).fit_predict(x_0) if x_0.ndim == 2 and x_0.shape[1] == 2 else None
    if modes is not None:
        extent = manifest.teacher["params"].get("extent")
        pairs_scatter(figure, x_T / manifest.sigma_max, x_0,
                      {f"{tcfg.student.kind.upper()} student x̂_0 ({chosen}, step {step})": outputs["student"],
                       "untrained student": outputs["untrained"]},
                      modes, extent)
        results["figures"] = [str(figure)]
    (run / per_steps(EVAL, cfg.steps)).write_text(json.dumps(results, indent=1))
    return results


def image_results(results: dict, cfg: EvaluateConfig, net, samples: dict[str, np.ndarray], ref: np.ndarray,
                  device) -> None:
    """Feature-space distances (Fréchet distance, IS, precision/recall) of each set of `samples` (the teacher's
    own among them, as the floor) to the teacher's samples `ref`."""
    chunks = lambda x: (x[b:b + cfg.batch] for b in range(0, len(x), cfg.batch))  # noqa: E731
    real = features(net, chunks(ref), cfg.batch, device)
    stats = FeatureStats.of(real, net.name)
    for name, x in samples.items():
        m = image_metrics(chunks(x), net, stats, real_features=real, batch=cfg.batch, device=device)
        results.setdefault(name, {}).update({("fd_teacher" if k in ("fid", "frechet_distance") else k): v
                                             for k, v in m.items() if k not in ("note", "detector", "num_samples")})
    results["detector"] = net.name
    results["feature_note"] = ("pixel features (no --detector): Fréchet distances between pixel-space Gaussians"
                               if cfg.detector is None else f"features of {cfg.detector}")


def fid_report(cfg: EvaluateConfig, net, model: torch.nn.Module, manifest, device, decode=None) -> dict[str, Any]:
    """FID of `fid_num` fresh samples of `model`, the `--steps` sampler (seeds fid_seed…, x_T = σ_max·z as the
    teacher drew them), against --ref."""
    ref_path = Path(cfg.ref)
    ref = (load_ref_stats(ref_path) if ref_path.suffix == ".npz" and not _has_images(ref_path)
           else reference_stats(cfg.ref, net, batch=cfg.batch, device=device))
    out = image_metrics(fresh_samples(model, manifest, cfg.fid_seed, cfg.fid_num, cfg.batch, device, decode), net,
                        ref, batch=cfg.batch, device=device)
    return out | {"reference": str(cfg.ref), "seeds": [cfg.fid_seed, cfg.fid_seed + cfg.fid_num]}


def fresh_samples(model: torch.nn.Module, manifest, start: int, num: int, batch: int, device,
                  decode=None) -> Iterator[np.ndarray]:
    """Samples of `model` from seeds start … start + num − 1 (x_T = σ_max·z as the teacher drew them), by batch;
    decoded into images by `decode` (latent pairs)."""
    for b in range(start, start + num, batch):
        seeds = list(range(b, min(b + batch, start + num)))
        z, y = seed_noise(seeds, tuple(manifest.shape), manifest.label_dim, device)
        x = apply(model, (manifest.sigma_max * z).cpu().numpy(), None if y is None else y.cpu().numpy(), device, batch)
        yield x if decode is None else decode(x, batch)


def set_fd_report(cfg: EvaluateConfig, net, model: torch.nn.Module, manifest, data: Path, ref: FeatureStats | None,
                  device, decode=None) -> dict[str, Any]:
    """Fréchet distance of `set_num` fresh samples of `model`, the `--steps` sampler, to the whole teacher set, from
    its stats.zarr (far less biased than the held-out comparison, whose two sides are a few hundred samples each).
    The seeds start after the set's last seed, so no sample shares its noise with a teacher pair."""
    flag = "" if cfg.detector is None else f" --detector {cfg.detector}"
    if ref is None:
        return {"note": f"no {net.name} feature statistics in {data}/{STORE}: run `kdm-pipe stats {data}{flag}`"}
    num = cfg.set_num or min(ref.num, FID_NUM)
    start = max(s.seed_end for s in manifest.shards)
    sums = stream_sums(net, fresh_samples(model, manifest, start, num, cfg.batch, device, decode), cfg.batch, device)
    space = space_name(net.name, manifest.latent)      # latents: the decoded images' features
    out = {"fd": fid_from_stats(sums.stats(space), ref), "num_samples": num, "num_reference": ref.num,
           "detector": space, "seeds": [start, start + num]}
    halves = set_halves(data, manifest, space)
    if halves is not None:            # teacher vs teacher at about half the sizes: about twice the bias of FD
        out["floor"] = {"fd": fid_from_stats(*halves), "num": [halves[0].num, halves[1].num],
                        "note": "the first half of the set's shards vs the second half"}
    return out


def _has_images(path: Path) -> bool:
    """An .npz of images (arr_0, as `sample` writes) rather than statistics (mu, sigma)."""
    with np.load(path) as f:
        return "mu" not in f.files


def speed_report(model, tcfg, manifest, x_T: np.ndarray, labels, device, steps: int = 1) -> dict[str, float]:
    """Samples/s of the student's `steps`-step sampler `model` vs the teacher's sampler on the same device and batch,
    with the steps and network passes per sample of each (a teacher's network passes are its NFE)."""
    src = manifest.source.get("identity", {})
    out = {"batch": len(x_T), "student_steps": steps,
           "student_network_passes": network_passes(tcfg.student.kind, steps),
           "student_samples_per_s": speed(lambda: apply(model, x_T, labels, device), len(x_T))}
    if "teacher" in src:
        gcfg = GenerateConfig.model_validate({"teacher": src["teacher"], "sampler": src["sampler"]})
        teacher = build_teacher(gcfg.teacher)
        s = gcfg.sampler
        sigmas = schedule(s).to(device)
        xt = torch.from_numpy(x_T).to(device, torch.float64)
        y = None if labels is None else torch.from_numpy(labels[: len(x_T)]).to(device)
        out["teacher_steps"], out["teacher_network_passes"] = s.steps, manifest.nfe
        out["teacher_samples_per_s"] = speed(lambda: solve(teacher.denoise, xt, sigmas, y, s.solver), len(x_T))
        out["speedup"] = out["student_samples_per_s"] / out["teacher_samples_per_s"]
    return out
