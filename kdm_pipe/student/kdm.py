"""The KDM student's loss and one-step sampler, written once for the MLP (vector.py) and U-Net (image.py) students.

A KDM student has four parts: the encoders E_0 (of x_0) and E_T (of x_T), the Koopman operator C (plus the control
B y when conditional) and the decoder D. A network family provides them as `encode_0`, `encode_T` and `decode`
(and `self.koopman`), with its distance d; `KDM` turns them into the training step of docs/METHOD.md, with σ_z
the latent noise and ε, ε' ~ N(0, I):

    z_0 = E_0(x_0)                 z_T = E_T(x_T)
    ẑ_0 = C(z_T + σ_z ε) [+ B y]
    x̂_rec  = D(z_0 + σ_z ε')       x̂_push = D(ẑ_0)
    L = w_lat·mean((z_0 − ẑ_0)²) + w_rec·d(x_0, x̂_rec) + w_push·d(x_0, x̂_push)
        [+ 0.01·w_adv·BCE(Disc(x̂_push), 1)] [+ w_reg·(spectrum prior, inverse loss)]

and one-step sampling x̂_0 = D(C(E_T(x_T)) [+ B y]).

Trajectory supervision (`StudentConfig.trajectory`, pairs with stored states x_k at σ_k, progress τ_k from 0 at
x_T to 1 at x_0): each interior state, scaled to u_k = x_k / √(1 + σ_k²), is encoded at its time, and the operator
carried over τ_k from the same noisy z_T must reach its latent:

    z_k = E(u_k, t_k)              ẑ_k = K(τ_k)(z_T + σ_z ε)          (t_k = 1 − τ_k, K(1) = C)
    L += w'_lat·mean_k mean((z_k − ẑ_k)²) + w'_rec·mean_k d(u_k, D(z_k + σ_z ε'_k, t_k))
         [+ w'_push·mean_k d(u_k, D(ẑ_k, t_k))] [+ w'_onward·mean_k mean((z_0 − K(1 − τ_k) z_k)²)]

Few-step sampling with S steps carries the latent to the recorded times nearest 1/S, 2/S, …, decodes there,
re-encodes and carries on; S = 1 is the one-step sampler. The KD baselines (one network G(x_T) ≈ x_0) are not KDM
students: they live beside them in vector.py and image.py.
"""
from __future__ import annotations

