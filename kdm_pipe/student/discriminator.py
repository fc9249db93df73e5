"""The DCGAN-like discriminator of the official KDM code and its BCE loss (teacher outputs are the real class).

    conv 4×4 s2 → 64, LReLU · conv 4×4 s2 → 128, BN, LReLU · conv 4×4 s2 → 256, BN, LReLU · conv 4×4 s1 p0 → 1

LeakyReLU slope 0.2, padding 1 on the stride-2 convs, logits flattened to (B, n). At 32 px this is the official
network (module names `model.N` included) with one logit per image; at 64 px it is too, and gives a 5×5 map of
patch logits (n = 25) as the official code does on FFHQ/AFHQ.
Small images: a stride-2 conv is used only while the feature map is ≥ 8 px, so the last conv sees ≥ 4 px; the
remaining layers become 3×3 stride-1 convs (size kept) with the same widths. 16 px → 8 → 4 → 4 → 1 logit;
8 px → 4 → 4 → 4 → 1 logit; 28 px → 14 → 7 → 7 → 4×4 logits.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

WIDTHS = (64, 128, 256)


class Discriminator(nn.Module):
    def __init__(self, img_channels: int, img_resolution: int) -> None:
        if img_resolution < 4:
            raise ValueError(f"the discriminator needs images of at least 4 px, got {img_resolution}")
        super().__init__()
        layers: list[nn.Module] = []
        c_in, res = img_channels, img_resolution
        for i, c_out in enumerate(WIDTHS):
            if res >= 8:
                layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
                res //= 2
            else:
                layers.append(nn.Conv2d(c_in, c_out, 3, stride=1, padding=1))
            if i > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c_out
        layers += [nn.Conv2d(c_in, 1, 4, stride=1, padding=0), nn.Flatten()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, n): one per image, or n patch logits for large images."""
        return self.model(x)


def generator_loss(disc: nn.Module, fake: Tensor) -> Tensor:
    """BCE(Disc(x̂), 1): the generator's side (KDM weighs it by 0.01·w_adv)."""
    logits = disc(fake)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def disc_loss(disc: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """BCE(Disc(x_0), 1) + BCE(Disc(x̂), 0), summed as in the official code; `fake` is detached here."""
    d_real, d_fake = disc(real), disc(fake.detach())
    return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
