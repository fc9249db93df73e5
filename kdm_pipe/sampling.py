"""EDM's deterministic samplers (Karras et al. 2022, Algorithm 1 with S_churn = 0) and per-seed noise.

A pair depends only on (teacher, sampler settings, batch size, seed[, label]): every sample draws its latent (and
label) from its own generator seeded with `seed mod 2**32`, so worker count and batch neighbours never change a
pair. (Network teachers on CPU may differ in the last bits between batch sizes: convolution kernels are chosen per
batch shape. The analytic teachers are batch-size invariant.)
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """t_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N, then t_N = 0 (float64, N + 1 values)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    denom = max(steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def schedule(sampler) -> torch.Tensor:
    """The σ schedule of a resolved SamplerConfig: what the solver runs and the manifest records."""
    return edm_sigmas(sampler.steps, sampler.sigma_min, sampler.sigma_max, sampler.rho)


def nfe(steps: int, solver: str) -> int:
    """Denoiser evaluations: Heun corrects every step but the last (to σ = 0), so 2N − 1; Euler N."""
    return 2 * steps - 1 if solver == "heun" else steps


def solve(
    denoise: Denoiser,
    x_T: torch.Tensor,
    sigmas: torch.Tensor,
    labels: torch.Tensor | None = None,
    solver: str = "heun",
    keep: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integrate the probability-flow ODE dx/dσ = (x − D(x, σ))/σ from sigmas[0] to sigmas[-1] = 0.

    x_T is the scaled noise σ_max·z. The state is float64 throughout (EDM does the same); `denoise` receives the
    float64 state and returns float64. `keep` lists the step indices i (0 = x_T, N = x_0) whose states are
    returned as a trajectory of shape (B, len(keep), ...).
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"unknown solver {solver!r}; use 'heun' or 'euler'")
    x = x_T.to(torch.float64)
    states = [x] if keep is not None and 0 in keep else []
    n = len(sigmas) - 1
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - denoise(x, t_cur, labels)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur                      # Euler step
        if solver == "heun" and t_next > 0:                           # 2nd-order correction, not on the last step
            d_next = (x_next - denoise(x_next, t_next, labels)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
        if keep is not None and i + 1 in keep:
            states.append(x)
    traj = torch.stack(states, dim=1) if keep is not None else None
    return x, traj


def trajectory_steps(mode: str, steps: int) -> list[int] | None:
    """Which states to keep: 'none', 'all' (x_T … x_0), or 'every-K' (every K-th state, always x_T and x_0)."""
    if mode == "none":
        return None
    if mode == "all":
        return list(range(steps + 1))
    k = int(mode.split("-", 1)[1])
    return sorted(set(range(0, steps + 1, k)) | {steps})


def seed_noise(
    seeds: list[int], shape: tuple[int, ...], label_dim: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit latents z (B, *shape) and one-hot labels (B, label_dim) or None, one generator per seed.

    As EDM does, the class label is drawn from the same generator right after the latent.
    """
    zs, labels = [], []
    for s in seeds:
        g = torch.Generator(device=device).manual_seed(int(s) % (1 << 32))
        zs.append(torch.randn(shape, generator=g, device=device, dtype=torch.float32))
        if label_dim:
            labels.append(torch.randint(label_dim, (1,), generator=g, device=device))
    z = torch.stack(zs)
    if not label_dim:
        return z, None
    return z, torch.nn.functional.one_hot(torch.cat(labels), label_dim).to(torch.float32)
