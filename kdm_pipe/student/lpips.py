"""LPIPS-VGG (Zhang et al. 2018) without torchvision, computed the way the official KDM code computes it.

    d(x, y) = Σ_l mean_hw( w_l · (φ̂_l(x) − φ̂_l(y))² )      φ̂_l = φ_l / ‖φ_l‖ over channels (eps 1e-10)

φ_l are VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 features and w_l the learned 1×1 heads lin0..lin4.

KDM calls piq's `LPIPS(replace_pooling=True)` on (x+1)/2, which normalises u = (x+1)/2 by the ImageNet mean/std.
That equals LPIPS v0.1's scaling layer (x − shift)/scale on x ∈ [−1, 1], since shift = 2·mean − 1 and
scale = 2·std; so this module takes images in [−1, 1] and returns KDM's value. `replace_pooling` turns VGG's
max-pools into 2×2 average pools: pool="avg" (default, KDM) or "max" (the original LPIPS).

Adaptations for small data: grayscale images are repeated to 3 channels, and images under 32 px are upsampled
bilinearly to 32 px first (VGG's four pools would shrink 8 px to nothing before relu5_3).

Weights come only from local files: torchvision's `vgg16-397923af.pth` (keys `features.N.weight/bias`) and
`weights/v0.1/vgg.pth` of the lpips package (keys `lin{i}.model.1.weight`, shape (1, C, 1, 1)). Both are held
as non-persistent buffers: frozen, moved by `.to()`, and kept out of student checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdm_pipe import tensorfile
from kdm_pipe.errors import ConfigError

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)                       # relu1_2 … relu5_3 in torchvision's `features` numbering
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 32
HOW_TO_GET = ("LPIPS needs two local weight files: torchvision's vgg16-397923af.pth "
              "(https://download.pytorch.org/models/vgg16-397923af.pth) and lpips' weights/v0.1/vgg.pth "
              "(https://github.com/richzhang/PerceptualSimilarity, lpips/weights/v0.1/vgg.pth); "
              "pass --lpips-vgg PATH --lpips-lin PATH, or use distance=pseudo_huber, the offline default")


class FrozenConv(nn.Module):
    """A 'same'-padded convolution whose weights are non-persistent buffers."""

    def __init__(self, c_in: int, c_out: int, kernel: int, bias: bool = True) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(c_out, c_in, kernel, kernel), persistent=False)
        self.register_buffer("bias", torch.zeros(c_out) if bias else None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


def vgg16_features(pool: Literal["avg", "max"]) -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3, same indices (so `features.N.*` keys line up)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2))
        else:
            layers += [FrozenConv(c_in, v, 3), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)


def load_into(targets: dict[str, Tensor], path: Path | None, what: str) -> None:
    """Copy the tensors named by `targets`' keys from the state-dict file at `path` into its buffers."""
    if path is None:
        raise ConfigError(f"distance 'lpips' needs the {what} weights but no path was given. {HOW_TO_GET}")
    if not Path(path).is_file():
        raise ConfigError(f"LPIPS {what} weights {path} do not exist. {HOW_TO_GET}")
    try:
        state = tensorfile.load(path)
    except tensorfile.UnloadableError as e:
        raise ConfigError(f"LPIPS {what} weights {path}: {e.why}. {HOW_TO_GET}") from None
    missing = [k for k in targets if k not in state]
    if missing:
        raise ConfigError(f"{path} is not the {what} file: it lacks {', '.join(missing[:3])}"
                          f"{' …' if len(missing) > 3 else ''}. {HOW_TO_GET}")
    for key, buf in targets.items():
        if state[key].shape != buf.shape:
            raise ConfigError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(buf.shape)}")
        buf.copy_(state[key])


def _unit(phi: Tensor, eps: float = 1e-10) -> Tensor:
    return phi / (phi.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Per-sample LPIPS-VGG distance (B,) between image batches in [−1, 1]; see the module docstring."""

    def __init__(self, vgg16_path: Path | None, lpips_path: Path | None, pool: Literal["avg", "max"] = "avg") -> None:
        super().__init__()
        self.features = vgg16_features(pool)
        self.lins = nn.ModuleList(FrozenConv(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        load_into({f"features.{i}.{name}": getattr(m, name) for i, m in enumerate(self.features)
                   if isinstance(m, FrozenConv) for name in ("weight", "bias")}, vgg16_path, "VGG16")
        load_into({f"lin{i}.model.1.weight": m.weight for i, m in enumerate(self.lins)}, lpips_path,
                  "LPIPS linear-head")

    def _prepare(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"LPIPS takes 1- or 3-channel images, got {x.shape[1]} channels")
        if min(x.shape[-2:]) < MIN_SIZE:
            x = F.interpolate(x, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
        return (x - self.shift) / self.scale

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self._prepare(torch.cat([x, y]))    # one VGG pass for both batches
        heads = dict(zip(TAPS, self.lins))
        total = h.new_zeros(x.shape[0])
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in heads:
                phi_x, phi_y = _unit(h).chunk(2)
                total = total + heads[i]((phi_x - phi_y).square()).mean(dim=(1, 2, 3))
        return total
