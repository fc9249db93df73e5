"""A VAE's latent space: the record a latent pair set keeps of it, and decoding its latents into images.

Latent teachers (a diffusers teacher with an AutoencoderKL; docs/TEACHERS.md, "Latent teachers") store x_T and x_0
as latents z. Decoding follows diffusers' pipelines: image = vae.decode(z / scaling_factor + shift_factor), in
[−1, 1] (shift 0 when the VAE's config has none). The VAE is loaded from the folder the manifest records (or a
`--vae` override), and only if its weights are the recorded ones. Decoding runs in float32 batches under no_grad on
the chosen device (deterministic on CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError
from kdm_pipe.manifest import LatentSpace, Manifest
from kdm_pipe.teachers.diffusers_folder import INSTALL, WEIGHTS, VAEFolder, vae_folder


def latent_space(folder: VAEFolder, latent_size: tuple[int, int]) -> LatentSpace:
    """The record of `folder` for a manifest (its weights hashed)."""
    return LatentSpace(vae=str(folder.path.resolve()), vae_sha256=storage.sha256(folder.path / WEIGHTS),
                       scaling_factor=folder.scaling_factor, shift_factor=folder.shift_factor,
                       image_shape=folder.image_shape(latent_size))


class Decoder:
    """Latents of `latent` → images, through the VAE at `path` (default: the recorded folder)."""

    def __init__(self, latent: LatentSpace, device: torch.device | str = "cpu", path: Path | None = None) -> None:
        self.latent, self.device = latent, torch.device(device)
        if path is None and not Path(latent.vae).is_dir():
            raise ConfigError(f"the VAE of these latent pairs is gone from {latent.vae} (latent.vae in their "
                              f"manifest.json); pass --vae FOLDER with the same VAE (sha256 {latent.vae_sha256[:12]}…) "
                              f"or put it back")
        folder = vae_folder(Path(path or latent.vae), "--vae" if path else "latent.vae of the pairs' manifest")
        digest = storage.sha256(folder.path / WEIGHTS)
        if digest != latent.vae_sha256:
            raise ConfigError(f"VAE {folder.path}: its weights (sha256 {digest[:12]}…) are not the ones the pairs were "
                              f"made with (latent.vae_sha256 {latent.vae_sha256[:12]}…); pass --vae with that VAE")
        try:
            import diffusers
        except ImportError as e:
            raise ConfigError(f"decoding latents needs diffusers and safetensors ({e}); {INSTALL}") from None
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(str(folder.path), local_files_only=True,
                                                          use_safetensors=True, low_cpu_mem_usage=False,
                                                          torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot load VAE {folder.path}: {e}") from None
        self.vae = vae.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, z: np.ndarray, batch: int = 64) -> np.ndarray:
        """(N, C, h, w) latents → (N, *image_shape) float32 images."""
        out = []
        for b in range(0, len(z), batch):
            x = torch.as_tensor(z[b:b + batch], dtype=torch.float32, device=self.device)
            x = x / self.latent.scaling_factor + self.latent.shift_factor
            out.append(self.vae.decode(x, return_dict=False)[0].cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, *self.latent.image_shape), np.float32)


def check_override(manifest: Manifest, override: Path | None, where: str) -> None:
    """`--vae` is for latent pairs only (`where`: the pair directory)."""
    if manifest.latent is None and override is not None:
        raise ConfigError(f"--vae {override}: the pairs in {where} are not latents (their manifest records no VAE); "
                          f"drop --vae")


def decoder(manifest: Manifest, override: Path | None, device: torch.device | str, where: str) -> Decoder | None:
    """The decoder of a latent pair set (None for pixel or vector pairs): the recorded VAE, or `override` (--vae)."""
    check_override(manifest, override, where)
    return None if manifest.latent is None else Decoder(manifest.latent, device, override)


def image_shape(manifest: Manifest) -> list[int]:
    """The shape of the set's images: decoded latents', else the pairs' own."""
    return manifest.latent.image_shape if manifest.latent is not None else list(manifest.shape)
