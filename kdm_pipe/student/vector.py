"""Students for vector data (2-D and other flat pairs), as the official checkerboard configuration builds them.

KDM: encoders E_T, E_0 and decoder D are MLPs (depth × hidden, SiLU); C is the Koopman operator on the latent.
    z_0 = E_0(x_0)   z_T = E_T(x_T)   ẑ_0 = C(z_T + σ_z ε) [+ B y]
    L = w_lat·mean((z_0 − ẑ_0)²) + w_rec·d(x_0, D(z_0 + σ_z ε')) + w_push·d(x_0, D(ẑ_0)) + w_reg·(operator regularisers)
    one step: x̂_0 = D(C(E_T(x_T)))
KD (Luhman & Luhman 2021): one network regressing x_0 from x_T, L = d(x_0, G(x_T)).

x_T enters scaled by 1/σ_max: the official 2-D setup draws x_T ~ N(0, I), while our pairs store x_T = σ_max·z.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdm_pipe.config import StudentConfig
from kdm_pipe.student.koopman import KoopmanOperator
from kdm_pipe.student.noise import LatentNoise


def mlp(d_in: int, d_out: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(hidden if depth else d_in, d_out))


def distance(kind: str, x: Tensor, y: Tensor, c: float = 0.03) -> Tensor:
    """Per-batch mean distance: L2 (mean squared error) or pseudo-Huber √((x−y)² + c²) − c."""
    if kind == "l2":
        return ((x - y) ** 2).mean()
    if kind == "pseudo_huber":
        return (((x - y) ** 2 + c * c).sqrt() - c).mean()
    raise ValueError(f"unknown distance {kind!r}")


class VectorKDM(nn.Module):
    def __init__(self, cfg: StudentConfig, data_dim: int, label_dim: int, sigma_max: float):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("x_T_scale", torch.tensor(1.0 / sigma_max))
        self.enc_T = mlp(data_dim + label_dim, cfg.latent_dim, cfg.hidden, cfg.depth)
        self.enc_0 = mlp(data_dim + label_dim, cfg.latent_dim, cfg.hidden, cfg.depth)
        self.dec = mlp(cfg.latent_dim + label_dim, data_dim, cfg.hidden, cfg.depth)
        self.koopman = KoopmanOperator(cfg.latent_dim, cfg.operator, label_dim, cfg.spectrum_prior)

    @staticmethod
    def _cat(x: Tensor, labels: Tensor | None) -> Tensor:
        return x if labels is None else torch.cat([x, labels], dim=1)

    def encode_T(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.enc_T(self._cat(x_T * self.x_T_scale, labels))

    def encode_0(self, x_0: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.enc_0(self._cat(x_0, labels))

    def push(self, z_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """ẑ_0 = C z_T [+ B y]."""
        return self.koopman(z_T, labels)

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.dec(self._cat(z, labels))

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """One-step generation x̂_0 = D(C(E_T(x_T)))."""
        return self.decode(self.push(self.encode_T(x_T, labels), labels), labels)

    def losses(self, x_0: Tensor, x_T: Tensor, labels: Tensor | None, noise: LatentNoise) -> dict[str, Tensor]:
        c = self.cfg
        z_0, z_T = self.encode_0(x_0, labels), self.encode_T(x_T, labels)
        eps = noise(z_T)
        eps_rec = noise(z_0)
        z_hat = self.push(z_T + c.sigma_z * eps, labels)
        out = {"latent": ((z_0 - z_hat) ** 2).mean(),
               "rec": distance(c.distance, x_0, self.decode(z_0 + c.sigma_z * eps_rec, labels))}
        if c.w_push:
            out["push"] = distance(c.distance, x_0, self.decode(z_hat, labels))
        out.update(self.koopman.regularizer())
        weights = {"latent": c.w_latent, "rec": c.w_rec, "push": c.w_push}
        out["total"] = sum(weights.get(k, c.w_reg) * v for k, v in out.items())
        return out


class VectorKD(nn.Module):
    """Knowledge-distillation baseline: G(x_T) ≈ x_0 by direct regression."""

    def __init__(self, cfg: StudentConfig, data_dim: int, label_dim: int, sigma_max: float):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("x_T_scale", torch.tensor(1.0 / sigma_max))
        self.net = mlp(data_dim + label_dim, data_dim, cfg.hidden, cfg.depth)

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        x = x_T * self.x_T_scale
        return self.net(x if labels is None else torch.cat([x, labels], dim=1))

    def losses(self, x_0: Tensor, x_T: Tensor, labels: Tensor | None, noise: LatentNoise) -> dict[str, Tensor]:
        loss = distance(self.cfg.distance, x_0, self(x_T, labels))
        return {"rec": loss, "total": loss}


STUDENTS = {"kdm": VectorKDM, "kd": VectorKD}


def build_vector_student(cfg: StudentConfig, data_dim: int, label_dim: int, sigma_max: float) -> nn.Module:
    return STUDENTS[cfg.kind](cfg.for_data(image=False), data_dim, label_dim, sigma_max)
