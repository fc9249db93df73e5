"""Students for vector data (2-D and other flat pairs), as the official checkerboard configuration builds them.

KDM: encoders E_T, E_0 and decoder D are MLPs; C is the Koopman operator on the latent; the loss and the one-step
sampler are `kdm.KDM`'s (d: L2 or pseudo-Huber; no adversarial term, and x̂_push is drawn only when w_push ≠ 0).
KD (Luhman & Luhman 2021): one network regressing x_0 from x_T, L = d(x_0, G(x_T)).

x_T enters scaled by 1/σ_max: the official 2-D setup draws x_T ~ N(0, I), while our pairs store x_T = σ_max·z.

Two MLP designs (`StudentConfig.mlp`; Swish = SiLU):
- "official", the official 2-D networks: E_0 and E_T are depth × (Linear + Swish) on [x, t] with a constant time
  input t = 0 (E_0) or 1 (E_T), so the latent itself is Swish-activated; D is (depth − 1) × (Linear + Swish) on
  [z, 0] then Linear(hidden → data). With depth 5, hidden = latent = 256 this is the official checkerboard student.
- "linear-head", kdm-pipe's earlier MLPs: depth × (Linear + SiLU) then Linear, for all three nets, no time input
  (the latent is linear).
Labels (conditional vector data, a kdm-pipe extension) are appended to every network's input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdm_pipe.config import StudentConfig
from kdm_pipe.networks.mlp import build_mlp
from kdm_pipe.student.kdm import KDM, distance
from kdm_pipe.student.noise import LatentNoise


def mlp_spec(layers: str, d_in: int, d_out: int, hidden: int, depth: int, time: float | None = None) -> dict:
    return {"layers": layers, "d_in": d_in, "d_out": d_out, "hidden": hidden, "depth": depth, "time": time}


def kdm_specs(cfg: StudentConfig, data_dim: int, label_dim: int) -> dict[str, dict]:
    """The `networks.mlp` specs of E_T, E_0 and D in the MLP design `cfg.mlp`, each taking [input, labels] (built in
    this order: it fixes the seeded initial weights)."""
    x_in, z_in = data_dim + label_dim, cfg.latent_dim + label_dim
    if cfg.mlp == "official":
        return {"enc_T": mlp_spec("swish", x_in + 1, cfg.latent_dim, cfg.hidden, cfg.depth, 1.0),
                "enc_0": mlp_spec("swish", x_in + 1, cfg.latent_dim, cfg.hidden, cfg.depth, 0.0),
                "dec": mlp_spec("linear-head", z_in + 1, data_dim, cfg.hidden, cfg.depth - 1, 0.0)}
    return {"enc_T": mlp_spec("linear-head", x_in, cfg.latent_dim, cfg.hidden, cfg.depth),
            "enc_0": mlp_spec("linear-head", x_in, cfg.latent_dim, cfg.hidden, cfg.depth),
            "dec": mlp_spec("linear-head", z_in, data_dim, cfg.hidden, cfg.depth)}


class VectorKDM(KDM):
    def __init__(self, cfg: StudentConfig, data_dim: int, label_dim: int, sigma_max: float):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("x_T_scale", torch.tensor(1.0 / sigma_max))
        self.specs = kdm_specs(cfg, data_dim, label_dim)          # (what `kdm-pipe export` writes down)
        self.enc_T, self.enc_0, self.dec = (build_mlp(self.specs[k]) for k in ("enc_T", "enc_0", "dec"))
        self.koopman = self.operator(cfg.latent_dim, label_dim)

    @staticmethod
    def _cat(x: Tensor, labels: Tensor | None) -> Tensor:
        return x if labels is None else torch.cat([x, labels], dim=1)

    def encode_T(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """z_T = E_T(x_T / σ_max)."""
        return self.enc_T(self._cat(x_T * self.x_T_scale, labels))

    def encode_0(self, x_0: Tensor, labels: Tensor | None = None) -> Tensor:
        """z_0 = E_0(x_0)."""
        return self.enc_0(self._cat(x_0, labels))

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """x̂ = D(z)."""
        return self.dec(self._cat(z, labels))

    def encode_state(self, u: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
        """z_k = E_0(u_k, t_k) for the scaled state u_k (`KDM.state_scale`)."""
        return self.enc_0(self._cat(u, labels), self.state_time(k))

    def decode_state(self, z: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
        """û_k = D(z, t_k), the scaled state."""
        return self.dec(self._cat(z, labels), self.state_time(k))


class VectorKD(nn.Module):
    """Knowledge-distillation baseline: G(x_T) ≈ x_0 by direct regression (a linear-head MLP; the official 2-D code
    has no KD baseline)."""

    def __init__(self, cfg: StudentConfig, data_dim: int, label_dim: int, sigma_max: float):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("x_T_scale", torch.tensor(1.0 / sigma_max))
        self.specs = {"net": mlp_spec("linear-head", data_dim + label_dim, data_dim, cfg.hidden, cfg.depth)}
        self.net = build_mlp(self.specs["net"])

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        x = x_T * self.x_T_scale
        return self.net(x if labels is None else torch.cat([x, labels], dim=1))

    def losses(self, x_0: Tensor, x_T: Tensor, labels: Tensor | None, noise: LatentNoise) -> dict[str, Tensor]:
        loss = distance(self.cfg.distance, x_0, self(x_T, labels), self.cfg.huber_c)
        return {"rec": loss, "total": loss}


STUDENTS = {"kdm": VectorKDM, "kd": VectorKD}


def build_vector_student(cfg: StudentConfig, data_dim: int, label_dim: int, sigma_max: float) -> nn.Module:
    return STUDENTS[cfg.kind](cfg.for_data(image=False), data_dim, label_dim, sigma_max)
