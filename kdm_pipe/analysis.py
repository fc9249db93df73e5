"""Analyses of a trained run, as the KDM paper and its code make them (docs/METHOD.md), written to RUN/analysis/:

    spectrum.png         the Koopman operator's eigenvalues against the unit circle, and over training (latents.zarr);
                         those of the one-step map K(1) (a trajectory-supervised dense C is one of M intervals: C^M)
    noise_structure.png  2-D runs: x_0 coloured by KMeans(8) with the same colours on the x_T each came from;
                         outliers (DBSCAN(eps 0.15, min_samples 5) noise or per-axis |z-score| > 3) marked;
                         the student's one-step samples (generated) above the teacher's (real)
    interpolation.png    one-step outputs between held-out x_T: linear in x_T, and linear in the latent z_T
    latent_spectra.png   covariance spectra of z_T, z_0 and C z_T over the whole pair set beside the operator's
                         (from `kdm-pipe stats DATA --run RUN`, RUN/latents.zarr/statistics)
    analysis.json        spectrum summary, latent proximity, outlier fractions, what each figure shows

All of it uses held-out pairs and the run's chosen weights (RUN/weights.json, the same choice evaluate and sample use).
KD students have no latent: only the sample analyses (noise structure, x_T interpolation) apply to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import DBSCAN, KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    normalized_mutual_info_score,
)

from kdm_pipe import plots
from kdm_pipe.errors import ConfigError
from kdm_pipe.evaluation import apply, chosen_weights, heldout_pairs
from kdm_pipe.image_files import class_indices
from kdm_pipe.latents import load_latent_stats
from kdm_pipe.probes import probe_spectra
from kdm_pipe.run import ANALYSIS, Run
from kdm_pipe.runtime import pick_device
from kdm_pipe.student.koopman import eigvals
from kdm_pipe.teachers.vae import decoder
from kdm_pipe.trained import load_students

DBSCAN_EPS, DBSCAN_MIN_SAMPLES, Z_THRESHOLD, MODES = 0.15, 5, 3.0, 8
IMAGE_ALPHAS, PATH_ALPHAS, PATHS = 9, 41, 6


def spectrum_summary(lam: np.ndarray) -> dict[str, float]:
    """Where the eigenvalues sit against the unit circle (|λ| < 1: repeated pushes decay). One push of a
    non-normal C can still amplify; its operator norm, reported beside this, bounds that."""
    modulus = np.abs(lam)
    return {"dim": int(len(lam)), "spectral_radius": float(modulus.max()),
            "fraction_inside": float((modulus < 1).mean()), "mean_modulus": float(modulus.mean())}


def outliers(points: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's outlier masks: DBSCAN noise, per-axis |z-score| > 3, and their union ("either")."""
    noise = DBSCAN(eps=DBSCAN_EPS, min_samples=DBSCAN_MIN_SAMPLES).fit_predict(points) == -1
    far = (np.abs(points - points.mean(0)) > Z_THRESHOLD * points.std(0)).any(1)
    return {"dbscan": noise, "zscore": far, "either": noise | far}


def outlier_stats(masks: dict[str, np.ndarray], radius: np.ndarray) -> dict[str, float | None]:
    """Outlier fractions, and the mean |x_T| the outliers and the inliers came from (is it the noise's tails?)."""
    out, rest = radius[masks["either"]], radius[~masks["either"]]
    return {**{k: float(v.mean()) for k, v in masks.items()},
            "x_T_norm_outliers": float(out.mean()) if len(out) else None,
            "x_T_norm_inliers": float(rest.mean()) if len(rest) else None}


def modes_of(x: np.ndarray, seed: int) -> np.ndarray:
    return KMeans(MODES, n_init=4, random_state=seed).fit_predict(x.reshape(len(x), -1))


