"""Image students (KDM, KD): shapes, loss terms against hand computation, gradients, LPIPS, discriminator, overfit."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from kdm_pipe.config import ConfigError, StudentConfig
from kdm_pipe.student.discriminator import Discriminator, disc_loss, generator_loss
from kdm_pipe.student.image import ImageKD, ImageKDM, build_image_student
from kdm_pipe.student.lpips import LPIPS, TAP_CHANNELS, VGG16_CFG
from kdm_pipe.student.noise import LatentNoise

SHAPE = (1, 8, 8)
TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, dropout=0.0)


def make(shape=SHAPE, label_dim=0, seed=0, **kw) -> ImageKDM | ImageKD:
    torch.manual_seed(seed)
    cfg = StudentConfig(**{**TINY, "distance": "l2", "w_adv": 0.0, **kw})
    return build_image_student(cfg, shape, label_dim)


def batch(n=4, shape=SHAPE, label_dim=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.rand(n, *shape, generator=g) * 2 - 1
    x_T = 80 * torch.randn(n, *shape, generator=g)
    labels = F.one_hot(torch.arange(n) % label_dim, label_dim).float() if label_dim else None
    return x_0, x_T, labels


# --- shapes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, label_dim, latent_dim", [
    ({}, 0, 64),
    ({}, 3, 64),
    ({"projection": 12}, 0, 12),
    ({"projection": 12}, 3, 12),
    ({"operator": "decomposed", "spectrum_prior": "uniform"}, 0, 64),
    ({"latent_channels": 2, "channel_mult": [1, 2, 2, 2]}, 0, 128),
])
def test_kdm_shapes(kw, label_dim, latent_dim):
    m = make(label_dim=label_dim, **kw)
    x_0, x_T, y = batch(label_dim=label_dim)
    assert m.latent_dim == latent_dim
    assert m.encode_0(x_0, y).shape == m.encode_T(x_T, y).shape == (4, latent_dim)
    assert m.push(m.encode_T(x_T, y), y).shape == (4, latent_dim)
    assert m(x_T, y).shape == x_0.shape
    losses = m.losses(x_0, x_T, y, LatentNoise(torch.Generator().manual_seed(0)))
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert ("inverse" in losses and "spectrum" in losses) == (kw.get("operator") == "decomposed")


def test_kd_shapes_and_loss():
    for label_dim in (0, 3):
        m = make(kind="kd", label_dim=label_dim)
        x_0, x_T, y = batch(label_dim=label_dim)
        assert m(x_T, y).shape == x_0.shape
        losses = m.losses(x_0, x_T, y, LatentNoise(torch.Generator()))
        assert torch.allclose(losses["total"], ((m(x_T, y) - x_0) ** 2).mean(), rtol=1e-5)


def test_conditioning_reaches_unets_and_control():
    m = make(label_dim=3)
    x_0, x_T, y = batch(label_dim=3)
    assert m.koopman.control is not None and m.enc_T.map_label is not None and m.dec.map_label is not None
    # EDM's zero-initialised residual convs hide the labels' effect at init; their embeddings still learn.
    m.losses(x_0, x_T, y, LatentNoise(torch.Generator()))["total"].backward()
    for net in (m.enc_0, m.enc_T, m.dec):
        assert net.map_label.weight.grad.abs().sum() > 0
    assert make(label_dim=3, koopman_control=False).koopman.control is None
    with pytest.raises(ValueError, match="labels must be given"):
        m(x_T)
    with pytest.raises(ValueError, match="labels must be given"):
        make()(x_T, y)


def test_time_inputs_are_constant_zero_and_one():
    m = make()
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs):
            seen[name] = inputs[0]
        return hook

    for name in ("enc_0", "enc_T", "dec"):
        getattr(m, name).map_noise.register_forward_pre_hook(record(name))
    x_0, x_T, _ = batch()
    m.losses(x_0, x_T, None, LatentNoise(torch.Generator()))
    assert (seen["enc_0"] == 0).all() and (seen["dec"] == 0).all() and (seen["enc_T"] == 1).all()


# --- loss terms ------------------------------------------------------------------------------------------------

def test_loss_terms_match_hand_computation_with_latent_noise():
    m = make(sigma_z=0.4, w_latent=0.5, w_rec=2.0, w_push=3.0)
    x_0, x_T, _ = batch()
    losses = m.losses(x_0, x_T, None, LatentNoise(torch.Generator().manual_seed(7)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        z_0, z_T = m.encode_0(x_0), m.encode_T(x_T)
        eps, eps_rec = torch.randn(z_T.shape, generator=g), torch.randn(z_0.shape, generator=g)
        z_hat = m.push(z_T + 0.4 * eps)
        latent = ((z_0 - z_hat) ** 2).mean()
        rec = ((x_0 - m.decode(z_0 + 0.4 * eps_rec)) ** 2).mean()
        push = ((x_0 - m.decode(z_hat)) ** 2).mean()
    for key, value in (("latent", latent), ("rec", rec), ("push", push)):
        assert torch.allclose(losses[key], value, rtol=1e-5), key
    assert torch.allclose(losses["total"], 0.5 * latent + 2 * rec + 3 * push, rtol=1e-5)
    assert set(losses) == {"latent", "rec", "push", "total"}


def test_latent_loss_without_noise_and_one_step_sample():
    m = make(sigma_z=0.0)
    x_0, x_T, _ = batch()
    losses = m.losses(x_0, x_T, None, LatentNoise(torch.Generator()))
    with torch.no_grad():
        z_hat = m.koopman.op(m.encode_T(x_T))
        assert torch.allclose(losses["latent"], ((m.encode_0(x_0) - z_hat) ** 2).mean(), rtol=1e-5)
        assert torch.allclose(m.last_sample, m(x_T), atol=1e-6)     # x̂_push is the one-step sample


def test_pseudo_huber_value():
    m = make(distance="pseudo_huber", sigma_z=0.0)
    x_0, x_T, _ = batch()
    losses = m.losses(x_0, x_T, None, LatentNoise(torch.Generator()))
    with torch.no_grad():
        diff = x_0 - m(x_T)
    expected = (torch.sqrt(diff ** 2 + 0.03 ** 2) - 0.03).mean()
    assert torch.allclose(losses["push"], expected, rtol=1e-5)
    assert losses["push"] < ((x_0 - m.last_sample) ** 2).mean().sqrt()   # ≈ L1 here, below RMS


def test_adversarial_term_has_the_001_factor():
    m = make(w_adv=2.0, sigma_z=0.0)
    torch.manual_seed(3)
    disc = Discriminator(1, 8)
    x_0, x_T, _ = batch()
    losses = m.losses(x_0, x_T, None, LatentNoise(torch.Generator()), disc=disc)
    with torch.no_grad():
        logits = disc(m.last_sample)                  # train-mode BN: batch statistics, same value again
    adv = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    assert torch.allclose(losses["adv"], adv, rtol=1e-5)
    rest = losses["latent"] + losses["rec"] + losses["push"]
    assert torch.allclose(losses["total"] - rest, 0.01 * 2.0 * adv, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the discriminator"):
        m.losses(x_0, x_T, None, LatentNoise(torch.Generator()))


def test_deferred_adversarial_term_is_the_same_term_added_by_the_caller():
    """The trainer defers the term (to step the discriminator first): same value, gradients reach the student."""
    m = make(w_adv=2.0, sigma_z=0.0)
    disc = Discriminator(1, 8)
    x_0, x_T, _ = batch()
    inline = m.losses(x_0, x_T, None, LatentNoise(torch.Generator()), disc=disc)
    deferred = m.losses(x_0, x_T, None, LatentNoise(torch.Generator()), defer_adv=True)
    assert "adv" not in deferred and m.last_sample.requires_grad
    adv = m.adversarial_loss(disc)
    assert torch.allclose(adv, inline["adv"], rtol=1e-5) and m.adv_weight == 0.01 * 2.0
    total = deferred["total"] + m.adv_weight * adv
    assert torch.allclose(total, inline["total"], rtol=1e-5)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.dec.parameters())
    m.losses(x_0, x_T, None, LatentNoise(torch.Generator()), disc=disc)
    with pytest.raises(ValueError, match="defer_adv=True"):
        m.adversarial_loss(disc)                      # x̂ of a non-deferred call is detached


def test_decomposed_regularisers_weighted_by_w_reg():
    m = make(operator="decomposed", spectrum_prior="gradual", w_reg=0.25, sigma_z=0.0)
    x_0, x_T, _ = batch()
    losses = m.losses(x_0, x_T, None, LatentNoise(torch.Generator()))
    reg = m.koopman.regularizer()
    expected = losses["latent"] + losses["rec"] + losses["push"] + 0.25 * (reg["inverse"] + reg["spectrum"])
    assert torch.allclose(losses["total"], expected, rtol=1e-5)


def test_gradients_reach_every_part():
    m = make(label_dim=3, projection=12, w_adv=1.0, sigma_z=0.4)
    disc = Discriminator(1, 8)
    x_0, x_T, y = batch(label_dim=3)
    m.losses(x_0, x_T, y, LatentNoise(torch.Generator()), disc=disc)["total"].backward()
    for name in ("enc_0", "enc_T", "dec", "koopman.op", "koopman.control", "proj_0", "proj_T", "unproj"):
        part = m.get_submodule(name)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name
    assert not any(n.startswith("disc") for n, _ in m.named_parameters())


# --- LPIPS -----------------------------------------------------------------------------------------------------

def vgg_state(seed=0) -> dict[str, torch.Tensor]:
    """torchvision's vgg16 key set (features + classifier) with random, shape-correct values."""
    g = torch.Generator().manual_seed(seed)
    state, c_in, i = {}, 3, 0
    for v in VGG16_CFG:
        if v == "M":
            i += 1
            continue
        state[f"features.{i}.weight"] = torch.randn(v, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))
        state[f"features.{i}.bias"] = torch.randn(v, generator=g) * 0.01
        c_in, i = v, i + 2
    state["classifier.6.weight"] = torch.zeros(10, 4)
    return state


