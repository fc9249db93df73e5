"""Image metrics by EDM's protocol: FID from detector-feature statistics, Inception Score, k-NN precision/recall.

Reference statistics are EDM-format `.npz` files (`mu`, `sigma`; EDM's own files load as they are). Ours add
`num` and `detector` (the feature space they were computed in) so statistics from different nets are never
compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdm_pipe.datasets import BUILTIN, from_uint8_nhwc, load_images
from kdm_pipe.errors import ConfigError
from kdm_pipe.exclusions import exclusions
from kdm_pipe.image_files import SAMPLES_JSON, SAMPLES_NPZ
from kdm_pipe.integrity import checked_manifest, open_pairs
from kdm_pipe.manifest import MANIFEST
from kdm_pipe.metrics.detectors import FeatureNet, PixelFeatures, embed, feature_batches
from kdm_pipe.metrics.distribution import feature_stats, frechet_distance, precision_recall
from kdm_pipe.npyfiles import Header, npz_arrays

FID_NUM = 50_000  # EDM's sample count for reported FIDs
_CHUNK = 1000


@dataclass
class FeatureStats:
    mu: np.ndarray       # (D,) float64
    sigma: np.ndarray    # (D, D) float64, unbiased
    num: int             # 0 when unknown (EDM files do not record it)
    detector: str        # "" when unknown

    @classmethod
    def of(cls, features: np.ndarray, detector: str) -> FeatureStats:
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, len(features), detector)


class FeatureSums:
    """Sufficient statistics of a stream of features in float64: n, Σf, Σffᵀ (memory D², whatever the count)."""

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def add(self, f: np.ndarray) -> None:
        f = np.asarray(f, np.float64)
        self.count += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def stats(self, detector: str) -> FeatureStats:
        """μ = Σf / n and the unbiased Σ = (Σffᵀ − n μμᵀ) / (n − 1)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.sum / self.count
        return FeatureStats(mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1), self.count, detector)


def stream_sums(net: FeatureNet, images: Iterable[np.ndarray | torch.Tensor], batch: int = 250,
                device: torch.device | str = "cpu") -> FeatureSums:
    """`FeatureSums` of `net`'s features of a stream of [−1, 1] NCHW image chunks, batch by batch."""
    sums = None
    for f in feature_batches(net, images, batch, device):
        if sums is None:
            sums = FeatureSums(f.shape[1])
        sums.add(f)
    if sums is None:
        raise ValueError("no images to embed")
    return sums


def save_ref_stats(path: str | Path, stats: FeatureStats) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    try:
        np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num=np.int64(stats.num), detector=np.str_(stats.detector))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_ref_stats(path: str | Path) -> FeatureStats:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ref {path}: no such file; pass EDM reference statistics (.npz with mu, sigma) "
                          f"or compute them with `kdm-pipe stats ref`")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ConfigError(f"--ref {path}: expected keys mu and sigma (EDM format), found {sorted(f.files)}")
        return FeatureStats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                            int(f["num"]) if "num" in f else 0, str(f["detector"]) if "detector" in f else "")


