"""Clean-room EDM networks: sizes and names as EDM's, preconditioning formulas, resampling, forward passes."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from kdm_pipe.networks import ARCHITECTURES, NETWORKS, build_network
from kdm_pipe.networks.layers import Conv2d, PositionalEmbedding, UNetBlock
from kdm_pipe.networks.precond import EDMPrecond, VEPrecond, VPPrecond
from kdm_pipe.networks.unets import DhariwalUNet, SongUNet


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- independent hand counts of EDM's layer shapes -----------------------------------------------------------

def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _block(cin, cout, emb, *, heads, resample=False, film=False, proj=True) -> int:
    n = 2 * cin + _conv(cin, cout, 3) + emb * cout * (2 if film else 1) + cout * (2 if film else 1)
    n += 2 * cout + _conv(cout, cout, 3)
    if cin != cout or (resample and proj):
        n += _conv(cin, cout, 1)
    if heads:
        n += 2 * cout + _conv(cout, 3 * cout, 1) + _conv(cout, cout, 1)
    return n


def song_count(res, c_img, mc, mult, nb, attn, *, noise_mult=1, label_dim=0, augment_dim=0, residual=False):
    emb, noise = 4 * mc, mc * noise_mult
    n = (label_dim * noise + noise if label_dim else 0) + augment_dim * noise + noise * emb + emb + emb * emb + emb
    n += _conv(c_img, mc, 3)
    skips, c, caux = [mc], mc, c_img
    for level, m in enumerate(mult):
        r = res >> level
        if level:
            n += _block(c, c, emb, heads=0, resample=True)
            if residual:
                n += _conv(caux, c, 3)
                caux = c
            skips.append(c)
        for _ in range(nb):
            n += _block(c, mc * m, emb, heads=r in attn)
            c = mc * m
            skips.append(c)
    for level, m in reversed(list(enumerate(mult))):
        r = res >> level
        if level == len(mult) - 1:
            n += _block(c, c, emb, heads=1) + _block(c, c, emb, heads=0)
        else:
            n += _block(c, c, emb, heads=0, resample=True)
        for i in range(nb + 1):
            n += _block(c + skips.pop(), mc * m, emb, heads=i == nb and r in attn)
            c = mc * m
    return n + 2 * c + _conv(c, c_img, 3)


def adm_count(res, c_img, mc, mult, nb, attn, *, label_dim=0):
    emb = 4 * mc
    n = mc * emb + emb + emb * emb + emb + label_dim * emb + _conv(c_img, mc * mult[0], 3)
    skips, c = [mc * mult[0]], mc * mult[0]
    for level, m in enumerate(mult):
        r = res >> level
        if level:
            n += _block(c, c, emb, heads=0, resample=True, film=True, proj=False)
            skips.append(c)
        for _ in range(nb):
            n += _block(c, mc * m, emb, heads=(mc * m // 64) * (r in attn), film=True)
            c = mc * m
            skips.append(c)
    for level, m in reversed(list(enumerate(mult))):
        r = res >> level
        if level == len(mult) - 1:
            n += _block(c, c, emb, heads=c // 64, film=True) + _block(c, c, emb, heads=0, film=True)
        else:
            n += _block(c, c, emb, heads=0, resample=True, film=True, proj=False)
        for _ in range(nb + 1):
            n += _block(c + skips.pop(), mc * m, emb, heads=(mc * m // 64) * (r in attn), film=True)
            c = mc * m
    return n + 2 * c + _conv(c, c_img, 3)


# --- the published CIFAR-10 DDPM++ network ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddpmpp_cifar() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("VPPrecond", img_resolution=32, img_channels=3, label_dim=0, **ARCHITECTURES["ddpmpp"],
                         num_blocks=4, attn_resolutions=[16], dropout=0.13, augment_dim=9)


def test_ddpmpp_cifar_parameter_count_matches_edm(ddpmpp_cifar):
    # EDM reports 55.73M for this network; the exact figure follows from its layer shapes.
    assert n_params(ddpmpp_cifar) == 55_733_891
    assert song_count(32, 3, 128, [2, 2, 2], 4, [16], augment_dim=9) == 55_733_891
    # The same hand count gives EDM's published 295.90M for ImageNet-64 ADM (cond, 1000 classes)...
    assert adm_count(64, 3, 192, [1, 2, 3, 4], 3, [32, 16, 8], label_dim=1000) == 295_899_267
    # ...and 56.40M for CIFAR-10 NCSN++ (checked against the built network at small size below).
    assert song_count(32, 3, 128, [2, 2, 2], 4, [16], noise_mult=2, augment_dim=9, residual=True) == 56_397_827


def test_ddpmpp_cifar_state_dict_names(ddpmpp_cifar):
    sd = ddpmpp_cifar.state_dict()
    expected = {
        "model.map_augment.weight", "model.map_layer0.weight", "model.map_layer0.bias", "model.map_layer1.weight",
        "model.enc.32x32_conv.weight", "model.enc.32x32_conv.bias",
        "model.enc.32x32_block0.norm0.weight", "model.enc.32x32_block3.conv1.weight",
        "model.enc.32x32_block0.affine.weight", "model.enc.32x32_block0.norm1.bias",
        "model.enc.32x32_block0.skip.weight",  # 128 -> 256 channels
        "model.enc.16x16_down.conv0.resample_filter", "model.enc.16x16_down.skip.resample_filter",
        "model.enc.16x16_down.skip.weight",  # DDPM++ projects on resampling skips (resample_proj)
        "model.enc.16x16_block0.norm2.weight", "model.enc.16x16_block0.qkv.weight", "model.enc.16x16_block0.proj.bias",
        "model.dec.8x8_in0.conv0.weight", "model.dec.8x8_in0.qkv.weight", "model.dec.8x8_in1.conv0.weight",
        "model.dec.8x8_block4.conv0.weight", "model.dec.16x16_up.conv0.resample_filter",
        "model.dec.16x16_block4.qkv.weight", "model.dec.32x32_block4.conv1.weight",
        "model.dec.32x32_aux_norm.weight", "model.dec.32x32_aux_conv.weight", "model.dec.32x32_aux_conv.bias",
    }
    absent = {
        "model.map_noise.freqs",  # positional embedding is computed, not stored
        "model.map_label.weight",  # unconditional
        "model.map_augment.bias",
        "model.enc.32x32_block0.qkv.weight", "model.enc.8x8_block0.qkv.weight",
        "model.dec.16x16_block3.qkv.weight",  # decoder attends only in the last block of a level
        "model.dec.8x8_in1.qkv.weight", "model.enc.32x32_block1.skip.weight",
        "model.enc.32x32_conv.resample_filter", "model.dec.16x16_aux_norm.weight",
        "model.dec.32x32_aux_up.resample_filter",
        "model.dec.8x8_up.conv0.weight",  # the lowest level has in0/in1 instead of an up block
    }
    assert expected <= sd.keys()
    assert not absent & sd.keys()
    assert sum(k.endswith("resample_filter") for k in sd) == 2 * 4  # conv0 + skip of 2 down and 2 up blocks
    assert torch.allclose(sd["model.enc.16x16_down.conv0.resample_filter"], torch.full((1, 1, 2, 2), 0.25))


def test_ncsnpp_names_counts_and_filter():
    torch.manual_seed(0)
    arch = {**ARCHITECTURES["ncsnpp"], "model_channels": 16}
    net = build_network("VEPrecond", img_resolution=16, img_channels=3, label_dim=10, **arch, num_blocks=1,
                        attn_resolutions=[8], augment_dim=9)
    sd = net.state_dict()
    assert {"model.map_noise.freqs", "model.map_label.weight", "model.map_label.bias",
            "model.enc.8x8_aux_residual.weight", "model.enc.4x4_aux_residual.resample_filter"} <= sd.keys()
    assert sd["model.map_noise.freqs"].shape == (16,)  # channel_mult_noise 2 -> 32 channels, half are freqs
    f = torch.tensor([1.0, 3, 3, 1])
    assert torch.allclose(sd["model.enc.8x8_down.conv0.resample_filter"][0, 0], torch.outer(f, f) / 64)
    expected = song_count(16, 3, 16, [2, 2, 2], 1, [8], noise_mult=2, label_dim=10, augment_dim=9, residual=True)
    assert n_params(net) == expected == 404_995


def test_adm_names_and_counts():
    torch.manual_seed(0)
    arch = {**ARCHITECTURES["adm"], "model_channels": 32, "channel_mult": [1, 2, 3]}
    net = build_network("EDMPrecond", img_resolution=16, img_channels=3, label_dim=10, **arch, num_blocks=1,
                        attn_resolutions=[8, 4])
    sd = net.state_dict()
    assert {"model.map_label.weight", "model.out_norm.weight", "model.out_conv.weight", "model.map_layer1.bias",
            "model.enc.8x8_down.skip.resample_filter", "model.enc.8x8_block0.qkv.weight",
            "model.dec.4x4_in0.qkv.weight", "model.dec.8x8_block1.proj.weight"} <= sd.keys()
    # ADM: no label bias, no projection on same-width resampling skips, 64 channels per head (32 ch -> none).
    assert not {"model.map_label.bias", "model.enc.8x8_down.skip.weight", "model.enc.16x16_block0.qkv.weight",
                "model.dec.8x8_aux_norm.weight"} & sd.keys()
    assert net.model.enc["8x8_block0"].num_heads == 1 and net.model.dec["4x4_in0"].num_heads == 1
    expected = adm_count(16, 3, 32, [1, 2, 3], 1, [8, 4], label_dim=10)
    assert n_params(net) == expected == 2_190_147


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown network class"):
        build_network("NoSuchNet", img_resolution=8)
    with pytest.raises(ValueError, match="model_type"):
        VPPrecond(img_resolution=8, img_channels=3, model_type="NoSuchUNet")
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(8, 3, 3, encoder_type="fancy")
    assert isinstance(build_network("training.networks.VEPrecond", img_resolution=8, img_channels=1,
                                    model_channels=16, channel_mult=[1], num_blocks=1), VEPrecond)
    assert set(NETWORKS) == {"SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "EDMPrecond"}


# --- preconditioning -------------------------------------------------------------------------------------------

class Probe(torch.nn.Module):
    """Stands in for the U-Net: records its inputs and returns a fixed F."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.seen: dict = {}

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = dict(x=x, noise=noise_labels, labels=class_labels, augment=augment_labels)
        return self.out.to(x.dtype)


