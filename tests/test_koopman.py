"""Koopman operators: maths of the decomposed form against numpy, losses, priors, dense kinds, control."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from kdm_pipe.student.koopman import KoopmanOperator, spectrum_target

D = 8


def make(kind="decomposed", seed=0, dtype=torch.float64, **kw) -> KoopmanOperator:
    torch.manual_seed(seed)
    return KoopmanOperator(D, kind, **kw).to(dtype)


def complex_factors(k: KoopmanOperator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P (rows of Re and Im each unit-normalised, with the module's 1e-8 guard), λ, P⁻¹ as complex numpy arrays."""
    op = k.op
    def unit(x):
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
    P = unit(op.P_re.detach().numpy()) + 1j * unit(op.P_im.detach().numpy())
    r = np.exp(-np.exp(op.nu.detach().numpy()))
    lam = r * np.exp(1j * np.exp(op.theta.detach().numpy()))
    P_inv = op.P_inv_re.detach().numpy() + 1j * op.P_inv_im.detach().numpy()
    return P, lam, P_inv


def block(c: np.ndarray) -> np.ndarray:
    return np.block([[c.real, -c.imag], [c.imag, c.real]])


def set_exact_inverse(k: KoopmanOperator) -> None:
    P, _, _ = complex_factors(k)
    inv = np.linalg.inv(P)
    with torch.no_grad():
        k.op.P_inv_re.copy_(torch.from_numpy(inv.real))
        k.op.P_inv_im.copy_(torch.from_numpy(inv.imag))


