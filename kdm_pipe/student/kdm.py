"""The KDM student's loss and one-step sampler, written once for the MLP (vector.py) and U-Net (image.py) students.

A KDM student has four parts: the encoders E_0 (of x_0) and E_T (of x_T), the Koopman operator C (plus the control
B y when conditional) and the decoder D. A network family provides them as `encode_0`, `encode_T` and `decode`
(and `self.koopman`), with its distance d; `KDM` turns them into REFERENCE §1's training step, with σ_z the latent
noise and ε, ε' ~ N(0, I):

    z_0 = E_0(x_0)                 z_T = E_T(x_T)
    ẑ_0 = C(z_T + σ_z ε) [+ B y]
    x̂_rec  = D(z_0 + σ_z ε')       x̂_push = D(ẑ_0)
    L = w_lat·mean((z_0 − ẑ_0)²) + w_rec·d(x_0, x̂_rec) + w_push·d(x_0, x̂_push)
        [+ 0.01·w_adv·BCE(Disc(x̂_push), 1)] [+ w_reg·(spectrum prior, inverse loss)]

and one-step sampling x̂_0 = D(C(E_T(x_T)) [+ B y]). The KD baselines (one network G(x_T) ≈ x_0) are not KDM
students: they live beside them in vector.py and image.py.
"""
from __future__ import annotations

from torch import Tensor, nn

from kdm_pipe.config import StudentConfig
from kdm_pipe.student.koopman import KoopmanOperator
from kdm_pipe.student.noise import LatentNoise


def distance(kind: str, x: Tensor, y: Tensor, c: float = 0.03) -> Tensor:
    """Per-batch mean distance: L2 (mean squared error) or pseudo-Huber √((x−y)² + c²) − c."""
    if kind == "l2":
        return ((x - y) ** 2).mean()
    if kind == "pseudo_huber":
        return (((x - y) ** 2 + c * c).sqrt() - c).mean()
    raise ValueError(f"unknown distance {kind!r}")


class KDM(nn.Module):
    """Base of the KDM students: subclasses build `cfg`, `koopman` and the networks behind encode_0 / encode_T /
    decode (latents flattened to (B, latent_dim)), and may override `distance` and `adversarial`."""

    cfg: StudentConfig
    koopman: KoopmanOperator
    # x̂_push = D(ẑ_0) is drawn for the push term; a student whose adversarial term (or its callers) use x̂_push
    # draws it even when w_push = 0.
    always_push = False
    adv_weight = 0.0

    def encode_0(self, x_0: Tensor, labels: Tensor | None = None) -> Tensor:
        """z_0 = E_0(x_0)."""
        raise NotImplementedError

    def encode_T(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """z_T = E_T(x_T)."""
        raise NotImplementedError

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """x̂ = D(z)."""
        raise NotImplementedError

    def push(self, z_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """ẑ_0 = C z_T [+ B y]."""
        return self.koopman(z_T, labels if self.koopman.control is not None else None)

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """d(x, y) of the config (L2 or pseudo-Huber)."""
        return distance(self.cfg.distance, x, y, self.cfg.huber_c)

    def adversarial(self, disc: nn.Module | None, fake: Tensor | None, defer: bool = False) -> dict[str, Tensor]:
        """The adversarial term on x̂_push: none here (image students add BCE(Disc(x̂_push), 1))."""
        if disc is not None:
            raise ValueError(f"{type(self).__name__} has no adversarial term; call losses() without disc")
        return {}

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """One-step generation x̂_0 = D(C(E_T(x_T)) [+ B y])."""
        return self.decode(self.push(self.encode_T(x_T, labels), labels), labels)

    def losses(self, x_0: Tensor, x_T: Tensor, labels: Tensor | None, noise: LatentNoise,
               disc: nn.Module | None = None, defer_adv: bool = False) -> dict[str, Tensor]:
        """The weighted terms of the KDM loss and their sum, "total" (see the module docstring)."""
        c = self.cfg
        z_0, z_T = self.encode_0(x_0, labels), self.encode_T(x_T, labels)
        eps, eps_rec = noise(z_T), noise(z_0)
        z_hat = self.push(z_T + c.sigma_z * eps, labels)
        x_push = self.decode(z_hat, labels) if c.w_push or self.always_push else None
        x_rec = self.decode(z_0 + c.sigma_z * eps_rec, labels)
        terms = {"latent": ((z_0 - z_hat) ** 2).mean(), "rec": self.distance(x_0, x_rec)}
        if x_push is not None:
            terms["push"] = self.distance(x_0, x_push)
        terms.update(self.koopman.regularizer())
        terms.update(self.adversarial(disc, x_push, defer_adv))
        weights = {"latent": c.w_latent, "rec": c.w_rec, "push": c.w_push, "adv": self.adv_weight}
        terms["total"] = sum(weights.get(k, c.w_reg) * v for k, v in terms.items())
        return terms
