from pathlib import Path

import numpy as np
import pytest
import torch
from handmade import pair_set
from PIL import Image

from kdm_pipe.config import ConfigError
from kdm_pipe.image_files import write_samples
from kdm_pipe.metrics import (
    FeatureStats,
    PixelFeatures,
    embed,
    features,
    fid_from_stats,
    image_metrics,
    image_source,
    inception_score,
    load_detector,
    load_ref_stats,
    reference_stats,
    save_ref_stats,
    to_uint8,
)


class TinyInception(torch.nn.Module):
    """Stand-in with the StyleGAN detector's call convention: uint8 RGB NCHW in, 8-d features or 5 probabilities."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, 8, generator=g))
        self.head = torch.nn.Linear(8, 5)
        torch.nn.init.normal_(self.head.weight, generator=g)
        torch.nn.init.normal_(self.head.bias, generator=g)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, 4).flatten(1)
        f = x @ self.proj
        if return_features:
            return f
        logits = f @ self.head.weight.t() if no_output_bias else self.head(f)
        return torch.softmax(logits, dim=1)


class FlatNet(torch.nn.Module):
    """A generic feature net: no StyleGAN keywords, channels as given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det") / "tiny-inception.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return path


def _images(seed: int, n: int, c: int = 3, size: int = 8, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.6, 0.6, size=(n, 1, 1, 1)) + shift            # per-image brightness
    return np.clip(base + 0.3 * rng.standard_normal((n, c, size, size)), -1, 1).astype(np.float32)


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((Σ1Σ2)^½) = Σ √eig(Σ1^½ Σ2 Σ1^½), the symmetric route (independent of scipy's sqrtm)."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum())


def _independent_fd(a: np.ndarray, b: np.ndarray) -> float:
    """EDM's accumulation: μ = Σx/N, Σ = (Σxxᵀ − Nμμᵀ)/(N − 1), in float64."""
    def moments(x):
        x = x.astype(np.float64)
        mu = x.sum(0) / len(x)
        return mu, (x.T @ x - len(x) * np.outer(mu, mu)) / (len(x) - 1)
    (m1, s1), (m2, s2) = moments(a), moments(b)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _sqrtm_trace(s1, s2))


# --- Fréchet distance and statistics ----------------------------------------------------------------------------


def test_fid_of_two_isotropic_gaussians_is_closed_form():
    d = 6
    mu1, mu2 = np.zeros(d), np.arange(d, dtype=np.float64)
    a = FeatureStats(mu1, 4.0 * np.eye(d), 0, "")
    b = FeatureStats(mu2, 0.25 * np.eye(d), 0, "")
    # ‖μ1 − μ2‖² + d(σ1 − σ2)² for N(μ1, σ1²I), N(μ2, σ2²I)
    assert fid_from_stats(a, b) == pytest.approx(mu2 @ mu2 + d * (2.0 - 0.5) ** 2, rel=1e-12)


def test_fid_from_features_matches_an_independent_computation():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    y = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5)) + 0.5
    fd = fid_from_stats(FeatureStats.of(x, "n"), FeatureStats.of(y, "n"))
    assert fd == pytest.approx(_independent_fd(x, y), rel=1e-8)


def test_stats_npz_round_trip_and_edm_format(tmp_path):
    rng = np.random.default_rng(4)
    stats = FeatureStats.of(rng.standard_normal((50, 3)), "tiny:abc")
    path = save_ref_stats(tmp_path / "ref.npz", stats)
    back = load_ref_stats(path)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert (back.num, back.detector) == (50, "tiny:abc")
    with np.load(path) as f:                                  # plain arrays: no pickle needed to read it
        assert {"mu", "sigma"} <= set(f.files) and f["mu"].dtype == np.float64
    np.savez(tmp_path / "edm.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)  # EDM's own files
    edm = load_ref_stats(tmp_path / "edm.npz")
    assert (edm.num, edm.detector) == (0, "") and edm.mu.dtype == np.float64
    assert fid_from_stats(stats, edm) == pytest.approx(0.0, abs=1e-6)


def test_stats_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_ref_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(2))
    with pytest.raises(ConfigError, match="mu and sigma"):
        load_ref_stats(tmp_path / "bad.npz")
    a = FeatureStats(np.zeros(2), np.eye(2), 10, "pixels")
    with pytest.raises(ConfigError, match="same --detector"):
        fid_from_stats(a, FeatureStats(np.zeros(3), np.eye(3), 10, "inception"))
    with pytest.raises(ConfigError, match="detector"):
        fid_from_stats(a, FeatureStats(np.zeros(2), np.eye(2), 10, "other"))


