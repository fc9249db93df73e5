"""The latent noise ε, ε' ~ N(0, I) of the KDM loss, drawn so that it does not depend on how the batch is split.

Every rank draws the noise of the whole global batch from the same seeded generator and keeps its own rows, so a
pair gets the same ε whether one process or N data-parallel ranks train on the batch (the cost is noise for
N× the rows, negligible beside the networks).
"""
from __future__ import annotations

import torch
from torch import Tensor


class LatentNoise:
    def __init__(self, gen: torch.Generator, rank: int = 0, world: int = 1) -> None:
        self.gen, self.rank, self.world = gen, rank, world

    def __call__(self, like: Tensor) -> Tensor:
        """ε shaped like `like` (this rank's rows of the global batch)."""
        b = like.shape[0]
        full = torch.randn((b * self.world, *like.shape[1:]), generator=self.gen, device=like.device, dtype=like.dtype)
        return full[self.rank * b:(self.rank + 1) * b]
