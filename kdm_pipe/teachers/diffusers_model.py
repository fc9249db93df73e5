"""A diffusers UNet2DModel or DiT wrapped as an EDM denoiser D(x, σ, labels) (see docs/TEACHERS.md, "diffusers models").

VP (DDPM-schedule) models: σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) over the T training timesteps; the solver's state x is EDM's
variance-exploding one, the network sees x_vp = x/sqrt(1 + σ²) (= sqrt(ᾱ)·x) and
    ε-prediction  D = x − σ·ε̂,      x0-prediction  D = x̂_0,      v-prediction  D = sqrt(ᾱ)·x_vp − sqrt(1 − ᾱ)·v̂.
Its timestep for a σ between two training σ's is fractional, linear in log σ between them (exactly t on the
training σ's, where an Euler step is a DDIM η = 0 step); a learned timestep embedding takes the nearest integer.

Flow-matching models: x_t = (1 − t)·x_0 + t·ε and v̂ = ε − x_0 at timestep t·T, so D(x, t) = x − t·v̂ makes the
solver's (x − D)/t the velocity: EDM's solver on "σ" = t integrates dx/dt = v̂ from t = 1 (x_T = ε) to 0.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError
from kdm_pipe.runtime import pick_device
from kdm_pipe.teachers.base import Teacher, edm_sampler_defaults
from kdm_pipe.teachers.diffusers_folder import WEIGHTS, ModelFolder
from kdm_pipe.teachers.vae import latent_space


class DiffusersTeacher(Teacher):
    """The network call shared by both parametrisations: float32 input, class labels as indices, float64 out; a
    learned-variance DiT's mean prediction (its first C channels); classifier-free guidance on a DiT,
    out = out(∅) + s·(out(y) − out(∅)), the null class ∅ = its number of classes (D is affine in the network's
    output at a given x and σ, so this is guidance on the denoiser for every prediction type)."""

    def __init__(self, folder: ModelFolder, unet: torch.nn.Module, sampler_defaults: dict[str, Any],
                 params: dict[str, Any]) -> None:
        latent = None if folder.vae is None else latent_space(folder.vae, folder.size)
        if latent is not None:             # the VAE is part of the teacher: pairs of another VAE are another set
            params = {**params, "vae": folder.vae.config, "vae_sha256": latent.vae_sha256}
        super().__init__(name="diffusers", shape=(folder.channels, *folder.size), label_dim=folder.classes,
                         params=params,
                         weights_sha256=storage.sha256(folder.unet_dir / WEIGHTS),
                         sampler_defaults=sampler_defaults, latent=latent)
        self.unet = unet.eval().requires_grad_(False)
        self.device = next(unet.parameters()).device
        self.train_steps = int(folder.scheduler.get("num_train_timesteps", 1000))
        self.learned_time = folder.unet.get("time_embedding_type") == "learned"     # a table: integer t only
        self.guidance = params.get("guidance", 1.0)

    def net(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        classes = None if labels is None else labels.argmax(dim=1).to(self.device)
        inputs = x.to(self.device, torch.float32)
        if self.guidance != 1:                    # the null class beside each label, in one batch
            inputs, classes = inputs.repeat(2, 1, 1, 1), torch.cat([classes, torch.full_like(classes, self.label_dim)])
        t = timestep.round().long() if self.learned_time else timestep.float()
        t = t.to(self.device).reshape(-1).expand(len(inputs))
        out = self.unet(inputs, t, class_labels=classes, return_dict=False)[0][:, :self.shape[0]]
        if self.guidance != 1:
            cond, uncond = out.chunk(2)
            out = uncond + self.guidance * (cond - uncond)
        return out.to(x.device, torch.float64)


class VPTeacher(DiffusersTeacher):
    def __init__(self, folder: ModelFolder, unet: torch.nn.Module, alphas_cumprod: torch.Tensor,
                 params: dict[str, Any]) -> None:
        a = alphas_cumprod.to(torch.float64)
        self.sigmas = ((1 - a) / a).sqrt()                        # σ_t of the T training timesteps, increasing
        if not (torch.isfinite(self.sigmas).all() and (self.sigmas.diff() > 0).all()):
            raise ConfigError(f"diffusers model {folder.unet_dir}: its noise schedule gives no increasing finite σ_t "
                              f"(ᾱ_t must fall strictly inside (0, 1))")
        self.log_sigmas = self.sigmas.log()
        self.prediction = folder.prediction
        defaults = edm_sampler_defaults(max(folder.size), self.sigmas[0].item(), self.sigmas[-1].item())
        super().__init__(folder, unet, defaults, params)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional t with log σ linear between the training σ's (clamped to [0, T − 1])."""
        ls = sigma.to(torch.float64).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        i = (torch.searchsorted(self.log_sigmas, ls.reshape(1), right=True) - 1).clamp(0, len(self.sigmas) - 2)[0]
        return i + (ls - self.log_sigmas[i]) / (self.log_sigmas[i + 1] - self.log_sigmas[i])

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        sigma = sigma.to(torch.float64)
        root_a = 1 / (1 + sigma ** 2).sqrt()                      # sqrt(ᾱ); sqrt(1 − ᾱ) = σ·sqrt(ᾱ)
        x_vp = root_a * x
        out = self.net(x_vp, self.timestep(sigma), labels)
        if self.prediction == "epsilon":
            return x - sigma * out
        if self.prediction == "sample":
            return out
        return root_a * x_vp - sigma * root_a * out               # v-prediction


class FlowTeacher(DiffusersTeacher):
    def __init__(self, folder: ModelFolder, unet: torch.nn.Module, params: dict[str, Any]) -> None:
        steps = edm_sampler_defaults(max(folder.size), 0, 1)["steps"]
        # t from 1 to 0 on diffusers' own uniform grid t_i = 1 − i/N (ρ = 1 from 1 to 1/N, then 0).
        super().__init__(folder, unet, {"solver": "heun", "steps": steps, "sigma_min": 1 / steps, "sigma_max": 1.0,
                                        "rho": 1.0}, params)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        t = t.to(torch.float64)
        return x - t * self.net(x, t * self.train_steps, labels)


def load_teacher(folder: ModelFolder, guidance: float = 1.0) -> DiffusersTeacher:
    device = pick_device()
    net = diffusers.DiTTransformer2DModel if folder.dit else diffusers.UNet2DModel
    try:
        unet = net.from_pretrained(str(folder.unet_dir), local_files_only=True, use_safetensors=True,
                                   low_cpu_mem_usage=False).to(device)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot load diffusers model {folder.unet_dir}: {e}") from None
    params = {"kind": folder.kind, "prediction_type": folder.prediction, "unet": folder.unet,
              "scheduler": folder.scheduler, "device": device.type} | ({"guidance": guidance} if folder.dit else {})
    if folder.kind == "flow":
        return FlowTeacher(folder, unet, params)
    config = {k: v for k, v in folder.scheduler.items() if not k.startswith("_")}
    try:
        scheduler = getattr(diffusers, folder.scheduler["_class_name"]).from_config(config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as e:
        raise ConfigError(f"diffusers model {folder.unet_dir}: its scheduler config is not valid: {e}") from None
    return VPTeacher(folder, unet, scheduler.alphas_cumprod, params)