# EDM evaluates σ⁻¹ in float32, where ln(1 + σ²) loses digits below σ ≈ 0.01; stay above that.
SIGMAS = [0.02, 0.5, 2.0, 80.0]


def _t_of_sigma(s: float, beta_d=19.9, beta_min=0.1) -> float:
    # positive root of ½β_d t² + β_min t − ln(1+σ²) = 0
    return (-beta_min + math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(s * s))) / beta_d


HAND = {  # σ -> (c_skip, c_out, c_in, c_noise)
    "vp": lambda s: (1.0, -s, 1 / math.sqrt(s * s + 1), 999 * _t_of_sigma(s)),
    "ve": lambda s: (1.0, s, 1.0, math.log(s / 2)),
    "edm": lambda s: (0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25), 1 / math.sqrt(s * s + 0.25),
                      math.log(s) / 4),
}
WRAPPERS = {"vp": VPPrecond, "ve": VEPrecond, "edm": EDMPrecond}
TINY = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])


@pytest.mark.parametrize("kind", ["vp", "ve", "edm"])
def test_preconditioning_coefficients(kind):
    torch.manual_seed(1)
    net = WRAPPERS[kind](img_resolution=4, img_channels=2, model_type="SongUNet", **TINY)
    F_x = torch.randn(len(SIGMAS), 2, 4, 4)
    net.model = Probe(F_x)
    x = torch.randn(len(SIGMAS), 2, 4, 4, dtype=torch.float64) * 3
    D = net(x, torch.tensor(SIGMAS, dtype=torch.float64), augment_labels=torch.ones(len(SIGMAS), 9))

    assert D.dtype == torch.float32 and net.model.seen["x"].dtype == torch.float32
    assert net.model.seen["labels"] is None and net.model.seen["augment"].shape == (4, 9)
    for i, s in enumerate(SIGMAS):
        c_skip, c_out, c_in, c_noise = HAND[kind](s)
        xi = x[i].float()
        torch.testing.assert_close(net.model.seen["x"][i], c_in * xi)
        assert net.model.seen["noise"][i].item() == pytest.approx(c_noise, rel=1e-3, abs=1e-6)
        torch.testing.assert_close(D[i], c_skip * xi + c_out * F_x[i], rtol=1e-5, atol=1e-5)


