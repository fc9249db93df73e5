"""2-D teachers whose denoiser is exact: isotropic Gaussian mixtures.

For data p(x) = Σ_k π_k N(μ_k, s_k² I), the noised density at level σ is Σ_k π_k N(μ_k, (s_k² + σ²) I) and the ideal
denoiser is the posterior mean
    D(x, σ) = Σ_k w_k(x) [μ_k + s_k²/(s_k² + σ²) (x − μ_k)],   w_k ∝ π_k N(x; μ_k, (s_k² + σ²) I),
so the teacher's ODE is the true probability-flow ODE of the mixture.
"""

from __future__ import annotations

import numpy as np
import torch

from kdm_pipe.config import CheckerboardTeacherConfig, GMMTeacherConfig
from kdm_pipe.teachers.base import Teacher


class GMMTeacher(Teacher):
    def __init__(self, name: str, params: dict, means: np.ndarray, stds: np.ndarray, weights: np.ndarray):
        # No sampler defaults of its own: an exact denoiser holds at every σ, so EDM's (the model defaults) apply.
        super().__init__(name=name, shape=(means.shape[1],), label_dim=0, params=params)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.var = torch.as_tensor(stds, dtype=torch.float64) ** 2
        self.log_pi = torch.log(torch.as_tensor(weights / weights.sum(), dtype=torch.float64))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        mu, var, log_pi = (t.to(x.device) for t in (self.means, self.var, self.log_pi))
        total = var + sigma.to(x) ** 2                                   # (K,) noised component variances
        d = x.shape[1]
        # Elementwise sums rather than cdist/matmul: BLAS kernels differ with the batch size, and a pair must not.
        sq = ((x[:, None, :] - mu) ** 2).sum(-1)                         # (B, K)
        logw = log_pi - 0.5 * d * torch.log(total) - sq / (2 * total)
        w = torch.softmax(logw, dim=1)                                   # posterior over components
        shrink = var / total                                             # s_k²/(s_k² + σ²)
        # Σ_k w_k [μ_k + shrink_k (x − μ_k)] = Σ_k w_k (1 − shrink_k) μ_k + (Σ_k w_k shrink_k) x
        return ((w * (1 - shrink))[:, :, None] * mu).sum(1) + (w * shrink).sum(1, keepdim=True) * x

    def sample_data(self, n: int, seed: int = 0) -> np.ndarray:
        """Exact draws from the data distribution (for tests and references)."""
        rng = np.random.default_rng(seed)
        pi = np.exp(self.log_pi.numpy())
        k = rng.choice(len(pi), size=n, p=pi / pi.sum())
        return self.means.numpy()[k] + np.sqrt(self.var.numpy()[k])[:, None] * rng.standard_normal((n, self.shape[0]))


def checkerboard_components(cfg: CheckerboardTeacherConfig) -> tuple[np.ndarray, float]:
    """Centres of the per_square × per_square grid in every black square, and the component std."""
    w = 2 * cfg.extent / cfg.size
    spacing = w / cfg.per_square
    offsets = (np.arange(cfg.per_square) + 0.5) * spacing
    centres = []
    for i in range(cfg.size):
        for j in range(cfg.size):
            if (i + j) % 2 == 0:                                         # same rule as metrics.checkerboard_mask
                x0, y0 = -cfg.extent + i * w, -cfg.extent + j * w
                centres += [(x0 + a, y0 + b) for a in offsets for b in offsets]
    return np.array(centres), cfg.std_ratio * spacing


def build_gmm(cfg: GMMTeacherConfig) -> GMMTeacher:
    means = np.array(cfg.means, dtype=np.float64)
    weights = np.array(cfg.weights if cfg.weights is not None else [1.0] * len(means))
    return GMMTeacher("gmm", cfg.model_dump(), means, np.array(cfg.stds), weights)


def build_checkerboard(cfg: CheckerboardTeacherConfig) -> GMMTeacher:
    centres, std = checkerboard_components(cfg)
    return GMMTeacher("checkerboard", cfg.model_dump(), centres, np.full(len(centres), std), np.ones(len(centres)))