# --- Inception Score --------------------------------------------------------------------------------------------


def test_inception_score_known_cases():
    uniform = np.full((40, 7), 1 / 7)
    assert inception_score(uniform, splits=4) == pytest.approx((1.0, 0.0))
    # Confident and evenly spread over 8 classes within every split: IS = 8 exactly.
    confident = np.tile(np.eye(8) * (1 - 1e-12) + 1e-12 / 8, (5, 1))
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(8.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_matches_scipy_kl():
    from scipy.stats import entropy
    p = np.random.default_rng(5).dirichlet(np.full(6, 0.3), size=90)
    parts = np.array_split(p, 3)
    scores = [np.exp(np.mean([entropy(row, part.mean(0)) for row in part])) for part in parts]
    assert inception_score(p, splits=3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(p[:5])


# --- detectors --------------------------------------------------------------------------------------------------


def test_to_uint8_is_edm_quantisation_and_repeats_grey():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 7)
    u8 = to_uint8(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 1, 1, 7)
    assert u8.flatten().tolist() == [0, 0, 64, 128, 255, 255, 255]
    rgb = to_uint8(x.numpy(), rgb=True)
    assert rgb.shape == (1, 3, 1, 7) and (rgb == u8).all()
    assert to_uint8(torch.zeros(2, 3, 2, 2), rgb=True).shape == (2, 3, 2, 2)


def test_missing_detector_says_what_where_and_how(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_detector(tmp_path / "inception-2015-12-05.pt")
    msg = str(e.value)
    assert "inception-2015-12-05.pt" in msg and "https://" in msg and "--detector" in msg and str(tmp_path) in msg
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="TorchScript"):
        load_detector(tmp_path / "junk.pt")
    assert isinstance(load_detector(None), PixelFeatures)


def test_pixel_features_are_quantised_pixels():
    x = _images(6, 3, c=1, size=4)
    f = features(PixelFeatures(), [x])
    np.testing.assert_allclose(f, to_uint8(x).flatten(1).numpy() / 127.5 - 1, atol=1e-6)
    assert f.shape == (3, 16)


def test_embed_rebatches_any_chunking_without_changing_features(detector_file):
    net = load_detector(detector_file)
    sizes = []

    class Spy:
        name, rgb = net.name, net.rgb

        def features(self, u8):
            sizes.append(len(u8))
            return net.features(u8)

        def probs(self, u8):
            return net.probs(u8)

    x = _images(7, 23)
    whole, p_whole = embed(net, [x], batch=64, probs=True)
    chunked, p_chunked = embed(Spy(), [x[:5], x[5:6], x[6:20], x[20:]], batch=7, probs=True)
    assert sizes == [7, 7, 7, 2]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p_chunked, p_whole, rtol=1e-6)
    assert whole.shape == (23, 8) and p_whole.shape == (23, 5)
    np.testing.assert_allclose(p_whole.sum(1), 1.0, rtol=1e-6)


# --- the FID path end to end ------------------------------------------------------------------------------------


def test_fid_path_end_to_end_with_a_torchscript_detector(tmp_path, detector_file):
    net = load_detector(detector_file)
    assert net.rgb and net.name.startswith("tiny-inception.pt:")
    real = _images(8, 120)
    pixels = to_uint8(real).permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "real.npy", pixels)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(pixels):
        Image.fromarray(im).save(folder / f"img{i:04d}.png")

    ref = reference_stats(tmp_path / "real.npy", net, batch=32)
    ref_folder = reference_stats(folder, net, batch=50)
    assert ref.num == 120 and ref.detector == net.name
    np.testing.assert_allclose(ref_folder.mu, ref.mu, rtol=1e-6)
    save_ref_stats(tmp_path / "ref.npz", ref)
    ref = load_ref_stats(tmp_path / "ref.npz")

    fake = _images(9, 100, shift=0.2)
    chunks = (fake[i:i + 30] for i in range(0, 100, 30))  # a generator: consumed once
    m = image_metrics(chunks, net, ref, batch=16, splits=4)

    scripted = torch.jit.load(str(detector_file))       # the same numbers computed directly
    with torch.no_grad():
        f_fake = scripted(to_uint8(fake), return_features=True).numpy()
        f_real = scripted(to_uint8(real), return_features=True).numpy()
        p_fake = scripted(to_uint8(fake), no_output_bias=True).numpy()
    assert m["detector"] == net.name and m["num_samples"] == 100
    assert m["fid"] == pytest.approx(_independent_fd(f_fake, f_real), rel=1e-4)
    assert image_metrics([real], net, ref)["fid"] == pytest.approx(0.0, abs=1e-8)
    assert image_metrics([_images(20, 120)], net, ref)["fid"] < m["fid"] / 10   # same law, fresh draws
    assert (m["inception_score"], m["inception_score_std"]) == pytest.approx(inception_score(p_fake, 4), rel=1e-5)
    assert "precision" not in m and "100 samples" in m["note"]