def test_vp_schedule_helpers():
    net = VPPrecond(img_resolution=4, img_channels=1, **TINY)
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-6)
    # float32, as in EDM: exp(1e-6) − 1 rounds to 2⁻²⁰, so σ_min is 2⁻¹⁰ rather than 1.0005e-3.
    assert net.sigma_min == 2 ** -10
    s = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma(net.sigma_inv(s)), s)
    assert net.sigma_inv(2.0).item() == pytest.approx(_t_of_sigma(2.0))
    torch.testing.assert_close(net.round_sigma(s), s)


def test_labels_are_shaped_as_edm_does():
    net = EDMPrecond(img_resolution=4, img_channels=1, label_dim=3, model_type="SongUNet", **TINY)
    net.model = Probe(torch.zeros(2, 1, 4, 4))
    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([1.0, 2.0])
    net(x, sigma)
    assert torch.equal(net.model.seen["labels"], torch.zeros(1, 3))  # broadcast "no label" row
    net(x, sigma, class_labels=torch.tensor([[0, 1, 0], [0, 0, 1]], dtype=torch.int64))
    assert net.model.seen["labels"].dtype == torch.float32 and net.model.seen["labels"].shape == (2, 3)
    net.use_fp16 = True  # fp16 applies on CUDA only
    net(x, sigma)
    assert net.model.seen["x"].dtype == torch.float32