def lin_state(seed=1, scale=1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": scale * torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(TAP_CHANNELS)}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    torch.save(vgg_state(), d / "vgg16.pth")
    torch.save(lin_state(), d / "vgg.pth")
    torch.save(lin_state(scale=2.0), d / "vgg_x2.pth")
    return d


def test_lpips_loads_files_and_separates_images(lpips_files):
    lp = LPIPS(lpips_files / "vgg16.pth", lpips_files / "vgg.pth")
    assert len(lp.state_dict()) == 0 and len(list(lp.parameters())) == 0   # frozen, kept out of checkpoints
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = torch.rand(3, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs().max() < 1e-6
    d = lp(x, y)
    assert d.shape == (3,) and (d > 0).all()
    gray = torch.rand(2, 1, 8, 8) * 2 - 1                  # digits: repeated to RGB, upsampled to 32 px
    assert lp(gray, gray).abs().max() < 1e-6 and (lp(gray, gray.flip(-1)) > 0).all()
    doubled = LPIPS(lpips_files / "vgg16.pth", lpips_files / "vgg_x2.pth")
    assert torch.allclose(doubled(x, y), 2 * d, rtol=1e-5)
    assert not torch.allclose(LPIPS(lpips_files / "vgg16.pth", lpips_files / "vgg.pth", pool="max")(x, y), d)


def test_lpips_first_layer_by_hand(lpips_files, tmp_path):
    """Only lin0 on: d = mean_hw Σ_c w_c (φ̂(x) − φ̂(y))², φ = relu1_2 of the ImageNet-normalised (x+1)/2."""
    lins = {k: v * (k.startswith("lin0")) for k, v in lin_state().items()}
    torch.save(lins, tmp_path / "lin0.pth")
    lp = LPIPS(lpips_files / "vgg16.pth", tmp_path / "lin0.pth")
    vgg = vgg_state()
    x, y = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def relu1_2(img):
        u = (F.interpolate(img.expand(-1, 3, -1, -1), size=32, mode="bilinear") + 1) / 2
        u = (u - mean) / std
        h = F.relu(F.conv2d(u, vgg["features.0.weight"], vgg["features.0.bias"], padding=1))
        h = F.relu(F.conv2d(h, vgg["features.2.weight"], vgg["features.2.bias"], padding=1))
        return h / (h.norm(dim=1, keepdim=True) + 1e-10)

    w = lins["lin0.model.1.weight"].view(1, -1, 1, 1)
    expected = (w * (relu1_2(x) - relu1_2(y)) ** 2).sum(1).mean(dim=(1, 2))
    assert torch.allclose(lp(x, y), expected, rtol=1e-4, atol=1e-7)


def test_lpips_missing_or_wrong_files(lpips_files, tmp_path):
    with pytest.raises(ConfigError, match=r"vgg16-397923af\.pth.*v0\.1/vgg\.pth.*--lpips-vgg.*pseudo_huber"):
        LPIPS(tmp_path / "nope.pth", lpips_files / "vgg.pth")
    with pytest.raises(ConfigError, match="no path was given"):
        LPIPS(lpips_files / "vgg16.pth", None)
    with pytest.raises(ConfigError, match="lacks features.0.weight"):
        LPIPS(lpips_files / "vgg.pth", lpips_files / "vgg.pth")
    with pytest.raises(ConfigError, match="no path was given"):
        make(distance="lpips")


@pytest.mark.parametrize("kind", ["lpips", "l2+lpips"])
def test_student_with_lpips_distance(lpips_files, kind):
    m = make(distance=kind, sigma_z=0.0, lpips_vgg=lpips_files / "vgg16.pth", lpips_lin=lpips_files / "vgg.pth")
    assert not any("lpips" in k for k in m.state_dict())
    x_0, x_T, _ = batch()
    losses = m.losses(x_0, x_T, None, LatentNoise(torch.Generator()))
    with torch.no_grad():
        x_hat = m(x_T)
        expected = m.lpips(x_0, x_hat).mean() + (((x_0 - x_hat) ** 2).mean() if kind == "l2+lpips" else 0)
    assert torch.allclose(losses["push"], expected, rtol=1e-4)
    losses["push"].backward()
    assert m.dec.enc["8x8_conv"].weight.grad.abs().sum() > 0


# --- discriminator ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res, logits", [(8, 1), (16, 1), (32, 1), (28, 16), (64, 25)])
def test_discriminator_output_shape(res, logits):
    assert Discriminator(3, res)(torch.randn(2, 3, res, res)).shape == (2, logits)


def test_discriminator_is_the_official_network_at_32px():
    d = Discriminator(3, 32)
    convs = [(m.kernel_size, m.stride, m.out_channels) for m in d.model if isinstance(m, nn.Conv2d)]
    assert convs == [((4, 4), (2, 2), 64), ((4, 4), (2, 2), 128), ((4, 4), (2, 2), 256), ((4, 4), (1, 1), 1)]
    assert [type(m).__name__ for m in d.model] == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU",
                                                    "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d", "Flatten"]
    with pytest.raises(ValueError, match="at least 4 px"):
        Discriminator(1, 2)


class MeanLogit(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] + self.bias


def test_disc_loss_hand_case():
    real = torch.full((2, 1, 4, 4), 2.0)
    fake = torch.full((2, 1, 4, 4), -1.0, requires_grad=True)
    disc = MeanLogit()
    loss = disc_loss(disc, real, fake)
    # BCE(2, 1) + BCE(−1, 0) = softplus(−2) + softplus(−1)
    assert torch.allclose(loss, torch.tensor(math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))))
    loss.backward()
    assert fake.grad is None                                  # the fake is detached for the D step
    # d/db [softplus(−(2+b)) + softplus(−1+b)] at b = 0 = −σ(−2) + σ(−1)
    assert torch.allclose(disc.bias.grad, torch.sigmoid(torch.tensor(-1.0)) - torch.sigmoid(torch.tensor(-2.0)))
    assert torch.allclose(generator_loss(MeanLogit(), fake), torch.tensor(math.log1p(math.exp(1))))


# --- config and errors -----------------------------------------------------------------------------------------

def test_config_rejects_unknown_keys_and_bad_sizes():
    with pytest.raises(ValidationError):
        StudentConfig(hiden=3)
    with pytest.raises(ConfigError, match="divides by 8"):
        make(shape=(1, 12, 12), channel_mult=[1, 2, 2, 2])
    with pytest.raises(ConfigError, match=r"\(C, H, W\)"):
        build_image_student(StudentConfig(), (64,), 0)


# --- overfit ---------------------------------------------------------------------------------------------------

@pytest.mark.slow      # minutes: CI runs it in its slow pass
def test_kdm_overfits_64_fixed_digit_pairs():
    from sklearn.datasets import load_digits
    x_0 = torch.tensor(load_digits().images[:64] / 8 - 1, dtype=torch.float32)[:, None]
    x_T = 80 * torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0))
    m = make(sigma_z=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = ((m(x_T) - x_0) ** 2).mean()
    for _ in range(120):
        opt.zero_grad()
        m.losses(x_0, x_T, None, LatentNoise(gen))["total"].backward()
        opt.step()
    with torch.no_grad():
        after = ((m(x_T) - x_0) ** 2).mean()
    assert after < 0.05 * before, (before.item(), after.item())
