"""2-D teachers whose denoiser is exact: isotropic Gaussian mixtures.

For data p(x) = Σ_k π_k N(μ_k, s_k² I), the noised density at level σ is Σ_k π_k N(μ_k, (s_k² + σ²) I) and the ideal
denoiser is the posterior mean
    D(x, σ) = Σ_k w_k(x) [μ_k + s_k²/(s_k² + σ²) (x − μ_k)],   w_k ∝ π_k N(x; μ_k, (s_k² + σ²) I),
so the teacher's ODE is the true probability-flow ODE of the mixture.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdm_pipe.teachers.base import Teacher


class GMMTeacherConfig(BaseModel):
    """A general isotropic Gaussian mixture in any dimension."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Literal["gmm"] = "gmm"
    means: list[list[float]] = Field(default=[[-1.0, 0.0], [1.0, 0.0]], min_length=1)
    stds: list[float] = Field(default=[0.2, 0.2])
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "GMMTeacherConfig":
        k, d = len(self.means), len(self.means[0])
        if any(len(m) != d for m in self.means):
            raise ValueError("gmm: every mean must have the same dimension")
        if len(self.stds) != k or any(s <= 0 for s in self.stds):
            raise ValueError(f"gmm: need {k} positive stds (one per mean), got {self.stds}")
        if self.weights is not None and (len(self.weights) != k or any(w <= 0 for w in self.weights)):
            raise ValueError(f"gmm: need {k} positive weights (one per mean), got {self.weights}")
        return self


class CheckerboardTeacherConfig(BaseModel):
    """A mixture tiling the black squares of a size×size board on [−extent, extent]² with a per_square² grid."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Literal["checkerboard"] = "checkerboard"
    size: int = Field(default=4, ge=2)
    extent: float = Field(default=2.0, gt=0, description="board scale: the board spans [−extent, extent]² (the "
                          "official 2-D data: 4 squares of side 2 on [−4, 4]², i.e. extent 4)")
    per_square: int = Field(default=4, ge=1)
    std_ratio: float = Field(default=0.25, gt=0, description="component std as a fraction of the grid spacing")

    def support_mask(self, x: np.ndarray) -> np.ndarray:
        """The support this teacher declares: True where a point of x (N, 2) lies on a black square (evaluation
        reports the fraction of samples off it)."""
        return board_mask(x, self.size, self.extent)


def board_mask(x: np.ndarray, size: int = 4, extent: float = 2.0) -> np.ndarray:
    """True where a point of x (N, 2) lies on a black square of the size×size board on [−extent, extent)².

    With w = 2·extent/size, square (i, j) = (floor((x+extent)/w), floor((y+extent)/w)) counted from the
    lower-left corner is black iff (i + j) is even. The board is half-open so every square has the same
    shape; points off the board are never on it.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"expected (N, 2) points, got shape {x.shape}")
    w = 2.0 * extent / size
    cells = np.floor((x + extent) / w)
    on_board = np.all((cells >= 0) & (cells < size), axis=1)
    black = (cells.sum(axis=1) % 2) == 0
    return on_board & black


class GMMTeacher(Teacher):
    def __init__(self, name: str, params: dict, means: np.ndarray, stds: np.ndarray, weights: np.ndarray):
        super().__init__(name=name, shape=(means.shape[1],), label_dim=0, params=params,
                         sampler_defaults={"steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0})
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
            if (i + j) % 2 == 0:                                         # same rule as board_mask
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
