"""What every teacher is: a denoiser D(x, σ, labels) on a fixed data shape that runs its ODE sampler from seeded
noise, and a fingerprint of itself."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kdm_pipe.sampling import schedule, seed_noise, solve

if TYPE_CHECKING:
    from kdm_pipe.config import SamplerConfig


class NonFiniteTeacherOutput(RuntimeError):
    pass


def fingerprint(name: str, params: dict[str, Any], weights_sha256: str | None = None) -> dict[str, Any]:
    """Identity of a teacher: a pair depends only on this, the sampler settings and the seed."""
    blob = json.dumps({"name": name, "params": params, "weights": weights_sha256}, sort_keys=True)
    return {"name": name, "params": params, "weights_sha256": weights_sha256,
            "sha256": hashlib.sha256(blob.encode()).hexdigest()}


@dataclass
class Teacher:
    """A denoiser with its data shape. `denoise` takes and returns float64 (the solver's state dtype)."""

    name: str
    shape: tuple[int, ...]
    label_dim: int
    params: dict[str, Any]
    weights_sha256: str | None = None
    # The sampler settings this teacher's network calls for (its σ range, its step count): a layer of the sampler's
    # configuration above the model defaults and below the preset and flags (SamplerConfig.over).
    sampler_defaults: dict[str, Any] = field(default_factory=dict)
    # A latent teacher's VAE (kdm_pipe.manifest.LatentSpace): `shape` is then the latents', the images are decoded.
    latent: Any = None

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, sampler: SamplerConfig, seeds: list[int], keep: list[int] | None,
               device: torch.device) -> dict[str, torch.Tensor]:
        """x_T = σ_max·z and the teacher's x_0 (float64), plus labels and the kept trajectory states."""
        z, labels = seed_noise(seeds, self.shape, self.label_dim, device)
        x_T = sampler.sigma_max * z.to(torch.float64)
        x_0, traj = solve(self.denoise, x_T, schedule(sampler).to(device), labels, sampler.solver, keep)
        bad = ~torch.isfinite(x_0.flatten(1)).all(dim=1)
        if bad.any():
            raise NonFiniteTeacherOutput(f"teacher {self.name} gave non-finite x_0 for seed(s) "
                                         f"{[seeds[i] for i in bad.nonzero().flatten().tolist()][:10]}")
        out = {"x_T": x_T, "x_0": x_0, "seed": torch.tensor(seeds, dtype=torch.int64)}
        if labels is not None:
            out["label"] = labels
        if traj is not None:
            out["traj"] = traj
        return out

    @property
    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.name, self.params, self.weights_sha256)


def edm_sampler_defaults(resolution: int, net_sigma_min: float, net_sigma_max: float) -> dict[str, Any]:
    """EDM's choices for an image network (its generate.py and README): the σ range [0.002, 80] clipped to what the
    network was trained on, ρ = 7, and 18 Heun steps up to 32 px, 40 above (EDM's 64 px setting)."""
    return {"solver": "heun", "steps": 18 if resolution <= 32 else 40, "rho": 7.0,
            "sigma_min": max(0.002, float(net_sigma_min)), "sigma_max": min(80.0, float(net_sigma_max))}
