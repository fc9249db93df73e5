"""EDM preconditioning wrappers: D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise) around a U-Net ``self.model``.

Coefficients (Karras et al. 2022, Table 1):
- VP:  c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1),  c_noise = (M−1)·σ⁻¹(σ)
- VE:  c_skip = 1, c_out = σ,  c_in = 1,          c_noise = ln(σ/2)
- EDM: c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4
The wrapper itself always computes in float32; only the U-Net runs in float16, and only with ``use_fp16`` on CUDA.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdm_pipe.networks.unets import UNETS

Coefficients = tuple[Tensor | float, Tensor | float, Tensor | float, Tensor]


class _Precond(torch.nn.Module):
    """Shared forward; subclasses define ``coefficients(σ) -> (c_skip, c_out, c_in, c_noise)``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 model_kwargs: dict[str, Any]):
        if model_type not in UNETS:
            raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(UNETS)}")
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = UNETS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: Tensor) -> Coefficients:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None,
                force_fp32: bool = False, **model_kwargs: Any) -> Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            # Conditional net asked for an unconditional output: an all-zero label row, broadcast over the batch.
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if use_half else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f"model returned {F_x.dtype}, expected {dtype}")
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        """Nearest σ the network supports; every continuous-σ wrapper supports all σ."""
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021) with σ(t) = √(exp(½β_d t² + β_min t) − 1)."""

    def __init__(self,
                 img_resolution: int,
                 img_channels: int,
                 label_dim: int = 0,
                 use_fp16: bool = False,
                 beta_d: float = 19.9,
                 beta_min: float = 0.1,
                 M: int = 1000,
                 epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet",
                 **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t: Tensor | float) -> Tensor:
        """σ(t) of the VP SDE."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        """t(σ): the positive root of ½β_d t² + β_min t = ln(1 + σ²)."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021)."""

    def __init__(self,
                 img_resolution: int,
                 img_channels: int,
                 label_dim: int = 0,
                 use_fp16: bool = False,
                 sigma_min: float = 0.02,
                 sigma_max: float = 100,
                 model_type: str = "SongUNet",
                 **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return 1, sigma, 1, (0.5 * sigma).log()


class EDMPrecond(_Precond):
    """EDM's own preconditioning: unit-variance network input and target for data of std ``sigma_data``."""

    def __init__(self,
                 img_resolution: int,
                 img_channels: int,
                 label_dim: int = 0,
                 use_fp16: bool = False,
                 sigma_min: float = 0,
                 sigma_max: float = math.inf,
                 sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet",
                 **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma: Tensor) -> Coefficients:
        s2, d2 = sigma ** 2, self.sigma_data ** 2
        return d2 / (s2 + d2), sigma * self.sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt(), sigma.log() / 4
