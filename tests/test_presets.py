"""Presets reproduce the official KDM configurations (docs/METHOD.md) and build the students they describe."""

import pytest
import torch
from faults import cli

from kdm_pipe.config import PRESET_DIR, GenerateConfig, TrainConfig, build, load_preset
from kdm_pipe.student import build_student

OFFICIAL = {  # preset: (teacher pickle, sampler steps, pairs, U-Net channels, latent d, operator, label_dim, shape)
    "cifar10-uncond": ("edm-cifar10-32x32-uncond-vp.pkl", 18, 1_000_000, 64, 1024, "affine", 0, (3, 32, 32)),
    "cifar10-cond": ("edm-cifar10-32x32-cond-vp.pkl", 18, 1_000_000, 64, 1024, "affine", 10, (3, 32, 32)),
    "cifar10-uncond-decomposed": ("edm-cifar10-32x32-uncond-vp.pkl", 18, 1_000_000, 64, 1024, "decomposed", 0,
                                  (3, 32, 32)),
    "ffhq64": ("edm-ffhq-64x64-uncond-vp.pkl", 40, 1_000_000, 32, 512, "affine", 0, (3, 64, 64)),
    "afhqv2-64": ("edm-afhqv2-64x64-uncond-vp.pkl", 40, 250_000, 32, 512, "affine", 0, (3, 64, 64)),
}


def sections(name):
    s = load_preset(name)
    return build(GenerateConfig, s["generate"]), build(TrainConfig, s["train"])


def test_every_preset_is_valid():
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert set(OFFICIAL) | {"checkerboard", "checkerboard-quick", "digits"} <= set(names)
    for name in names:
        sections(name)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_configuration(name):
    pkl, steps, pairs, channels, latent, operator, label_dim, shape = OFFICIAL[name]
    g, t = sections(name)
    assert g.teacher.name == "edm" and g.teacher.checkpoint.name == pkl
    assert (g.sampler.solver, g.sampler.steps, g.sampler.sigma_min, g.sampler.sigma_max, g.sampler.rho) == \
        ("heun", steps, 0.002, 80.0, 7.0)
    assert g.shards * g.pairs_per_shard == pairs
    s = t.student
    assert (t.batch, t.steps, t.lr, t.ema, t.betas) == (128, 800_001, 3e-4, 0.9999, (0.9, 0.999))
    assert (s.kind, s.model_channels, s.channel_mult, s.operator, s.sigma_z) == ("kdm", channels, [1, 2, 2, 2],
                                                                                 operator, 0.4)
    assert (s.w_latent, s.w_rec, s.w_push, s.w_adv, s.distance) == (1.0, 1.0, 1.0, 1.0, "lpips")
    assert s.spectrum_prior == ("uniform" if operator == "decomposed" else "none")
    # Build the student as the trainer would (LPIPS weights are not on this machine: measure it with L2).
    torch.manual_seed(0)
    model = build_student(s.model_copy(update={"distance": "l2"}), shape, label_dim, 80.0)
    assert model.latent_dim == latent
    assert (model.koopman.control is not None) == (label_dim > 0)
    if operator == "affine":
        assert model.koopman.op.bias is not None


def test_checkerboard_preset_is_the_official_2d_setup():
    g, t = sections("checkerboard")
    s = t.student.for_data(image=False)
    assert (t.batch, t.steps, t.lr, t.betas) == (4096, 20_001, 3e-4, (0.9, 0.999))
    assert (s.mlp, s.hidden, s.depth, s.latent_dim, s.operator, s.sigma_z) == ("official", 256, 5, 256, "affine", 0.4)
    assert (s.distance, s.w_latent, s.w_rec, s.w_push, s.w_adv, s.spectrum_prior) == ("l2", 1.0, 1.0, 0.0, 0.0, "none")
    assert (g.shards - t.holdout_shards) * g.pairs_per_shard == 50_000
    assert g.teacher.name == "checkerboard" and g.teacher.extent == 4.0 and g.sampler.sigma_max == 80.0
    # the networks, layer by layer: E = 5 × (Linear + Swish) on [x, t]; D = 4 × (Linear + Swish) on [z, t], Linear
    torch.manual_seed(0)
    m = build_student(s, (2,), 0, g.sampler.sigma_max)
    for enc in (m.enc_0, m.enc_T):
        layers = list(enc.net)
        assert [type(x).__name__ for x in layers] == ["Linear", "SiLU"] * 5
        assert layers[0].in_features == 3 and all(x.out_features == 256 for x in layers[::2])
    dec = list(m.dec.net)
    assert [type(x).__name__ for x in dec] == ["Linear", "SiLU"] * 4 + ["Linear"]
    assert dec[0].in_features == 257 and dec[-1].out_features == 2
    assert (m.enc_0.t, m.enc_T.t, m.dec.t) == (0.0, 1.0, 0.0)
    assert type(m.koopman.op).__name__ == "Linear" and m.koopman.op.bias is not None
    z = torch.randn(5, 2)
    assert torch.allclose(m.encode_T(80 * z), m.enc_T.net(torch.cat([z, torch.ones(5, 1)], 1)), atol=1e-6)  # x_T/σ_max
    assert (m.encode_T(80 * z) > -0.2785).all()                    # Swish-activated latent: min of x·σ(x)


def test_checkerboard_quick_is_the_same_design_smaller():
    g, t = sections("checkerboard")
    gq, tq = sections("checkerboard-quick")
    assert tq.student == t.student and gq.teacher == g.teacher and gq.sampler == g.sampler
    assert tq.batch * tq.steps < t.batch * t.steps / 40


def test_preset_without_its_checkpoint_is_refused_before_writing(tmp_path):
    out = tmp_path / "pairs"
    r = cli("generate", "--preset", "cifar10-uncond", "--out", out, "--quiet")
    assert r.returncode == 2
    assert "edm-cifar10-32x32-uncond-vp.pkl does not exist" in r.stderr and "--checkpoint" in r.stderr
    assert not out.exists()


def test_lpips_without_weights_says_how_to_get_them(tmp_path):
    r = cli("train", "--preset", "digits", "--data", tmp_path, "--distance", "lpips", "--dry-run")
    assert r.returncode == 0 and '"distance": "lpips"' in r.stdout
    from kdm_pipe.config import ConfigError
    with pytest.raises(ConfigError, match="vgg16-397923af.pth"):
        build_student(sections("digits")[1].student.model_copy(update={"distance": "lpips"}), (1, 8, 8), 0, 80.0)


@pytest.mark.parametrize("cmd, says", [
    (["generate", "--out", "gs://bucket/pairs"], "gs:// is not supported"),
    (["train", "--data", "hdfs://b/pairs"], "hdfs:// is not supported"),
    (["train", "--data", "s3://Bad_Bucket/pairs"], "not an s3:// URL of a bucket"),
    (["import", "x.npy", "--format", "npy", "--out", "s3://"], "not an s3:// URL of a bucket"),
    (["train", "--data", "s3://b/p", "--storage-option", "novalue"], "expected KEY=VALUE")])
def test_unsupported_urls_are_refused_naming_what_is_supported(cmd, says):
    r = cli(*cmd, "--dry-run")
    assert r.returncode == 2 and says in r.stderr and r.stderr.count("error:") == 1, r.stderr


def test_s3_urls_resolve_into_the_config_as_urls():
    r = cli("generate", "--out", "s3://bucket/pairs/run1", "--dry-run")
    assert r.returncode == 0 and '"out": "s3://bucket/pairs/run1"' in r.stdout, r.stderr