# --- layers ---------------------------------------------------------------------------------------------------

def test_resampling_box_filter_is_average_pool_and_nearest():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    up = Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_fused_downsampling_is_full_resolution_conv_then_blur():
    torch.manual_seed(2)
    conv = Conv2d(4, 5, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True)
    x = torch.randn(2, 4, 16, 16)
    y = conv(x)
    f = torch.tensor([1.0, 3, 3, 1])
    blur = (torch.outer(f, f) / 64).expand(5, 1, 4, 4)
    ref = F.conv2d(F.conv2d(x, conv.weight, conv.bias, padding=1), blur, groups=5, stride=2, padding=1)
    assert y.shape == ref.shape == (2, 5, 8, 8)
    # Same operator; only the zero padding sits at a different stage, so borders differ.
    torch.testing.assert_close(y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y, ref)
    with pytest.raises(ValueError, match="fused"):
        Conv2d(4, 5, kernel=3, up=True, fused_resample=True)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_reads_qkv_channels_interleaved(heads):
    # With q = k = 0 attention is uniform, so it returns the spatial mean of v. Route v through the rows EDM's
    # layout assigns to it ([heads, C/heads, (q, k, v)] -> row 3c + 2 carries v of channel c) as an identity.
    torch.manual_seed(6)
    c = 8
    block = UNetBlock(c, c, emb_channels=4, attention=True, num_heads=heads, skip_scale=0.5, eps=1e-6)
    with torch.no_grad():
        block.qkv.weight.zero_()
        block.qkv.bias.zero_()
        block.qkv.weight[torch.arange(c) * 3 + 2, torch.arange(c), 0, 0] = 1
        block.proj.weight.copy_(torch.eye(c)[:, :, None, None])
        block.proj.bias.zero_()
    x, emb = torch.randn(2, c, 4, 4), torch.randn(2, 4)
    block.num_heads = 0
    h = block(x, emb)
    block.num_heads = heads
    v = F.group_norm(h, block.norm2.num_groups, eps=1e-6)
    torch.testing.assert_close(block(x, emb), (v.mean(dim=(2, 3), keepdim=True) + h) * 0.5)


def test_positional_embedding_formula():
    x = torch.tensor([0.0, 3.0, -7.5])
    for endpoint, denom in ((False, 4), (True, 3)):
        freqs = torch.tensor([(1 / 10000) ** (i / denom) for i in range(4)])
        want = torch.cat([torch.cos(x[:, None] * freqs), torch.sin(x[:, None] * freqs)], dim=1)
        torch.testing.assert_close(PositionalEmbedding(8, endpoint=endpoint)(x), want)