def test_decomposed_matches_block_and_complex_numpy():
    k = make()
    P, lam, P_inv = complex_factors(k)
    K_complex = (P * lam) @ P_inv
    K_block = block(P) @ block(np.diag(lam)) @ block(P_inv)
    np.testing.assert_allclose(K_block[:D, :D], K_complex.real, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(k.matrix().detach().numpy(), K_complex.real, rtol=1e-10, atol=1e-12)
    z = torch.randn(5, D, dtype=torch.float64)
    K = k.matrix().detach().numpy()
    np.testing.assert_allclose(k(z).detach().numpy(), z.numpy() @ K.T, rtol=1e-10, atol=1e-12)
    # the official way: [z, 0] through the 2d×2d blocks, keep the first d entries
    z_pad = np.concatenate([z.numpy(), np.zeros_like(z.numpy())], axis=1)
    np.testing.assert_allclose(k(z).detach().numpy(), (z_pad @ K_block.T)[:, :D], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(k.eigenvalues().detach().numpy(), lam, rtol=1e-10, atol=1e-12)


def test_eigenvalues_inside_unit_disk_even_for_extreme_parameters():
    k = make()
    assert (k.eigenvalues().abs() < 1).all()
    with torch.no_grad():
        k.op.nu.copy_(torch.tensor([-60.0, -20.0, -5.0, 0.0, 3.0, 50.0, -1e3, 1e3], dtype=torch.float64))
        k.op.theta.copy_(torch.tensor([-50.0, 0.0, 4.0, 6.0, -3.0, 1.0, 5.0, 2.0], dtype=torch.float64))
    mod = k.eigenvalues().abs()
    assert torch.isfinite(mod).all()
    # |λ| = exp(−exp(ν)) < 1 mathematically; it rounds to 1 once exp(ν) is below the float resolution
    assert (mod <= 1 + 1e-12).all()
    assert (mod[[2, 3, 4]] < 1).all() and mod[5] == 0


def test_eigenvalues_are_spectrum_of_the_operator_when_inverse_is_exact():
    k = make(seed=1)
    set_exact_inverse(k)
    P, lam, P_inv = complex_factors(k)
    ev = np.sort_complex(np.linalg.eigvals((P * lam) @ P_inv))
    np.testing.assert_allclose(ev, np.sort_complex(k.eigenvalues().detach().numpy()), atol=1e-9)
    # the real 2d×2d block operator carries λ and their conjugates
    block_ev = np.sort_complex(np.linalg.eigvals(block(P) @ block(np.diag(lam)) @ block(P_inv)))
    np.testing.assert_allclose(block_ev, np.sort_complex(np.concatenate([lam, lam.conj()])), atol=1e-9)


def test_inverse_loss_equals_block_mse_zero_when_exact():
    k = make(seed=2)
    P, _, P_inv = complex_factors(k)
    eye = np.eye(2 * D)
    expected = np.mean((block(P_inv) @ block(P) - eye) ** 2) + np.mean((block(P) @ block(P_inv) - eye) ** 2)
    loss = k.op.inverse_loss()
    assert loss.item() == pytest.approx(expected, rel=1e-10) and loss.item() > 0.1
    set_exact_inverse(k)
    assert k.op.inverse_loss().item() < 1e-20


def test_adam_on_inverse_loss_alone_drives_it_down():
    k = make(seed=3, dtype=torch.float32)
    start = k.op.inverse_loss().item()
    opt = torch.optim.Adam(k.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        k.op.inverse_loss().backward()
        opt.step()
    assert k.op.inverse_loss().item() < 1e-2 * start


@pytest.mark.parametrize("prior", ["uniform", "gradual", "circle"])
def test_spectrum_prior_decreases_under_adam(prior):
    k = make(spectrum_prior=prior, dtype=torch.float32)
    lam, u = k.eigenvalues().detach(), k.prior_target
    start = k.regularizer()["spectrum"]
    assert start.item() == pytest.approx((lam - torch.complex(u[:, 0], u[:, 1])).abs().mean().item(), rel=1e-6)
    opt = torch.optim.Adam([k.op.nu, k.op.theta], lr=5e-2)
    for _ in range(200):
        opt.zero_grad()
        k.regularizer()["spectrum"].backward()
        opt.step()
    assert k.regularizer()["spectrum"].item() < 0.6 * start.item()


def test_prior_targets():
    u = spectrum_target("gradual", 101, seed=4)
    radius = u.norm(dim=1)
    assert (radius[:51] >= 0.9).all() and (radius[:51] <= 1).all()
    assert (radius[51:] <= 0.5).all()
    assert radius[:51].min() < 0.93 and radius[51:].max() > 0.4  # spread over the ranges, not a point
    uni = spectrum_target("uniform", 500, seed=4)
    assert uni.abs().max() <= 1 and (uni < -0.9).any() and (uni > 0.9).any()
    assert torch.equal(uni, spectrum_target("uniform", 500, seed=4))
    assert not torch.equal(uni, spectrum_target("uniform", 500, seed=5))
    assert torch.equal(spectrum_target("circle", 3, seed=0), torch.tensor([[1.0, 0.0]] * 3))
    # the prior has its own generator: the operator's parameters only follow the global seed
    a, b = make(spectrum_prior="uniform", prior_seed=1), make(spectrum_prior="gradual", prior_seed=9)
    assert torch.equal(a.op.P_re, b.op.P_re) and torch.equal(a.op.nu, b.op.nu)
    assert "prior_target" in a.state_dict() and "prior_target" not in make().state_dict()


def test_regularisers_as_the_official_code_adds_them():
    """The inverse loss comes only with a spectrum prior (both inside the official `eigen_loss`); dense operators
    take a prior too."""
    with pytest.raises(ValueError, match="kind"):
        KoopmanOperator(D, "dense")
    with pytest.raises(ValueError, match="spectrum prior"):
        KoopmanOperator(D, "affine", spectrum_prior="unit")
    assert make().regularizer() == {} and make("affine").regularizer() == {}
    assert set(make(spectrum_prior="circle").regularizer()) == {"inverse", "spectrum"}
    for kind in ("affine", "linear"):
        assert set(make(kind, spectrum_prior="uniform").regularizer()) == {"spectrum"}


@pytest.mark.parametrize("prior", ["uniform", "gradual", "circle"])
@pytest.mark.parametrize("kind", ["affine", "linear"])
def test_dense_spectrum_prior_is_the_best_matched_mean_distance_and_trains(kind, prior):
    k = make(kind, spectrum_prior=prior, prior_seed=3)
    lam = np.linalg.eigvals(k.op.weight.detach().numpy())
    u = k.prior_target.numpy() @ np.array([1, 1j])
    perms = np.array(list(itertools.permutations(range(D))))            # brute force over all 8! matchings
    best = np.abs(lam[None, :] - u[perms]).mean(axis=1).min()
    start = k.regularizer()["spectrum"]
    assert start.item() == pytest.approx(best, rel=1e-10)
    opt = torch.optim.Adam(k.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        k.regularizer()["spectrum"].backward()
        opt.step()
    assert k.op.weight.grad.abs().sum() > 0
    assert k.regularizer()["spectrum"].item() < 0.7 * start.item()
    if prior == "circle":                                               # every eigenvalue pulled towards 1
        assert (k.eigenvalues() - 1).abs().max() < np.abs(lam - 1).max()


@pytest.mark.parametrize("kind", ["affine", "linear"])
def test_dense_kinds(kind):
    k = make(kind, seed=5, dtype=torch.float32)
    torch.manual_seed(5)
    ref = nn.Linear(D, D, bias=kind == "affine")
    assert torch.equal(k.matrix(), ref.weight)  # initialised exactly as nn.Linear
    assert (k.op.bias is not None) == (kind == "affine")
    z = torch.randn(6, D)
    bias = k.op.bias if kind == "affine" else 0
    torch.testing.assert_close(k(z), z @ k.matrix().T + bias)
    np.testing.assert_allclose(np.sort_complex(k.eigenvalues().detach().numpy()),
                               np.sort_complex(np.linalg.eigvals(k.matrix().detach().numpy())), atol=1e-5)


@pytest.mark.parametrize("kind", ["affine", "linear", "decomposed"])
def test_control_adds_B_y(kind):
    k = make(kind, label_dim=3)
    z = torch.randn(4, D, dtype=torch.float64)
    y = torch.eye(3, dtype=torch.long)[[0, 2, 1, 2]]  # one-hot of any dtype
    B = k.control
    torch.testing.assert_close(k(z, y) - k.op(z), y.double() @ B.weight.T + B.bias)
    with pytest.raises(ValueError, match="labels"):
        k(z)
    with pytest.raises(ValueError, match="labels"):
        make(kind)(z, y)


@pytest.mark.parametrize("kind", ["affine", "linear", "decomposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_device_and_gradients(kind, dtype):
    k = make(kind, dtype=dtype, label_dim=2, spectrum_prior="uniform")
    z = torch.randn(3, D, dtype=dtype)
    out = k(z, torch.eye(2, dtype=dtype)[[0, 1, 1]])
    assert out.dtype == dtype and out.device == z.device and out.shape == (3, D)
    assert k.matrix().dtype == dtype
    assert k.eigenvalues().dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
    (out.square().sum() + sum(k.regularizer().values())).backward()
    for name, p in k.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
