"""Nearest training images of teacher samples, and the rules that call a sample a copy (Carlini et al. 2023).

Distance: d(x̂, y) = ‖φ(x̂) − φ(y)‖₂ / √D, the root-mean-square difference per coordinate, where φ is the identity
(pixels in [−1, 1], D = C·H·W) or a detector's features (D its feature size). Dividing by √D makes an absolute
threshold mean the same at any resolution.

For a sample x̂ let d₁ ≤ d₂ ≤ … ≤ d_k be its distances to its k nearest reference images. Carlini et al. (2023,
"Extracting training data from diffusion models", the (ℓ₂, α, n) definition) call x̂ a copy of its nearest
training image when it is much closer to it than to the other near ones:

    relative:  d₁ < α · mean(d₂, …, d_k)      α = 0.5, k = 50 as in the paper
    absolute:  d₁ < τ

The relative rule adapts to how crowded the space is around x̂ (a plain "0" is close to many zeros, a rare digit to
few); the absolute one is the plain near-duplicate test.

Search is exact: blocks of `chunk` queries × `chunk` reference rows, ‖q − r‖² = ‖q‖² − 2 q·r + ‖r‖² as one matrix
product per block, merged into a running top-k; memory is O(chunk² + chunk·k) whatever the sizes. The k distances
found first are then recomputed as direct differences (the expansion's float32 cancellation would blur
near-copies).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdm_pipe import storage
from kdm_pipe.errors import DataError
from kdm_pipe.manifest import ShardInfo
from kdm_pipe.metrics.detectors import FeatureNet, features, load_detector
from kdm_pipe.runtime import pick_device, set_threads
from kdm_pipe.shards import read_shard, repair_hint

ALPHA, K = 0.5, 50                  # Carlini et al.'s α and neighbourhood size
RERANK = 8                          # nearest candidates whose distance is recomputed exactly (see exact_distances)
TAU = 0.1                           # absolute rule: RMS distance in [−1, 1] pixel units (see docs/BENCHMARKS.md)


@torch.no_grad()
def nearest(queries: torch.Tensor, ref: torch.Tensor, ref_sq: torch.Tensor, k: int,
            chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances (n, k) ascending, indices (n, k)) of each query's k nearest rows of `ref` (N, D); `ref_sq` holds
    ‖r‖² per row. Distances are RMS per coordinate (‖q − r‖ / √D)."""
    n, dim = queries.shape
    k = min(k, len(ref))
    dist, index = [], []
    for qs in range(0, n, chunk):
        q = queries[qs:qs + chunk]
        q_sq = (q * q).sum(1, keepdim=True)
        best_d = q.new_empty((len(q), 0))
        best_i = torch.empty((len(q), 0), dtype=torch.int64, device=q.device)
        for rs in range(0, len(ref), chunk):
            r = ref[rs:rs + chunk]
            d2 = torch.addmm(q_sq + ref_sq[rs:rs + chunk], q, r.T, alpha=-2).clamp_(min=0)
            cand_i = torch.arange(rs, rs + len(r), device=q.device).expand(len(q), -1)
            cand_d = torch.cat([best_d, d2], 1)
            best_d, pos = cand_d.topk(min(k, cand_d.shape[1]), dim=1, largest=False, sorted=True)
            best_i = torch.cat([best_i, cand_i], 1).gather(1, pos)
        best_d = best_d.sqrt_()
        best_d[:, :RERANK] = exact_distances(q, ref, best_i[:, :RERANK], chunk)
        best_d, order = best_d.sort(dim=1, stable=True)
        dist.append(best_d.div_(math.sqrt(dim)))
        index.append(best_i.gather(1, order))
    return torch.cat(dist), torch.cat(index)


def exact_distances(q: torch.Tensor, ref: torch.Tensor, index: torch.Tensor, chunk: int) -> torch.Tensor:
    """‖q − ref[index]‖ by direct differences: the expansion loses the digits of a near-copy's distance to
    cancellation (an exact copy came out at ~1e-3·‖q‖), the difference does not. Only the RERANK nearest
    candidates: the others enter a mean, where a relative error of 1e-7 does not matter, and gathering their
    rows cost as much as the whole search (memory-bound). Memory stays within chunk² values."""
    rows = max(1, chunk * chunk // max(1, index.shape[1] * q.shape[1]))
    return torch.cat([(q[s:s + rows, None, :] - ref[index[s:s + rows]]).norm(dim=2)
                      for s in range(0, len(q), rows)]) if len(q) else q.new_empty((0, index.shape[1]))


def flags(d1: np.ndarray, d_rest: np.ndarray, rule: str, threshold: float) -> np.ndarray:
    """Which samples are copies: d₁ < α · mean(d₂…d_k) (relative, α = threshold) or d₁ < τ (absolute)."""
    return d1 < (threshold * d_rest if rule == "relative" else threshold)


def embedding(net: FeatureNet | None, images: np.ndarray, chunk: int, device: torch.device) -> torch.Tensor:
    """φ(images): flattened pixels (net None) or the detector's features, (N, D) float32 on `device`."""
    if net is None:
        return torch.as_tensor(np.asarray(images, np.float32)).flatten(1).to(device)
    parts = (images[s:s + chunk] for s in range(0, len(images), chunk))
    return torch.from_numpy(features(net, parts, batch=chunk, device=device)).to(device)


@dataclass
class Scores:
    """Per scored pair: its seed, d₁, mean(d₂…d_k) and the index of its nearest reference image."""

    seed: np.ndarray
    d1: np.ndarray
    d_rest: np.ndarray
    nearest: np.ndarray


class ShardScorer:
    """One Ray worker's search state: the reference embedding (held once, read from the object store without a
    copy) and its squared norms, the detector, and the settings; `score` handles one shard."""

    def __init__(self, ref: np.ndarray, detector: str | None, k: int, chunk: int, device: str, threads: int | None):
        set_threads(threads)
        self.device = pick_device(device)
        with warnings.catch_warnings():             # the object store's arrays are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            self.ref = torch.from_numpy(ref).to(self.device)
        self.ref_sq = (self.ref * self.ref).sum(1)
        self.net = load_detector(detector, self.device) if detector else None
        self.k, self.chunk = k, chunk

    def ready(self) -> bool:
        return True

    def score(self, directory: str, info: ShardInfo) -> tuple[str, Scores]:
        path = Path(directory) / info.name
        digest = storage.sha256(path)                  # what is recorded as scored must be these very bytes
        if digest != info.sha256:
            raise DataError(f"{path} has sha256 {digest[:12]}…, its manifest entry says {info.sha256[:12]}…; "
                            f"{repair_hint(Path(directory))}")
        parts = []
        for rec in read_shard(path):
            d, i = nearest(embedding(self.net, rec["x_0"], self.chunk, self.device), self.ref, self.ref_sq,
                           self.k, self.chunk)
            rest = d[:, 1:].mean(1) if d.shape[1] > 1 else torch.full_like(d[:, 0], math.nan)
            parts.append((rec["seed"].astype(np.int64), d[:, 0].cpu().numpy(), rest.cpu().numpy(),
                          i[:, 0].cpu().numpy()))
        return info.name, Scores(*(np.concatenate(col) for col in zip(*parts)))
