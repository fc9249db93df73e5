"""Evaluation of a trained student against held-out teacher pairs (vector data).

Held-out shards never reach the trainer. They are split in two: the first half chooses which weights to report
(EMA or raw, by paired error), the second half is what every reported number is computed on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans

from kdm_pipe.config import ConfigError, EvaluateConfig, GenerateConfig
from kdm_pipe.metrics import mmd_rbf, off_support_fraction, paired_errors, sliced_wasserstein
from kdm_pipe.plots import pairs_scatter
from kdm_pipe.runtime import pick_device
from kdm_pipe.sampling import edm_sigmas, solve
from kdm_pipe.shards import read_shard
from kdm_pipe.teachers import build_teacher
from kdm_pipe.training import load_weights, student_for


def heldout_pairs(data: Path, names: list[str], num: int) -> dict[str, np.ndarray]:
    recs, n = [], 0
    for name in names:
        for rec in read_shard(Path(data) / name):
            recs.append(rec)
            n += len(rec["x_0"])
            if n >= num:
                break
        if n >= num:
            break
    if not recs:
        raise ConfigError(f"no held-out pairs in {data}: train with holdout_shards ≥ 1")
    return {k: np.concatenate([r[k] for r in recs])[:num] for k in recs[0] if k != "traj"}


@torch.no_grad()
def one_step(model: torch.nn.Module, x_T: np.ndarray, labels: np.ndarray | None, device, batch: int = 4096) -> np.ndarray:
    model = model.to(device)
    out = []
    for b in range(0, len(x_T), batch):
        y = None if labels is None else torch.from_numpy(labels[b:b + batch]).to(device, torch.float32)
        out.append(model(torch.from_numpy(x_T[b:b + batch]).to(device, torch.float32), y).cpu().numpy())
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
    models = {w: load_weights(run, w) for w in ("ema", "raw")}
    _, tcfg, manifest, step = models["ema"]
    data = Path(cfg.data or tcfg.data)
    split = json.loads((run / "split.json").read_text())
    pairs = heldout_pairs(data, split["holdout"], 2 * cfg.num)
    half = len(pairs["x_0"]) // 2
    select = {k: v[:half] for k, v in pairs.items()}
    report = {k: v[half:] for k, v in pairs.items()}
    device = pick_device(cfg.device)
    labels = lambda p: p.get("label")  # noqa: E731

    # Choose EMA or raw on the selection half only.
    sel_err = {w: paired_errors(one_step(m[0], select["x_T"], labels(select), device), select["x_0"])["mse"]
               for w, m in models.items()}
    chosen = min(sel_err, key=sel_err.get) if cfg.weights == "auto" else cfg.weights
    model = models[chosen][0]

    torch.manual_seed(tcfg.seed)                       # the same init the run started from
    untrained = student_for(tcfg, manifest).eval()
    x_T, x_0 = report["x_T"], report["x_0"]
    outputs = {"student": one_step(model, x_T, labels(report), device),
               "untrained": one_step(untrained, x_T, labels(report), device)}
    t_name, t_params = manifest.teacher["name"], manifest.teacher["params"]
    results: dict[str, Any] = {"run": str(run), "data": str(data), "step": step, "weights": chosen,
                               "selection_mse": sel_err, "num_pairs": len(x_0)}
    for name, x in outputs.items():
        results[name] = {**distribution_metrics(x, x_0, cfg.seed, t_name, t_params), **paired_errors(x, x_0)}
    h = len(x_0) // 2                                  # the metric's own noise floor: teacher vs teacher
    results["teacher_floor"] = distribution_metrics(x_0[:h], x_0[h:], cfg.seed, t_name, t_params)

    results["speed"] = speed_report(model, tcfg, manifest, x_T[:1024], labels(report), device)
    modes = KMeans(8, n_init=4, random_state=cfg.seed).fit_predict(x_0) if x_0.shape[1] == 2 else None
    if modes is not None:
        extent = t_params.get("extent")
        pairs_scatter(run / "samples.png", x_T / manifest.sigma_max, x_0,
                      {f"student x̂_0 ({chosen}, step {step})": outputs["student"], "untrained student": outputs["untrained"]},
                      modes, extent)
        results["figures"] = [str(run / "samples.png")]
    (run / "eval.json").write_text(json.dumps(results, indent=1))
    return results


def speed_report(model, tcfg, manifest, x_T: np.ndarray, labels, device) -> dict[str, float]:
    """Student one-step samples/s vs the teacher's sampler on the same device and batch."""
    src = manifest.source.get("identity", {})
    out = {"batch": len(x_T), "student_nfe": 1,
           "student_samples_per_s": speed(lambda: one_step(model, x_T, labels, device), len(x_T))}
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
