"""Distances between two samples of feature vectors (N, d): Fréchet, sliced Wasserstein, MMD, precision/recall."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.linalg

_ROW_BATCH = 1024  # rows per distance block: bounds memory at ~_ROW_BATCH × N float64
_PROJECTION_BATCH = 64  # projections per chunk: bounds the (grid, projections) arrays
_MEDIAN_POINTS = 2000  # pooled points used for the median-distance bandwidth (quadratic cost)


def _as_f64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, d) array, got shape {x.shape}")
    return x


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), size=n, replace=False)]


def _sq_dist_blocks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (rows of a, squared distances to all of b) block by block; ‖a‖² + ‖b‖² − 2ab uses BLAS."""
    b_sq = np.einsum("ij,ij->i", b, b)
    for start in range(0, len(a), _ROW_BATCH):
        rows = slice(start, start + _ROW_BATCH)
        block = a[rows]
        d2 = np.einsum("ij,ij->i", block, block)[:, None] + b_sq[None, :] - 2.0 * block @ b.T
        yield rows, np.maximum(d2, 0.0)


# --- Fréchet distance -------------------------------------------------------------------------------------------


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance in float64, as EDM's FID computes them."""
    x = _as_f64(x)
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1Σ2)^{1/2}), real part."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    with warnings.catch_warnings():      # singular Σ (e.g. constant border pixels) is expected; handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        # Singular products (fewer samples than dimensions) can make sqrtm blow up; a tiny ridge regularises
        # both covariances just enough without measurably moving the distance.
        ridge = 1e-6 * np.eye(len(sigma1))
        covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    diff = mu1 - mu2
    return float(np.real(diff @ diff + np.trace(sigma1 + sigma2 - 2.0 * covmean)))


def frechet_distance_between(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two samples."""
    return frechet_distance(*feature_stats(x), *feature_stats(y))


# --- sliced Wasserstein -----------------------------------------------------------------------------------------


def _wasserstein_pp_1d(xs: np.ndarray, ys: np.ndarray, p: float) -> np.ndarray:
    """W_p^p between empirical laws given sorted projections (n, P) and (m, P), one value per column.

    W_p^p = ∫₀¹ |F_x⁻¹(u) − F_y⁻¹(u)|^p du; both quantile functions are constant between the breakpoints
    {i/n} ∪ {j/m}, so evaluating at the midpoints of that common grid is exact (for n = m it pairs sorted values).
    """
    n, m = len(xs), len(ys)
    grid = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    lower = np.concatenate([[0.0], grid[:-1]])
    mid = 0.5 * (lower + grid)
    ix = np.minimum((mid * n).astype(np.int64), n - 1)
    iy = np.minimum((mid * m).astype(np.int64), m - 1)
    weights = grid - lower
    return weights @ np.abs(xs[ix] - ys[iy]) ** p


def sliced_wasserstein(
    x: np.ndarray, y: np.ndarray, n_projections: int = 256, seed: int = 0, p: float = 2
) -> float:
    """(mean over random unit directions θ of W_p^p(θ·x, θ·y))^(1/p)."""
    x, y = _as_f64(x), _as_f64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    theta = np.random.default_rng(seed).standard_normal((x.shape[1], n_projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    total = 0.0
    for start in range(0, n_projections, _PROJECTION_BATCH):
        directions = theta[:, start : start + _PROJECTION_BATCH]
        total += _wasserstein_pp_1d(np.sort(x @ directions, axis=0), np.sort(y @ directions, axis=0), p).sum()
    return float((total / n_projections) ** (1.0 / p))


# --- MMD --------------------------------------------------------------------------------------------------------


def _median_distance(pooled: np.ndarray, rng: np.random.Generator) -> float:
    pts = _subsample(pooled, _MEDIAN_POINTS, rng)
    d2 = np.concatenate([block for _, block in _sq_dist_blocks(pts, pts)])
    return float(np.sqrt(np.median(d2[np.triu_indices(len(pts), k=1)])))


def _kernel_sum(a: np.ndarray, b: np.ndarray, bandwidths: np.ndarray, drop_diagonal: bool) -> float:
    """Σ_ij Σ_h exp(−‖a_i − b_j‖² / (2h²)), without i = j terms when a is b."""
    total = 0.0
    for rows, d2 in _sq_dist_blocks(a, b):
        k = sum(np.exp(-d2 / (2.0 * h**2)) for h in bandwidths)
        if drop_diagonal:
            local = np.arange(len(k))
            k[local, rows.start + local] = 0.0
        total += k.sum()
    return total


def mmd_rbf(
    x: np.ndarray,
    y: np.ndarray,
    bandwidths: list[float] | np.ndarray | None = None,
    max_samples: int = 4000,
    seed: int = 0,
) -> float:
    """Unbiased MMD² with a sum of RBF kernels;
    default bandwidths = median pooled distance × [0.05, 0.1, 0.25, 0.5, 1, 2]
    (the fine scales see blur at the scale of the structure, e.g. a checkerboard square)."""
    x, y = _as_f64(x), _as_f64(y)
    if min(len(x), len(y)) < 2:
        raise ValueError("unbiased MMD needs at least two samples per set")
    rng = np.random.default_rng(seed)
    x, y = _subsample(x, max_samples, rng), _subsample(y, max_samples, rng)
    if bandwidths is None:
        bandwidths = _median_distance(np.concatenate([x, y]), rng) * np.array([0.05, 0.1, 0.25, 0.5, 1.0, 2.0])
    h = np.asarray(bandwidths, dtype=np.float64)
    n, m = len(x), len(y)
    k_xx = _kernel_sum(x, x, h, drop_diagonal=True) / (n * (n - 1))
    k_yy = _kernel_sum(y, y, h, drop_diagonal=True) / (m * (m - 1))
    k_xy = _kernel_sum(x, y, h, drop_diagonal=False) / (n * m)
    return float(k_xx + k_yy - 2.0 * k_xy)


# --- precision / recall -----------------------------------------------------------------------------------------


def _knn_radii_sq(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in x (itself excluded)."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points, got {len(x)}")
    # Column 0 after partitioning is the point itself (distance 0), so index k is the k-th other point.
    return np.concatenate([np.partition(d2, k, axis=1)[:, k] for _, d2 in _sq_dist_blocks(x, x)])


def _inside_manifold(queries: np.ndarray, support: np.ndarray, radii_sq: np.ndarray) -> np.ndarray:
    """True for each query lying within the k-NN ball of at least one support point."""
    return np.concatenate([(d2 <= radii_sq[None, :]).any(axis=1) for _, d2 in _sq_dist_blocks(queries, support)])


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, seed: int = 0, max_samples: int = 10000
) -> dict[str, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al. 2019)."""
    rng = np.random.default_rng(seed)
    real = _subsample(_as_f64(real_features), max_samples, rng)
    fake = _subsample(_as_f64(fake_features), max_samples, rng)
    precision = _inside_manifold(fake, real, _knn_radii_sq(real, k)).mean()
    recall = _inside_manifold(real, fake, _knn_radii_sq(fake, k)).mean()
    return {"precision": float(precision), "recall": float(recall)}