import torch
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

    def encode_state(self, u: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
        """z_k = E(u_k, t_k) of the scaled trajectory state u_k (trajectory supervision)."""
        raise NotImplementedError

    def decode_state(self, z: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
        """û_k = D(z, t_k), the scaled state (trajectory supervision)."""
        raise NotImplementedError

    def operator(self, dim: int, label_dim: int) -> KoopmanOperator:
        """C on `dim` latents; with trajectory supervision a dense C is one of the flow's equal intervals."""
        c = self.cfg
        return KoopmanOperator(dim, c.operator, label_dim, c.spectrum_prior, c.prior_seed,
                               c.trajectory.intervals if c.trajectory else 1)

    def state_time(self, k: int) -> float:
        """t_k = 1 − τ_k, the networks' time input for stored state k (1 at x_T, 0 at x_0: E_T's and E_0's)."""
        return 1 - self.cfg.trajectory.taus[k]

    def state_scale(self, k: int) -> float:
        """1 / √(1 + σ_k²): about 1 / σ_max for x_T and 1 for x_0, so every state enters at about unit size."""
        return (1 + self.cfg.trajectory.sigmas[k] ** 2) ** -0.5

    def push(self, z_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """ẑ_0 = C z_T [+ B y] (with trajectory supervision on a dense operator: C^intervals z_T)."""
        return self.koopman.carry(z_T, 1.0, labels if self.koopman.control is not None else None)

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
               disc: nn.Module | None = None, defer_adv: bool = False,
               traj: Tensor | None = None) -> dict[str, Tensor]:
        """The weighted terms of the KDM loss and their sum, "total" (see the module docstring); `traj` (B, S, ...)
        are the stored states when trajectory supervision is on."""
        c = self.cfg
        z_0, z_T = self.encode_0(x_0, labels), self.encode_T(x_T, labels)
        eps, eps_rec = noise(z_T), noise(z_0)
        z_noisy = z_T + c.sigma_z * eps
        z_hat = self.push(z_noisy, labels)
        x_push = self.decode(z_hat, labels) if c.w_push or self.always_push else None
        x_rec = self.decode(z_0 + c.sigma_z * eps_rec, labels)
        terms = {"latent": ((z_0 - z_hat) ** 2).mean(), "rec": self.distance(x_0, x_rec)}
        if x_push is not None:
            terms["push"] = self.distance(x_0, x_push)
        terms.update(self.koopman.regularizer())
        terms.update(self.adversarial(disc, x_push, defer_adv))
        weights = {"latent": c.w_latent, "rec": c.w_rec, "push": c.w_push, "adv": self.adv_weight}
        if c.trajectory is not None:
            if traj is None:
                raise ValueError("trajectory supervision needs the stored states (traj)")
            terms.update(self.trajectory_terms(traj, z_noisy, z_0, labels, noise))
            t = c.trajectory
            weights.update(traj_latent=t.w_latent, traj_rec=t.w_rec, traj_push=t.w_push, traj_onward=t.w_onward)
        terms["total"] = sum(weights.get(k, c.w_reg) * v for k, v in terms.items())
        return terms

    def interior(self) -> list[int]:
        """Indices of the stored states strictly between x_T and x_0."""
        return [k for k, tau in enumerate(self.cfg.trajectory.taus) if 0 < tau < 1]

    def trajectory_terms(self, traj: Tensor, z_noisy: Tensor, z_0: Tensor, labels: Tensor | None,
                         noise: LatentNoise) -> dict[str, Tensor]:
        """Mean over the interior states of the latent, reconstruction and (with their weights) push and onward
        terms."""
        t, c = self.cfg.trajectory, self.cfg
        lat, rec, push, onward = [], [], [], []
        for k in self.interior():
            u = traj[:, k] * self.state_scale(k)
            z_k = self.encode_state(u, k, labels)
            z_hat = self.koopman.carry(z_noisy, t.taus[k])
            lat.append(((z_k - z_hat) ** 2).mean())
            rec.append(self.distance(u, self.decode_state(z_k + c.sigma_z * noise(z_k), k, labels)))
            if t.w_push:
                push.append(self.distance(u, self.decode_state(z_hat, k, labels)))
            if t.w_onward:
                onward.append(((z_0 - self.koopman.carry(z_k, 1 - t.taus[k])) ** 2).mean())
        out = {"traj_latent": torch.stack(lat).mean(), "traj_rec": torch.stack(rec).mean()}
        for name, terms in (("traj_push", push), ("traj_onward", onward)):
            if terms:
                out[name] = torch.stack(terms).mean()
        return out

    def schedule(self, steps: int) -> list[int]:
        """The stored states a `steps`-step sample stops at: the interior one nearest each j/steps, j < steps."""
        if steps == 1:
            return []
        inner = self.interior() if self.cfg.trajectory is not None else []
        taus = self.cfg.trajectory.taus if inner else []
        stops = [min(inner, key=lambda k: abs(taus[k] - j / steps)) for j in range(1, steps)] if inner else []
        if len(set(stops)) != steps - 1:
            raise ValueError(f"{steps}-step sampling needs {steps - 1} distinct intermediate times; this student "
                             f"knows {len(inner)} (trajectory-supervised students only; use fewer steps)")
        return stops

    def sample(self, x_T: Tensor, labels: Tensor | None = None, steps: int = 1) -> Tensor:
        """x̂_0 in `steps` steps: z = E_T(x_T); at each stop k: z ← K(τ_k − τ) z, û_k = D(z, t_k), z ← E(û_k, t_k);
        finally x̂_0 = D(K(1 − τ) z). Network passes: 2·steps. steps = 1 is forward()."""
        stops = self.schedule(steps)
        if not stops:
            return self(x_T, labels)
        taus, tau = self.cfg.trajectory.taus, 0.0
        z = self.encode_T(x_T, labels)
        for k in stops:
            z = self.encode_state(self.decode_state(self.koopman.carry(z, taus[k] - tau), k, labels), k, labels)
            tau = taus[k]
        return self.decode(self.koopman.carry(z, 1 - tau), labels)
