"""Evaluation of a trained student against held-out teacher pairs, for vector and image data.

Held-out shards never reach the trainer. They are split in two: the first half chooses which weights to report
(EMA or raw, by paired error), the second half is what every reported number is computed on. Each number comes
with two references: an untrained student of the same init (the floor of "learned nothing") and, for
distribution metrics, teacher-vs-teacher on the two halves of the report split (the metric's own noise floor).
Images are also compared in a feature space (`--detector`, default pixels) and, with `--ref`, by FID of fresh
one-step samples from seeds 0… against reference statistics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.cluster import KMeans

from kdm_pipe.config import ConfigError, EvaluateConfig, GenerateConfig
from kdm_pipe.metrics import mmd_rbf, off_support_fraction, paired_errors, sliced_wasserstein
from kdm_pipe.metrics.detectors import features, load_detector
from kdm_pipe.metrics.fid import FeatureStats, image_metrics, load_ref_stats, reference_stats
from kdm_pipe.plots import pairs_scatter
from kdm_pipe.runtime import pick_device
from kdm_pipe.sample_io import save_grid
from kdm_pipe.sampling import edm_sigmas, seed_noise, solve
from kdm_pipe.shards import read_pairs
from kdm_pipe.student import is_image
from kdm_pipe.teachers import build_teacher
from kdm_pipe.teachers.images import BUILTIN
from kdm_pipe.training import load_weights, student_for


def heldout_pairs(data: Path, names: list[str], num: int) -> dict[str, np.ndarray]:
    pairs = read_pairs(data, names, num)
    if pairs is None:
        raise ConfigError(f"no held-out pairs in {data}: train with holdout_shards ≥ 1")
    return pairs


def chosen_weights(run: Path, weights: str = "auto") -> str:
    """`auto`: the weights `evaluate` reported (eval.json), else EMA; `ema` / `raw` as given."""
    if weights != "auto":
        return weights
    report = Path(run) / "eval.json"
    return json.loads(report.read_text())["weights"] if report.is_file() else "ema"


@torch.no_grad()
def apply(fn: Callable, x: np.ndarray, labels: np.ndarray | None, device, batch: int = 512) -> np.ndarray:
    """fn(x, labels) over `x` in batches on `device` (one-step sampling: fn = the student), back as numpy."""
    out = []
    for b in range(0, len(x), batch):
        y = None if labels is None else torch.as_tensor(labels[b:b + batch], dtype=torch.float32, device=device)
        out.append(fn(torch.as_tensor(x[b:b + batch], dtype=torch.float32, device=device), y).cpu().numpy())
    return np.concatenate(out)


def distribution_metrics(x: np.ndarray, ref: np.ndarray, seed: int, teacher_name: str, teacher_params: dict) -> dict:
    m = {"sliced_wasserstein": sliced_wasserstein(x, ref, seed=seed), "mmd": mmd_rbf(x, ref, seed=seed)}
    if teacher_name == "checkerboard":
        m["off_support"] = off_support_fraction(x, size=teacher_params["size"], extent=teacher_params["extent"])
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
    models = {w: load_weights(run, w, device=device) for w in ("ema", "raw")}
    _, tcfg, manifest, step = models["ema"]
    data = Path(cfg.data or tcfg.data)
    split = json.loads((run / "split.json").read_text())
    pairs = heldout_pairs(data, split["holdout"], 2 * cfg.num)
    half = len(pairs["x_0"]) // 2
    select = {k: v[:half] for k, v in pairs.items()}
    report = {k: v[half:] for k, v in pairs.items()}
    labels = lambda p: p.get("label")  # noqa: E731

    # Choose EMA or raw on the selection half only.
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    sel_err = {w: paired_errors(flat(apply(m[0], select["x_T"], labels(select), device, cfg.batch)),
                                flat(select["x_0"]))["mse"]
               for w, m in models.items()}
    chosen = min(sel_err, key=sel_err.get) if cfg.weights == "auto" else cfg.weights
    model = models[chosen][0]

    torch.manual_seed(tcfg.seed)                       # the same init the run started from
    untrained = student_for(tcfg, manifest).to(device).eval()
    x_T, x_0 = report["x_T"], report["x_0"]
    outputs = {"student": apply(model, x_T, labels(report), device, cfg.batch),
               "untrained": apply(untrained, x_T, labels(report), device, cfg.batch)}
    t_name, t_params = manifest.teacher["name"], manifest.teacher["params"]
    results: dict[str, Any] = {"run": str(run), "data": str(data), "step": step, "weights": chosen,
                               "selection_mse": sel_err, "num_pairs": len(x_0)}
    for name, x in outputs.items():
        results[name] = paired_errors(flat(x), flat(x_0))
    # Distribution metrics compare samples of the first half's x_T with the teacher's samples of the second half:
    # the same sizes as the teacher-vs-teacher floor, and no pairing between the two sides.
    h = len(x_0) // 2
    samples = {**{name: x[:h] for name, x in outputs.items()}, "teacher_floor": x_0[:h]}
    if is_image(manifest.shape):
        image_results(results, cfg, net, samples, x_0[h:], device)
        results["fid"] = fid_report(cfg, net, model, manifest, device) if cfg.ref else None
        save_grid(run / "samples.png", np.concatenate([x_0[:16], outputs["student"][:16], outputs["untrained"][:16]]),
                  ncol=16, scale=max(1, 64 // manifest.shape[-1]))
        results["figures"] = [str(run / "samples.png")]
    else:
        for name, x in samples.items():
            results.setdefault(name, {}).update(distribution_metrics(x, x_0[h:], cfg.seed, t_name, t_params))

    results["speed"] = speed_report(model, tcfg, manifest, x_T[:cfg.batch], labels(report), device)
    modes = KMeans(8, n_init=4, random_state=cfg.seed).fit_predict(x_0) if x_0.ndim == 2 and x_0.shape[1] == 2 else None
    if modes is not None:
        extent = t_params.get("extent")
        pairs_scatter(run / "samples.png", x_T / manifest.sigma_max, x_0,
                      {f"student x̂_0 ({chosen}, step {step})": outputs["student"], "untrained student": outputs["untrained"]},
                      modes, extent)
        results["figures"] = [str(run / "samples.png")]
    (run / "eval.json").write_text(json.dumps(results, indent=1))
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


def fid_report(cfg: EvaluateConfig, net, model: torch.nn.Module, manifest, device) -> dict[str, Any]:
    """FID of `fid_num` fresh one-step samples (seeds fid_seed…, x_T = σ_max·z as the teacher drew them) against
    --ref."""
    ref_path = Path(cfg.ref)
    ref = (load_ref_stats(ref_path) if ref_path.suffix == ".npz" and not _has_images(ref_path)
           else reference_stats(cfg.ref, net, batch=cfg.batch, device=device))

    def samples():
        for b in range(cfg.fid_seed, cfg.fid_seed + cfg.fid_num, cfg.batch):
            seeds = list(range(b, min(b + cfg.batch, cfg.fid_seed + cfg.fid_num)))
            z, y = seed_noise(seeds, tuple(manifest.shape), manifest.label_dim, device)
            yield apply(model, (manifest.sigma_max * z).cpu().numpy(), None if y is None else y.cpu().numpy(),
                           device, cfg.batch)
    return image_metrics(samples(), net, ref, batch=cfg.batch, device=device)


def _has_images(path: Path) -> bool:
    """An .npz of images (arr_0, as `sample` writes) rather than statistics (mu, sigma)."""
    with np.load(path) as f:
        return "mu" not in f.files


def speed_report(model, tcfg, manifest, x_T: np.ndarray, labels, device) -> dict[str, float]:
    """Student one-step samples/s vs the teacher's sampler on the same device and batch."""
    src = manifest.source.get("identity", {})
    out = {"batch": len(x_T), "student_nfe": 1,
           "student_samples_per_s": speed(lambda: apply(model, x_T, labels, device), len(x_T))}
    if "teacher" in src:
        gcfg = GenerateConfig.model_validate({"teacher": src["teacher"], "sampler": src["sampler"]})
        teacher = build_teacher(gcfg.teacher)
        s = gcfg.sampler
        sigmas = edm_sigmas(s.steps, s.sigma_min, s.sigma_max, s.rho).to(device)
        xt = torch.from_numpy(x_T).to(device, torch.float64)
        y = None if labels is None else torch.from_numpy(labels[: len(x_T)]).to(device)
        out["teacher_nfe"] = manifest.nfe
        out["teacher_samples_per_s"] = speed(lambda: solve(teacher.denoise, xt, sigmas, y, s.solver), len(x_T))
        out["speedup"] = out["student_samples_per_s"] / out["teacher_samples_per_s"]
    return out
