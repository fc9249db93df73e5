import numpy as np
import pytest
import torch

from kdm_pipe.config import GenerateConfig, SamplerConfig
from kdm_pipe.sampling import edm_sigmas, nfe, seed_noise, solve, trajectory_steps
from kdm_pipe.teachers import build_teacher
from kdm_pipe.teachers.analytic import GMMTeacherConfig
from kdm_pipe.teachers.base import NonFiniteTeacherOutput, Teacher


def test_edm_schedule_matches_published_values():
    s = edm_sigmas(18)
    assert len(s) == 19 and s.dtype == torch.float64
    np.testing.assert_allclose(s[:4].numpy(), [80.0, 57.59, 40.79, 28.37], atol=0.01)
    assert s[17].item() == pytest.approx(0.002) and s[18].item() == 0.0
    assert nfe(18, "heun") == 35 and nfe(40, "heun") == 79 and nfe(18, "euler") == 18


def test_heun_solves_gaussian_pf_ode_exactly_in_the_limit():
    # Data N(μ, s²I): the PF-ODE maps x_T to x_0 = μ + s/√(s² + σ_max²)·(x_T − μ).
    mu, s, sigma_max = torch.tensor([0.7, -1.3]), 0.5, 80.0
    teacher = build_teacher(GMMTeacherConfig(means=[mu.tolist()], stds=[s]))
    z, _ = seed_noise(list(range(256)), (2,), 0)
    x_T = sigma_max * z.double()
    exact = mu.double() + s / np.sqrt(s**2 + sigma_max**2) * (x_T - mu.double())
    def err(steps, solver):
        x_0, _ = solve(teacher.denoise, x_T, edm_sigmas(steps, 0.002, sigma_max), solver=solver)
        return (x_0 - exact).abs().max().item()

    heun = [err(n, "heun") for n in (32, 64, 128, 256)]
    euler = [err(n, "euler") for n in (64, 128)]
    # Heun is second order (error ÷4 per doubling of steps), Euler first order (÷2); both converge to the exact map.
    assert all(a / b > 3.5 for a, b in zip(heun, heun[1:])), heun
    assert 1.8 < euler[0] / euler[1] < 2.2, euler
    assert heun[-1] < 5e-4


def test_gmm_denoiser_is_the_posterior_mean():
    # Tweedie: D(x, σ) = x + σ² ∇ log p_σ(x); compare with autograd of the noised mixture density.
    cfg = GMMTeacherConfig(means=[[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]], stds=[0.3, 0.6, 0.2], weights=[1, 2, 1])
    teacher = build_teacher(cfg)
    x = torch.randn(32, 2, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.8, dtype=torch.float64)
    mu = torch.tensor(cfg.means, dtype=torch.float64)
    var = torch.tensor(cfg.stds, dtype=torch.float64) ** 2 + sigma**2
    pi = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    logp = torch.logsumexp(torch.log(pi) - torch.log(2 * np.pi * var) - ((x[:, None] - mu) ** 2).sum(-1) / (2 * var), 1)
    (score,) = torch.autograd.grad(logp.sum(), x)
    expected = x + sigma**2 * score
    np.testing.assert_allclose(teacher.denoise(x.detach(), sigma).numpy(), expected.detach().numpy(), atol=1e-10)


def test_a_pair_depends_only_on_its_seed():
    teacher = build_teacher(GenerateConfig().teacher)
    sampler = SamplerConfig(steps=8)
    together = teacher.sample(sampler, [5, 6, 7, 8], None, torch.device("cpu"))
    alone = teacher.sample(sampler, [7], None, torch.device("cpu"))
    assert torch.equal(together["x_0"][2], alone["x_0"][0]) and torch.equal(together["x_T"][2], alone["x_T"][0])
    assert not torch.equal(together["x_0"][0], together["x_0"][1])


def test_labels_come_from_the_same_generator_after_the_latent():
    z, labels = seed_noise([3, 4], (2,), label_dim=10)
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(z[0], torch.randn((2,), generator=g))
    assert labels[0].argmax().item() == torch.randint(10, (1,), generator=g).item()
    assert labels.sum(1).tolist() == [1.0, 1.0]


def test_trajectory_keeps_requested_states():
    assert trajectory_steps("none", 18) is None
    assert trajectory_steps("all", 4) == [0, 1, 2, 3, 4]
    assert trajectory_steps("every-3", 7) == [0, 3, 6, 7]
    teacher = build_teacher(GenerateConfig().teacher)
    out = teacher.sample(SamplerConfig(steps=6), [1, 2], [0, 3, 6], torch.device("cpu"))
    assert out["traj"].shape == (2, 3, 2)
    assert torch.equal(out["traj"][:, 0], out["x_T"]) and torch.equal(out["traj"][:, -1], out["x_0"])


def test_non_finite_teacher_output_is_refused_naming_the_seed():
    class Broken(Teacher):
        def denoise(self, x, sigma, labels):
            out = x * 0
            out[1] = float("nan")
            return out

    broken = Broken(name="broken", shape=(2,), label_dim=0, params={})
    with pytest.raises(NonFiniteTeacherOutput, match=r"seed\(s\) \[11\]"):
        broken.sample(SamplerConfig(steps=2), [10, 11, 12], None, torch.device("cpu"))
