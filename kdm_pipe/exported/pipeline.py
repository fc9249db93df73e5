"""A kdm-pipe one-step student as a diffusers pipeline (written by `kdm-pipe export --format diffusers`).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("FOLDER", trust_remote_code=True)
    out = pipe(seeds=range(16))            # what `kdm-pipe sample RUN --num 16` draws, bit for bit on CPU
    out.samples                            # images: uint8 (N, H, W, C); vectors: float32 (N, D)

Noise as `kdm-pipe sample` draws it (sampling.py is kdm-pipe's own module): for each seed s a generator seeded with
s mod 2³² draws z ~ N(0, I) of the data's shape, then (conditional students) the class label; x_T = σ_max·z, and
x̂_0 = student(x_T, y) in batches of `batch` (on CPU, convolutions and matrix products may differ in the last bits
between batch sizes: keep kdm-pipe sample's --batch, 250 by default, for equal results).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from .sampling import seed_noise


@dataclass
class KDMPipelineOutput(BaseOutput):
    """samples: uint8 (N, H, W, C) images ("np"), float (N, C, H, W) in [−1, 1] ("pt"), PIL images ("pil"), or
    float32 (N, D) vectors; seeds: the seeds drawn from; labels: class indices, or None (unconditional)."""

    samples: object
    seeds: list[int]
    labels: list[int] | None


class KDMPipeline(DiffusionPipeline):
    def __init__(self, student) -> None:
        super().__init__()
        self.register_modules(student=student)

    @torch.no_grad()
    def __call__(self, seeds=None, batch_size: int = 1, generator: torch.Generator | None = None,
                 class_label: int | None = None, output_type: str = "np", batch: int = 250) -> KDMPipelineOutput:
        """Samples from `seeds` (any iterable of ints ≥ 0); without seeds, `batch_size` of them: 0 … batch_size − 1,
        or drawn from `generator` when one is given. `class_label` gives every sample that class (conditional
        students; by default each seed's own draw)."""
        c = self.student.config
        if seeds is None:
            seeds = (torch.randint(1 << 31, (batch_size,), generator=generator).tolist() if generator is not None
                     else list(range(batch_size)))
        seeds = [int(s) for s in seeds]
        if class_label is not None and not 0 <= class_label < c.label_dim:
            raise ValueError(f"class_label {class_label}: the student has {c.label_dim} classes")
        xs, ys = [], []
        for b in range(0, len(seeds), batch):
            z, y = seed_noise(seeds[b:b + batch], tuple(c.shape), c.label_dim)
            if class_label is not None:
                y = torch.nn.functional.one_hot(torch.full((len(z),), class_label), c.label_dim).float()
            x_T = (c.sigma_max * z).to(self.device)
            xs.append(self.student(x_T, None if y is None else y.to(self.device)).cpu())
            ys.append(y)
        x = torch.cat(xs)
        labels = None if ys[0] is None else torch.cat(ys).argmax(1).tolist()
        return KDMPipelineOutput(samples=self.present(x, output_type), seeds=seeds, labels=labels)

    def present(self, x: torch.Tensor, output_type: str):
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"output_type {output_type!r}: use np, pt or pil")
        if output_type == "pt":
            return x
        if len(self.student.config.shape) != 3:                        # vector data
            return x.numpy()
        # kdm-pipe's PNG and samples.npz conversion: (x·127.5 + 128) clipped to 0…255, NHWC.
        pixels = (x.numpy() * 127.5 + 128).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        if output_type == "np":
            return pixels
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
