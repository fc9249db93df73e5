"""Feature detectors for image metrics, and streaming feature extraction.

Every detector sees what EDM's FID sees: uint8 NCHW images made by `to_uint8`. The standard one is the TorchScript
port of TF Inception-v3 (2015-12-05) that StyleGAN2-ADA, EDM and clean-fid use, called as
`net(images, return_features=True)` → (N, 2048) pool features and `net(images, no_output_bias=True)` → (N, 1008)
class probabilities; it resizes to 299×299 itself. Any other TorchScript net taking uint8 NCHW and returning
(N, D) works too (Fréchet distance in its features). Without a file, `PixelFeatures` gives distances in pixel space.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_NAME = "inception-2015-12-05.pt"


class FeatureNet(Protocol):
    """Maps uint8 NCHW images to (N, D) features; `probs` is None when the net has no classifier head."""

    name: str
    rgb: bool  # grey images are repeated to three channels before `features`/`probs`

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def probs(self, images: torch.Tensor) -> torch.Tensor | None: ...


def to_uint8(x: torch.Tensor | np.ndarray, rgb: bool = False) -> torch.Tensor:
    """[−1, 1] NCHW → uint8 NCHW by (x·127.5 + 128).clip(0, 255), EDM's quantisation; `rgb` repeats grey to RGB."""
    x = torch.as_tensor(x)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 teacher outputs round as EDM rounds them
    u8 = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return u8.repeat(1, 3, 1, 1) if rgb and u8.shape[1] == 1 else u8


class TorchScriptDetector:
    """A TorchScript feature net; StyleGAN-style keywords are used when its forward declares them."""

    def __init__(self, net: torch.jit.ScriptModule, name: str):
        self.net = net.eval()
        self.name = name
        args = {a.name for a in net.forward.schema.arguments}
        # The Inception port takes RGB only (and resizes by itself); other nets get the channels as they are.
        self.rgb = "return_features" in args
        self._has_probs = "no_output_bias" in args

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, return_features=True) if self.rgb else self.net(images)

    def probs(self, images: torch.Tensor) -> torch.Tensor | None:
        # no_output_bias matches the original TF Inception Score, which dropped the softmax bias.
        return self.net(images, no_output_bias=True) if self._has_probs else None


class PixelFeatures:
    """Fallback detector: flattened pixels u/127.5 − 1 (the quantised image back in [−1, 1]); D = C·H·W."""

    name = "pixels"
    rgb = False

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).to(torch.float32) / 127.5 - 1

    def probs(self, images: torch.Tensor) -> None:
        return None


def load_detector(path: str | Path | None, device: torch.device | str = "cpu") -> FeatureNet:
    """`PixelFeatures` when `path` is None, else the TorchScript file at `path` on `device`."""
    if path is None:
        return PixelFeatures()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--detector {path}: no such file. FID needs the Inception-v3 feature network as a TorchScript file "
            f"({INCEPTION_NAME}, ~95 MB). On a machine with internet download it from {INCEPTION_URL}, copy it "
            f"here and pass --detector PATH; without --detector, Fréchet distances are reported in pixel space.")
    try:
        net = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--detector {path} is not a TorchScript file torch can load ({e})") from e
    # The file's hash names the feature space, so stats from different nets are never compared.
    return TorchScriptDetector(net, f"{path.name}:{storage.sha256(path)[:12]}")


def _rebatch(images: Iterable[np.ndarray | torch.Tensor], batch: int) -> Iterable[torch.Tensor]:
    """Chunks of exactly `batch` images (the last may be shorter) from chunks of any size."""
    pending: list[torch.Tensor] = []
    held = 0
    for chunk in images:
        chunk = torch.as_tensor(chunk)
        while len(chunk):
            take = chunk[: batch - held]
            pending.append(take)
            held += len(take)
            chunk = chunk[len(take):]
            if held == batch:
                yield torch.cat(pending)
                pending, held = [], 0
    if pending:
        yield torch.cat(pending)


@torch.no_grad()
def feature_batches(net: FeatureNet, images: Iterable[np.ndarray | torch.Tensor], batch: int = 250,
                    device: torch.device | str = "cpu") -> Iterator[np.ndarray]:
    """(B, D) float32 features of each batch of a stream of [−1, 1] NCHW image chunks (memory: one batch)."""
    for x in _rebatch(images, batch):
        yield net.features(to_uint8(x.to(device), rgb=net.rgb)).to(torch.float32).cpu().numpy()


@torch.no_grad()
def embed(net: FeatureNet, images: Iterable[np.ndarray | torch.Tensor], batch: int = 250,
          device: torch.device | str = "cpu", probs: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Stream chunks of [−1, 1] NCHW images through `net` → (features (N, D) float32, probabilities or None).

    Probabilities come from the same pass over `images` (an iterator of generated samples is consumed once).
    """
    feats, prob = [], []
    want_probs = probs
    for x in _rebatch(images, batch):
        u8 = to_uint8(x.to(device), rgb=net.rgb)
        feats.append(net.features(u8).to(torch.float32).cpu().numpy())
        if want_probs:
            p = net.probs(u8)
            if p is None:
                want_probs = False
            else:
                prob.append(p.to(torch.float64).cpu().numpy())
    if not feats:
        raise ValueError("no images to embed")
    return np.concatenate(feats), (np.concatenate(prob) if want_probs else None)


def features(net: FeatureNet, images: Iterable[np.ndarray | torch.Tensor], batch: int = 250,
             device: torch.device | str = "cpu") -> np.ndarray:
    """(N, D) float32 features of a stream of [−1, 1] NCHW image chunks."""
    return embed(net, images, batch, device)[0]
