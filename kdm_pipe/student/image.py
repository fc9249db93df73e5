"""Students for image data, as the official KDM code builds them (docs/METHOD.md).

KDM: E_0, E_T and D are EDM DDPM++ U-Nets (`SongUNet`); C is the Koopman operator on the flattened latent; the
loss (with the adversarial term 0.01·w_adv·BCE(Disc(x̂_push), 1)) and the one-step sampler are `kdm.KDM`'s.
KD (Luhman & Luhman 2021): one U-Net regressing x_0 from x_T, L = d(x_0, G(x_T)) [+ the same adversarial term].

As in the official code the U-Nets' time input is a constant (0 for E_0 and D, 1 for E_T and the KD net): it only
acts as a learned bias — except under trajectory supervision, where E_0 and D also see the stored states at their
times t_k = 1 − τ_k (`kdm.KDM`). x_T (std ≈ σ_max = 80) enters E_T unscaled: no input preconditioning.
Labels (one-hot) feed every U-Net's label embedding and, with `koopman_control`, the control term B y.
The discriminator is not part of the student (its weights must not follow the student's optimiser): pass it to
`losses(..., disc=)`, or call `losses(..., defer_adv=True)` and add `adv_weight · adversarial_loss(disc)` yourself
(the trainer does, so that it can step the discriminator first, as the official code does). x̂ of the last `losses`
call is kept in `last_sample` (detached, or with its graph when the adversarial term is deferred).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdm_pipe.config import ConfigError, StudentConfig
from kdm_pipe.networks import ARCHITECTURES
from kdm_pipe.networks.layers import Linear
from kdm_pipe.networks.unets import SongUNet
from kdm_pipe.student.discriminator import generator_loss
from kdm_pipe.student.kdm import KDM, distance
from kdm_pipe.student.lpips import LPIPS
from kdm_pipe.student.noise import LatentNoise

# DDPM++ without its CIFAR widths: those come from the student config.
DDPMPP = {k: v for k, v in ARCHITECTURES["ddpmpp"].items() if k not in ("model_type", "model_channels", "channel_mult")}


class ImageStudent(nn.Module):
    """What both image students share: U-Net factory, constant time inputs, distance, adversarial term."""

    def __init__(self, cfg: StudentConfig, shape: tuple[int, int, int], label_dim: int) -> None:
        super().__init__()
        channels, height, width = shape
        depth = 2 ** (len(cfg.channel_mult) - 1)
        if height != width or height % depth:
            raise ConfigError(f"image student: the U-Nets need square images whose size divides by {depth} "
                              f"(channel_mult {cfg.channel_mult}), got {height}×{width}; shorten channel_mult")
        self.cfg, self.shape, self.label_dim = cfg, (channels, height, width), label_dim
        self.lpips = LPIPS(cfg.lpips_vgg, cfg.lpips_lin) if "lpips" in cfg.distance else None
        self.last_sample: Tensor | None = None
        self.specs: dict[str, dict] = {}

    def unet(self, name: str, c_in: int, c_out: int) -> SongUNet:
        """The U-Net `name`, its constructor keywords kept in `specs[name]` (what `kdm-pipe export` writes down)."""
        c = self.cfg
        kwargs = dict(img_resolution=self.shape[1], in_channels=c_in, out_channels=c_out, label_dim=self.label_dim,
                      model_channels=c.model_channels, channel_mult=list(c.channel_mult), num_blocks=c.num_blocks,
                      attn_resolutions=list(c.attn_resolutions), dropout=c.dropout, **DDPMPP)
        self.specs[name] = kwargs
        return SongUNet(**kwargs)

    def labels_like(self, labels: Tensor | None, x: Tensor) -> Tensor | None:
        """Labels in x's dtype (the U-Nets cast their weights to the input dtype), checked against label_dim."""
        if (labels is None) != (self.label_dim == 0):
            raise ValueError(f"labels must be given exactly when label_dim > 0 (label_dim={self.label_dim})")
        return None if labels is None else labels.to(x.dtype)

    @staticmethod
    def time(x: Tensor, t: float) -> Tensor:
        return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        kind = self.cfg.distance
        if kind in ("l2", "pseudo_huber"):
            return distance(kind, x, y, self.cfg.huber_c)
        perceptual = self.lpips(x, y).mean()
        return perceptual if kind == "lpips" else distance("l2", x, y) + perceptual

    @property
    def adv_weight(self) -> float:
        """The adversarial term's weight in the total: 0.01·w_adv, as in the official code."""
        return 0.01 * self.cfg.w_adv

    def adversarial_loss(self, disc: nn.Module) -> Tensor:
        """BCE(Disc(x̂), 1) on the last `losses(..., defer_adv=True)` call's x̂, gradients flowing into the student."""
        if self.last_sample is None or not self.last_sample.requires_grad:
            raise ValueError("adversarial_loss needs a preceding losses(..., defer_adv=True) call with gradients on")
        return generator_loss(disc, self.last_sample)

    def adversarial(self, disc: nn.Module | None, fake: Tensor, defer: bool = False) -> dict[str, Tensor]:
        """{"adv": BCE(Disc(x̂), 1)} when the GAN is on and not deferred; keeps x̂ for the discriminator's step
        (detached) or for the caller's `adversarial_loss` (with its graph, when deferred)."""
        self.last_sample = fake if defer else fake.detach()
        if not self.cfg.w_adv or defer:
            return {}
        if disc is None:
            raise ValueError("w_adv > 0 needs the discriminator: call losses(..., disc=Discriminator(...)), "
                             "defer it with losses(..., defer_adv=True), or set w_adv = 0")
        return {"adv": generator_loss(disc, fake)}