def fid_from_stats(stats: FeatureStats, ref: FeatureStats) -> float:
    """‖μ − μ_r‖² + tr(Σ + Σ_r − 2(ΣΣ_r)^½), after checking both live in the same feature space."""
    if stats.mu.shape != ref.mu.shape:
        raise ConfigError(f"reference statistics are {ref.mu.shape[0]}-d ({ref.detector or 'unknown detector'}) "
                          f"but the samples' features are {stats.mu.shape[0]}-d ({stats.detector}): "
                          f"use the same --detector for both")
    if stats.detector and ref.detector and stats.detector != ref.detector:
        raise ConfigError(f"reference statistics come from detector {ref.detector}, samples from {stats.detector}")
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) ‖ p(y))) per contiguous split → (mean, std), as Salimans et al. / StyleGAN2-ADA."""
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    if n < splits:
        raise ValueError(f"need at least {splits} samples for {splits} splits, got {n}")
    scores = []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        p_y = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part) - np.log(p_y))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# --- image sources ----------------------------------------------------------------------------------------------


def _chunks(x: np.ndarray, num: int | None) -> Iterator[np.ndarray]:
    x = x[:num]
    for start in range(0, len(x), _CHUNK):
        yield x[start:start + _CHUNK]


def _shard_images(directory: Path, num: int | None) -> Iterator[np.ndarray]:
    manifest = checked_manifest(directory)
    drop = exclusions(manifest, directory)              # memorised samples the filter excluded are no reference
    used, have = [], 0
    for info in manifest.shards:                        # the shards the first `num` kept pairs come from
        if num is not None and have >= num:
            break
        used.append(info.name)
        have += drop.kept(info)
    open_pairs(directory, used)                         # checked against the manifest, as every reader does
    left = num
    for name in used:
        for rec in drop.read(directory / name):
            x_0 = rec["x_0"][:left]
            yield x_0
            if left is not None:
                left -= len(x_0)
                if left <= 0:
                    return


MAX_NPZ_IMAGES = 16 << 30      # 50k ImageNet-256 samples are 9.8 GB: a larger arr_0 is no sample set


def _npz_images(path: Path, num: int | None) -> Iterator[np.ndarray]:
    def nhwc_uint8(name: str, h: Header) -> None:
        if h.dtype != np.uint8 or len(h.shape) != 4 or h.shape[3] not in (1, 3):
            raise ConfigError(f"{path}: arr_0 is {h.describe()}; expected uint8 NHWC images (N, H, W, 1 or 3), as "
                              f"`kdm-pipe sample` and EDM's generate.py write them")

    arrays, members = npz_arrays(path, ("arr_0",), MAX_NPZ_IMAGES, "for an image sample set", nhwc_uint8)
    if "arr_0" not in arrays:
        raise ConfigError(f"{path}: expected uint8 NHWC images under arr_0, found {members}")
    for chunk in _chunks(arrays["arr_0"][:num], None):
        yield from_uint8_nhwc(chunk)


def image_source(source: str | Path, num: int | None = None) -> Iterator[np.ndarray]:
    """Chunks of [−1, 1] NCHW images from a pair directory (its x_0), a `sample` output directory or `.npz`
    (arr_0 uint8 NHWC, EDM/ADM style), an image folder, an EDM dataset zip, an `.npy` or a built-in set
    (sklearn-digits); the first `num` only."""
    path = Path(source)
    if str(source) in BUILTIN:
        return _chunks(load_images(source).images, num)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder; reference images come from a pair directory, an image "
                          f"folder, an EDM dataset zip, an .npy or an .npz (arr_0)")
    if path.is_dir() and (path / MANIFEST).is_file():
        return _shard_images(path, num)
    if path.is_dir() and (path / SAMPLES_JSON).is_file():
        return _npz_images(path / SAMPLES_NPZ, num)
    if path.suffix == ".npz" and path.is_file():
        return _npz_images(path, num)
    return _chunks(load_images(source).images, num)


def reference_stats(source: str | Path, net: FeatureNet, num: int | None = None, batch: int = 250,
                    device: torch.device | str = "cpu") -> FeatureStats:
    """Feature statistics of the images at `source` (all of them unless `num`), as `kdm-pipe stats ref` saves."""
    return FeatureStats.of(embed(net, image_source(source, num), batch, device)[0], net.name)


# --- one call for evaluate ---------------------------------------------------------------------------------------


def image_metrics(images: Iterable[np.ndarray | torch.Tensor], net: FeatureNet, ref: FeatureStats,
                  real_features: np.ndarray | None = None, batch: int = 250, device: torch.device | str = "cpu",
                  splits: int = 10, k: int = 3) -> dict[str, object]:
    """FID (Fréchet distance in `net`'s features), IS when `net` has class probabilities, precision/recall when
    `real_features` (same net) are given; `images` is a stream of [−1, 1] NCHW chunks, consumed once."""
    feats, probs = embed(net, images, batch, device, probs=True)
    stats = FeatureStats.of(feats, net.name)
    # StyleGAN-convention nets (net.rgb) are the Inception protocol: their distance is reported as FID.
    out: dict[str, object] = {"detector": net.name, "num_samples": len(feats),
                              "fid" if net.rgb else "frechet_distance": fid_from_stats(stats, ref)}
    if isinstance(net, PixelFeatures):
        out["note"] = ("no --detector given: Fréchet distance between pixel-space Gaussians, not comparable to "
                       "published FIDs")
    elif len(feats) < FID_NUM:
        out["note"] = f"{len(feats)} samples, fewer than the protocol's {FID_NUM}: the distance is biased upward"
    if probs is not None and len(probs) >= splits:
        out["inception_score"], out["inception_score_std"] = inception_score(probs, splits)
    if real_features is not None:
        out.update(precision_recall(real_features, feats, k=k))
    return out