def test_songunet_feeds_sin_before_cos():
    net = SongUNet(8, 1, 1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    seen = {}
    net.map_layer0.register_forward_hook(lambda m, inp, out: seen.update(emb=inp[0]))
    c = torch.tensor([0.3, -1.2])
    net(torch.randn(2, 1, 8, 8), c, None)
    freqs = (1 / 10000) ** (torch.arange(8) / 7)
    angles = c[:, None] * freqs
    torch.testing.assert_close(seen["emb"], torch.cat([angles.sin(), angles.cos()], dim=1))


# --- whole networks on tiny configurations -----------------------------------------------------------------

TINY_NETS = {
    "ddpmpp": (SongUNet, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
    "ncsnpp": (SongUNet, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                              embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                              decoder_type="skip", resample_filter=[1, 3, 3, 1])),
    "song-skip": (SongUNet, dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[],
                                 encoder_type="skip", decoder_type="skip")),
    "adm": (DhariwalUNet, dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4])),
}


def _randomize(net: torch.nn.Module) -> None:
    # Output layers start at (near) zero; random weights make every input path visible in the output.
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("name", sorted(TINY_NETS))
@pytest.mark.parametrize("label_dim", [0, 4])
def test_tiny_forward_shape_dtype_and_inputs_matter(name, label_dim):
    cls, kw = TINY_NETS[name]
    torch.manual_seed(3)
    net = cls(img_resolution=8, in_channels=3, out_channels=2, label_dim=label_dim, augment_dim=9, dropout=0, **kw)
    _randomize(net)
    x, noise = torch.randn(2, 3, 8, 8), torch.tensor([0.1, -0.4])
    labels = torch.eye(4)[[1, 3]] if label_dim else None
    y = net(x, noise, labels)
    assert y.shape == (2, 2, 8, 8) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert not torch.allclose(net(x, noise + 1, labels), y)
    assert not torch.allclose(net(x, noise, labels, augment_labels=torch.ones(2, 9)), y)
    if label_dim:
        assert not torch.allclose(net(x, noise, torch.eye(4)[[0, 2]]), y)
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p is not getattr(net.map_augment, "weight", None))


@pytest.mark.parametrize("name", ["ncsnpp", "adm"])
def test_half_precision_input_runs_the_unet_in_half(name):
    # The use_fp16 path: weights are cast to the input dtype, the embedding stays float32, attention is float32.
    cls, kw = TINY_NETS[name]
    torch.manual_seed(8)
    net = cls(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, **kw).eval()
    _randomize(net)
    x, noise, labels = torch.randn(2, 3, 8, 8) * 0.5, torch.tensor([0.1, 0.5]), torch.eye(4)[:2]
    y16, y32 = net(x.half(), noise, labels), net(x, noise, labels)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05 * y32.abs().max().item())


def test_precond_end_to_end_and_strict_reload():
    torch.manual_seed(4)
    kw = dict(img_resolution=8, img_channels=3, label_dim=4, **TINY_NETS["ddpmpp"][1])
    a, b = EDMPrecond(**kw, model_type="SongUNet"), VPPrecond(**kw)
    b.load_state_dict(a.state_dict(), strict=True)  # names depend on the U-Net only, not on the wrapper
    D = a(torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.eye(4)[:3])
    assert D.shape == (3, 3, 8, 8) and D.dtype == torch.float32


def test_label_dropout_only_in_training():
    torch.manual_seed(5)
    net = SongUNet(8, 1, 1, label_dim=4, label_dropout=1.0, dropout=0, **TINY_NETS["ddpmpp"][1])
    _randomize(net)
    x, noise, labels = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.eye(4)[:2]
    net.train()
    torch.testing.assert_close(net(x, noise, labels), net(x, noise, torch.zeros(2, 4)))
    net.eval()
    assert not torch.allclose(net(x, noise, labels), net(x, noise, torch.zeros(2, 4)))


def test_same_seed_same_init():
    def build(seed):
        torch.manual_seed(seed)
        return EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, **TINY_NETS["adm"][1]).state_dict()

    a, b, c = build(7), build(7), build(8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.enc.8x8_conv.weight"], c["model.enc.8x8_conv.weight"])