class ImageKDM(ImageStudent, KDM):
    """The KDM image student; latents are returned flattened, (B, latent_dim). x̂_push is drawn even when
    w_push = 0: the discriminator and the trainer use it (`last_sample`)."""

    always_push = True

    def __init__(self, cfg: StudentConfig, shape: tuple[int, int, int], label_dim: int = 0) -> None:
        super().__init__(cfg, shape, label_dim)
        channels, res, _ = self.shape
        grid = cfg.latent_channels * res * res
        self.enc_0 = self.unet("enc_0", channels, cfg.latent_channels)
        self.enc_T = self.unet("enc_T", channels, cfg.latent_channels)
        self.dec = self.unet("dec", cfg.latent_channels, channels)
        p = cfg.projection
        self.proj_0 = Linear(grid, p, init_mode="xavier_uniform") if p else None
        self.proj_T = Linear(grid, p, init_mode="xavier_uniform") if p else None
        self.unproj = Linear(p, grid, init_mode="xavier_uniform") if p else None
        self.latent_dim = p or grid
        self.koopman = self.operator(self.latent_dim, label_dim if cfg.koopman_control else 0)

    def _encode(self, net: SongUNet, proj: Linear | None, x: Tensor, t: float, labels: Tensor | None) -> Tensor:
        z = net(x, self.time(x, t), self.labels_like(labels, x)).flatten(1)
        return z if proj is None else proj(z)

    def encode_0(self, x_0: Tensor, labels: Tensor | None = None) -> Tensor:
        """z_0 = E_0(x_0)."""
        return self._encode(self.enc_0, self.proj_0, x_0, 0.0, labels)

    def encode_T(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """z_T = E_T(x_T)."""
        return self._encode(self.enc_T, self.proj_T, x_T, 1.0, labels)

    def decode(self, z: Tensor, labels: Tensor | None = None, t: float = 0.0) -> Tensor:
        """x̂ = D(z) for flattened latents z (at time t: trajectory states)."""
        if self.unproj is not None:
            z = self.unproj(z)
        z = z.reshape(-1, self.cfg.latent_channels, *self.shape[1:])
        return self.dec(z, self.time(z, t), self.labels_like(labels, z))

    def encode_state(self, u: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
        """z_k = E_0(u_k, t_k) for the scaled state u_k (`KDM.state_scale`): the time input, a constant learned
        bias in the official code, tells the encoder where along the flow its input is."""
        return self._encode(self.enc_0, self.proj_0, u, self.state_time(k), labels)

    def decode_state(self, z: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
        """û_k = D(z, t_k), the scaled state."""
        return self.decode(z, labels, self.state_time(k))


class ImageKD(ImageStudent):
    """Knowledge-distillation baseline: one U-Net G(x_T) ≈ x_0, as wide as KDM's."""

    def __init__(self, cfg: StudentConfig, shape: tuple[int, int, int], label_dim: int = 0) -> None:
        super().__init__(cfg, shape, label_dim)
        self.net = self.unet("net", self.shape[0], self.shape[0])

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.net(x_T, self.time(x_T, 1.0), self.labels_like(labels, x_T))

    def losses(self, x_0: Tensor, x_T: Tensor, labels: Tensor | None, noise: LatentNoise,
               disc: nn.Module | None = None, defer_adv: bool = False) -> dict[str, Tensor]:
        x_hat = self(x_T, labels)
        out = {"rec": self.distance(x_0, x_hat), **self.adversarial(disc, x_hat, defer_adv)}
        out["total"] = out["rec"] + self.adv_weight * out.get("adv", 0)
        return out


IMAGE_STUDENTS: dict[str, type[ImageStudent]] = {"kdm": ImageKDM, "kd": ImageKD}


def build_image_student(cfg: StudentConfig, shape: tuple[int, ...], label_dim: int) -> ImageStudent:
    """The student named by `cfg.kind` for images of `shape` = (C, H, W)."""
    if len(shape) != 3:
        raise ConfigError(f"image students need (C, H, W) data, got shape {tuple(shape)}")
    return IMAGE_STUDENTS[cfg.kind](cfg.for_data(image=True), tuple(shape), label_dim)