def proximity(reps: dict[str, np.ndarray], labels: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """How well each representation groups by `labels`: KMeans with one cluster per label scored against them
    (ARI, NMI: 1 = the labels' partition, 0 = chance), and the labels' own groups scored in that space
    (Davies–Bouldin: lower is tighter; Calinski–Harabasz: higher is better separated)."""
    k = len(np.unique(labels))
    out = {}
    for name, x in reps.items():
        x = x.reshape(len(x), -1).astype(np.float64)
        pred = KMeans(k, n_init=4, random_state=seed).fit_predict(x)
        out[name] = {"ari": float(adjusted_rand_score(labels, pred)),
                     "nmi": float(normalized_mutual_info_score(labels, pred)),
                     "davies_bouldin": float(davies_bouldin_score(x, labels)),
                     "calinski_harabasz": float(calinski_harabasz_score(x, labels))}
    return out


def lerp(a: np.ndarray, b: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """(1 − α)·a + α·b for paired rows of a and b: (n, ...) → (n, len(alphas), ...)."""
    al = alphas.reshape(1, -1, *([1] * (a.ndim - 1)))
    return (1 - al) * a[:, None] + al * b[:, None]


def interpolations(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, labels: np.ndarray | None,
                   alphas: np.ndarray, device) -> dict[str, np.ndarray]:
    """One-step outputs (n, len(alphas), ...) between x_T pairs a, b: linear in x_T, and for KDM linear in
    z_T = E_T(x_T), both decoded through C and D. A pair keeps the label of its start."""
    n, m = len(a), len(alphas)
    y = None if labels is None else np.repeat(labels, m, axis=0)
    flat = lambda x: x.reshape(n * m, *x.shape[2:])  # noqa: E731
    out = {"linear in x_T": apply(model, flat(lerp(a, b, alphas)), y, device)}
    if hasattr(model, "koopman"):
        z_a, z_b = (apply(model.encode_T, x, labels, device) for x in (a, b))
        out["linear in z_T"] = apply(lambda z, c: model.decode(model.push(z, c), c), flat(lerp(z_a, z_b, alphas)), y,
                                     device)
    return {k: v.reshape(n, m, *v.shape[1:]) for k, v in out.items()}


def spectrum_section(model: torch.nn.Module, run: Path, out: Path, title: str) -> dict[str, Any]:
    """spectrum.png and its summary: the final λ, the probes' λ over training, and for the decomposed form also
    the eigenvalues of the K actually applied (λ are P Λ P⁻¹'s only once P⁻¹ inverts P)."""
    koopman = model.koopman
    lam = koopman.eigenvalues().detach().cpu().numpy()
    K = koopman.matrix().detach().double()
    extra = ({"eigvals of the applied K": eigvals(K).cpu().numpy()} if koopman.kind == "decomposed"
             else None)
    history = probe_spectra(run)
    plots.spectrum(out / "spectrum.png", lam, title, history, extra)
    # A non-normal C can amplify far more than its eigenvalues say; its largest singular value bounds the gain.
    section: dict[str, Any] = {**spectrum_summary(lam), "operator_norm": float(torch.linalg.matrix_norm(K, ord=2))}
    if extra:
        section["applied"] = spectrum_summary(extra["eigvals of the applied K"])
    if history is not None:
        per_probe = [spectrum_summary(lam_t) for lam_t in history[1]]
        section["history"] = {"step": history[0].tolist(),
                              **{k: [p[k] for p in per_probe] for k in ("spectral_radius", "fraction_inside")}}
    return section


def latent_statistics_section(model: torch.nn.Module, run: Path, ckpt_name: str, out: Path) -> dict[str, Any]:
    """latent_spectra.png and the summary of RUN/latents.zarr/statistics (`kdm-pipe stats DATA --run RUN`), when
    they describe the checkpoint analysed."""
    stats = load_latent_stats(run)
    hint = f"run `kdm-pipe stats {Run(run).data_dir()} --run {run}`"
    if stats is None:
        return {"note": f"no latent statistics over the pair set yet: {hint}"}
    if stats["checkpoint"] != ckpt_name:
        return {"note": f"the latent statistics describe {stats['checkpoint']}, not {ckpt_name}: {hint}"}
    s = stats["summary"]
    plots.latent_spectra(out / "latent_spectra.png", stats["eigenvalues"],
                         model.koopman.eigenvalues().detach().cpu().numpy(), s["effective_rank"],
                         f"latent covariance spectra (d = {s['dim']}, {s['num_pairs']} pairs)")
    return s


def proximity_section(model: torch.nn.Module, x_0: np.ndarray, x_T: np.ndarray, labels: np.ndarray | None,
                      seed: int, device) -> dict[str, Any]:
    """Latent proximity of x_0, z_0, x_T, z_T and pure noise, grouped by class labels or, without them, by
    KMeans clusters of x_0 (said so in "labels")."""
    z_0, z_T = apply(model.encode_0, x_0, labels, device), apply(model.encode_T, x_T, labels, device)
    if labels is not None:
        groups, source = class_indices(labels), "class labels"
    else:
        groups, source = modes_of(x_0, seed), (f"pseudo-labels: KMeans({MODES}) clusters of the teacher's x_0 "
                                               "(the data has no class labels; the x_0 row is 1 by construction)")
    noise = np.random.default_rng(seed).standard_normal(z_T.shape)
    reps = {"x_0": x_0, "z_0": z_0, "x_T": x_T, "z_T": z_T, "pure noise": noise}
    return {"labels": source, "rows": proximity(reps, groups, seed)}


def noise_structure_section(model: torch.nn.Module, x_0: np.ndarray, x_T: np.ndarray, labels: np.ndarray | None,
                            sigma_max: float, extent: float | None, out: Path, seed: int, device) -> dict[str, Any]:
    """noise_structure.png (2-D) and the outlier fractions of the student's samples and of the teacher's."""
    x_unit = x_T / sigma_max
    rows, stats = {}, {}
    for name, x in (("student", apply(model, x_T, labels, device)), ("teacher", x_0)):
        masks = outliers(x)
        rows[f"{name} ({'generated' if name == 'student' else 'real'})"] = (x, x_unit, modes_of(x, seed),
                                                                            masks["either"])
        stats[name] = outlier_stats(masks, np.linalg.norm(x_unit, axis=1))
    plots.noise_structure(out / "noise_structure.png", rows, extent)
    return {"dbscan": {"eps": DBSCAN_EPS, "min_samples": DBSCAN_MIN_SAMPLES}, "z_threshold": Z_THRESHOLD,
            "x_T": "x_T / sigma_max (unit noise)", **stats}


def interpolation_section(model: torch.nn.Module, x_0: np.ndarray, x_T: np.ndarray, labels: np.ndarray | None,
                          shape: list[int], extent: float | None, out: Path, seed: int, device,
                          decode=None) -> dict[str, Any]:
    """interpolation.png: a path plot of several pairs for 2-D data, an image strip of one pair otherwise (latents
    decoded into images by `decode`)."""
    two_d = shape == [2]
    n = PATHS if two_d else 1
    if len(x_T) < 2 * n:
        raise ConfigError(f"only {len(x_T)} held-out pairs: the interpolation needs {2 * n}")
    ends = np.random.default_rng(seed).choice(len(x_T), size=2 * n, replace=False)
    alphas = np.linspace(0, 1, PATH_ALPHAS if two_d else IMAGE_ALPHAS)
    paths = interpolations(model, x_T[ends[:n]], x_T[ends[n:]], None if labels is None else labels[ends[:n]],
                           alphas, device)
    if two_d:
        plots.interpolation_paths(out / "interpolation.png", x_0, paths, extent)
    else:
        rows = {f"{k}, α = 0 … 1": v[0] if decode is None else decode(v[0]) for k, v in paths.items()}
        plots.image_rows(out / "interpolation.png", rows, scale=max(1, 32 // next(iter(rows.values())).shape[-1]))
    return {"alphas": alphas.tolist(), "rows": list(paths), "held_out_indices": [ends[:n].tolist(), ends[n:].tolist()]}


def analyze(run: Path, num: int = 2000, seed: int = 0, device: str = "auto", vae: Path | None = None) -> dict[str, Any]:
    """Write RUN/analysis/ (figures + analysis.json) and return what analysis.json holds; latent pairs' images are
    decoded through their VAE (`vae`: where it is now, when it moved)."""
    run = Path(run)
    decode = decoder(Run(run).require().manifest(), vae, pick_device(device), Run(run).data_dir())
    dev = pick_device(device)
    models, cfg, manifest, step, ckpt = load_students(run, device=dev)       # one read of the checkpoint
    which = chosen_weights(run, "auto", dev, models, ckpt)
    model = models[which]
    pairs = heldout_pairs(Run(run).data_dir(), Run(run).split["holdout"], num)
    x_0, x_T, labels = pairs["x_0"], pairs["x_T"], pairs.get("label")
    latent = hasattr(model, "koopman")
    extent = manifest.teacher.get("params", {}).get("extent")
    out = run / ANALYSIS
    out.mkdir(exist_ok=True)
    result: dict[str, Any] = {"run": str(run), "step": step, "weights": which, "student": cfg.student.kind,
                              "operator": cfg.student.operator if latent else None, "num_pairs": len(x_0),
                              "latent": latent}
    if latent:
        result["spectrum"] = spectrum_section(model, run, out, f"Koopman spectrum ({which} weights, step {step})")
        result["proximity"] = proximity_section(model, x_0, x_T, labels, seed, dev)
        result["latent_spectra"] = latent_statistics_section(model, run, Run(run).latest_checkpoint().name, out)
    else:
        result["note"] = "KD student: no latent and no Koopman operator, so no spectrum and no latent proximity"
    if list(manifest.shape) == [2]:
        result["noise_structure"] = noise_structure_section(model, x_0, x_T, labels, manifest.sigma_max, extent, out,
                                                            seed, dev)
    result["interpolation"] = interpolation_section(model, x_0, x_T, labels, list(manifest.shape), extent, out, seed,
                                                    dev, decode)
    # each section drew the figure of its own name
    result["figures"] = [f"{ANALYSIS}/{name}.png" for name in ("spectrum", "latent_spectra", "noise_structure",
                                                             "interpolation")
                         if name in result and "note" not in result[name]]
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    return result