def test_fid_path_accepts_grey_images_and_sample_dirs(tmp_path, detector_file):
    net = load_detector(detector_file)
    grey = _images(10, 40, c=1)
    write_samples(tmp_path / "samples", grey, np.arange(40))
    from_dir = reference_stats(tmp_path / "samples", net)    # the npz, not the PNGs + grid.png
    direct = FeatureStats.of(features(net, [grey]), net.name)
    assert from_dir.num == 40
    np.testing.assert_allclose(from_dir.mu, direct.mu, rtol=1e-6)
    assert fid_from_stats(direct, from_dir) == pytest.approx(0.0, abs=1e-6)


def test_reference_stats_from_pair_shards_use_x0_and_stop_at_num(tmp_path, detector_file):
    net = load_detector(detector_file)
    x_0 = _images(11, 30)
    pair_set(tmp_path, [[{"x_T": 80 * np.ones_like(x_0[i:i + 5]), "x_0": x_0[i:i + 5], "seed": np.arange(i, i + 5)}
                         for i in range(15 * k, 15 * k + 15, 5)] for k in range(2)])
    assert sum(len(c) for c in image_source(tmp_path, num=22)) == 22
    stats = reference_stats(tmp_path, net, num=22)
    want = FeatureStats.of(features(net, [x_0[:22]]), net.name)
    assert stats.num == 22
    np.testing.assert_allclose(stats.mu, want.mu, rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, want.sigma, rtol=1e-5, atol=1e-9)


def test_generic_torchscript_net_and_pixel_fallback(tmp_path):
    torch.jit.script(FlatNet()).save(str(tmp_path / "flat.pt"))
    flat = load_detector(tmp_path / "flat.pt")
    grey = _images(12, 30, c=1)
    assert features(flat, [grey]).shape == (30, 1)            # channels passed through as they are
    ref = FeatureStats.of(features(flat, [grey]), flat.name)
    m = image_metrics([grey], flat, ref, splits=3)
    assert m["frechet_distance"] == pytest.approx(0.0, abs=1e-8)
    assert "fid" not in m and "inception_score" not in m

    pixels = PixelFeatures()
    ref = FeatureStats.of(features(pixels, [grey]), pixels.name)
    m = image_metrics([grey[:15]], pixels, ref)
    assert m["frechet_distance"] > 0 and "pixel" in m["note"]


def test_precision_recall_through_image_metrics():
    pixels = PixelFeatures()
    dark = np.full((40, 1, 2, 2), -0.8, np.float32) + np.random.default_rng(13).normal(0, 0.02, (40, 1, 2, 2))
    bright = -dark
    real = np.concatenate([dark, bright]).astype(np.float32)
    real_f = features(pixels, [real])
    ref = FeatureStats.of(real_f, pixels.name)
    same = image_metrics([real], pixels, ref, real_features=real_f)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    dropped = image_metrics([dark.astype(np.float32)], pixels, ref, real_features=real_f)  # one mode missing
    assert dropped["precision"] == 1.0 and dropped["recall"] == pytest.approx(0.5, abs=0.05)


def test_npz_sample_sets_are_checked_before_they_are_read(tmp_path):
    """An `.npz` image set whose arr_0 is not uint8 NHWC, or whose header declares more than the file holds, is
    refused with one ConfigError before any allocation of the declared size."""
    import io
    import zipfile

    from kdm_pipe.metrics.fid import image_source
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    buf = io.BytesIO()                   # declares 10^9 images, holds one
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 8, 8, 3)})
    with zipfile.ZipFile(tmp_path / "crafted.npz", "w") as z:
        z.writestr("arr_0.npy", buf.getvalue() + bytes(8 * 8 * 3))
    for name, says in [("float", "expected uint8 NHWC"), ("nchw", "expected uint8 NHWC"),
                       ("other", "found \\['images'\\]"), ("crafted", "header declares .* but only")]:
        with pytest.raises(ConfigError, match=says):
            list(image_source(tmp_path / f"{name}.npz"))
    np.savez(tmp_path / "good.npz", arr_0=np.full((3, 8, 8, 3), 255, np.uint8))
    assert np.concatenate(list(image_source(tmp_path / "good.npz", num=2))).shape == (2, 3, 8, 8)
