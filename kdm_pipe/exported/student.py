"""A kdm-pipe student's one-step sampler as a diffusers model: x̂_0 = D(C(E_T(x_T)) [+ B y]), or G(x_T) for a KD
baseline, in plain torch.

Written by `kdm-pipe export` into an exported pipeline's `student/` folder beside copies of kdm-pipe's own network
modules (layers.py, unets.py: the U-Nets; mlp.py: the MLPs; koopman.py: the operator), so the folder runs without
kdm-pipe installed. config.json holds the constructor arguments below; the weights are the trained student's, under
the same names, keeping only what one-step sampling reads.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from .koopman import KoopmanOperator
from .layers import Linear
from .mlp import build_mlp
from .unets import SongUNet

# The U-Nets' constant time inputs, as kdm-pipe trains them: 1 for E_T and the KD network, 0 for D.
T_ENCODER, T_DECODER = 1.0, 0.0


class KDMStudent(ModelMixin, ConfigMixin):
    """`kind` "kdm" (networks enc_T and dec, the Koopman operator of `operator` [, proj_T, unproj]) or "kd" (one
    network, net); `family` "image"
    (SongUNet keywords in `networks`) or "vector" (MLP specs in `networks`, x_T scaled by 1/σ_max first).
    `standardize` (vector data): None, or {"x_T": bool} — the student works on (x − mean) / std and answers in the
    data's units (buffers mean_0, std_0, mean_T, std_T)."""

    @register_to_config
    def __init__(self, kind: str, family: str, shape: list[int], label_dim: int, sigma_max: float,
                 networks: dict, operator: dict | None = None, latent_channels: int = 0, projection: int = 0,
                 standardize: dict | None = None) -> None:
        super().__init__()
        build = (lambda spec: SongUNet(**spec)) if family == "image" else build_mlp
        for name, spec in networks.items():
            setattr(self, name, build(spec))
        if family == "vector":
            self.register_buffer("x_T_scale", torch.tensor(1.0 / sigma_max))
        if kind == "kdm":
            self.koopman = KoopmanOperator(**operator)
            grid = latent_channels * shape[1] * shape[2] if family == "image" else 0
            self.proj_T = Linear(grid, projection) if projection else None
            self.unproj = Linear(projection, grid) if projection else None
        if standardize is not None:
            dim = int(torch.tensor(shape).prod())
            for name in ("mean_0", "std_0", "mean_T", "std_T"):
                self.register_buffer(name, torch.zeros(dim))

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """x̂_0 from x_T = σ_max·z (B, *shape) and one-hot labels (B, label_dim) or None."""
        c = self.config
        if c.standardize is not None and c.standardize["x_T"]:
            x_T = (x_T - self.mean_T) / self.std_T
        x = self.image(x_T, labels) if c.family == "image" else self.vector(x_T, labels)
        return x if c.standardize is None else x * self.std_0 + self.mean_0

    def image(self, x_T: Tensor, labels: Tensor | None) -> Tensor:
        y = None if labels is None else labels.to(x_T.dtype)
        if self.config.kind == "kd":
            return self.net(x_T, self.time(x_T, T_ENCODER), y)
        z = self.enc_T(x_T, self.time(x_T, T_ENCODER), y).flatten(1)
        z = self.push(z if self.proj_T is None else self.proj_T(z), labels)
        if self.unproj is not None:
            z = self.unproj(z)
        z = z.reshape(-1, self.config.latent_channels, *self.config.shape[1:])
        return self.dec(z, self.time(z, T_DECODER), None if y is None else y.to(z.dtype))

    def vector(self, x_T: Tensor, labels: Tensor | None) -> Tensor:
        def cat(x: Tensor) -> Tensor:
            return x if labels is None else torch.cat([x, labels], dim=1)

        if self.config.kind == "kd":
            return self.net(cat(x_T * self.x_T_scale))
        return self.dec(cat(self.push(self.enc_T(cat(x_T * self.x_T_scale)), labels)))

    def push(self, z: Tensor, labels: Tensor | None) -> Tensor:
        """ẑ_0 = C z_T [+ B y], the operator carried over the whole flow."""
        return self.koopman.carry(z, 1.0, labels if self.koopman.control is not None else None)

    @staticmethod
    def time(x: Tensor, t: float) -> Tensor:
        return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)

