"""Teacher-set feature statistics in stats.zarr: per-shard sums in Ray tasks, merged, incremental, per detector;
FD from them equals FD from the raw features; `stats ref --from` exports them; stale stores are refused."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from handmade import pair_set

from kdm_pipe.config import ConfigError, RefStatsConfig, StatsConfig
from kdm_pipe.feature_stats import set_halves, set_reference
from kdm_pipe.manifest import Manifest, load_manifest
from kdm_pipe.metrics import FeatureStats, PixelFeatures, features, fid_from_stats, load_detector, load_ref_stats
from kdm_pipe.shards import read_shard
from kdm_pipe.stats import STORE, load_stats
from stages import stats

SIZES = [70, 33, 101]          # uneven shards


class Pool(torch.nn.Module):
    """A generic TorchScript detector: uint8 NCHW → 4 features (2×2 average pool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, 2).flatten(1)


pytestmark = pytest.mark.usefixtures("ray_cluster")     # one private Ray session per module


def add_shards(directory: Path, sizes: list[int], seed: int) -> None:
    """Image pairs (1×4×4, values in [−1, 1]) appended as new shards of `directory`'s manifest."""
    rng = np.random.default_rng(seed)
    k0 = len(load_manifest(directory).shards) if (directory / "manifest.json").exists() else 0
    shards = []
    for k, n in enumerate(sizes, k0):
        x_0 = np.tanh(rng.standard_normal((n, 1, 4, 4)) + rng.uniform(-1, 1, (n, 1, 1, 1))).astype(np.float32)
        x_T = (80 * rng.standard_normal((n, 1, 4, 4))).astype(np.float32)
        seeds = np.arange(1000 * k, 1000 * k + n)
        shards.append([{"seed": seeds[b:b + 32], "x_T": x_T[b:b + 32], "x_0": x_0[b:b + 32]} for b in range(0, n, 32)])
    pair_set(directory, shards, teacher={"name": "hand", "sha256": "ab"})


def all_x0(directory: Path) -> np.ndarray:
    return np.concatenate([r["x_0"] for s in load_manifest(directory).shards for r in read_shard(directory / s.name)])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images")
    add_shards(out, SIZES, seed=0)
    stats.run(StatsConfig(data=out), progress=False)
    return out


@pytest.fixture
def images_copy(images, tmp_path) -> Path:
    return Path(shutil.copytree(images, tmp_path / "images"))


def reference(directory: Path, net) -> FeatureStats:
    return set_reference(directory, load_manifest(directory), net.name)


def test_merged_features_equal_one_pass_numpy(images):
    f = features(PixelFeatures(), [all_x0(images)]).astype(np.float64)
    got = reference(images, PixelFeatures())
    assert got.num == sum(SIZES) == len(f) and got.detector == "pixels"
    np.testing.assert_allclose(got.mu, f.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-14)
    rows = zarr.open_group(images / STORE, mode="r")["features/pixels/per_shard"]
    assert list(rows["count"][:]) == SIZES
    x = all_x0(images).reshape(sum(SIZES), -1).astype(np.float64)             # and the moments, uneven shards too
    m = load_stats(images)["x_0"]
    np.testing.assert_allclose(m["mean"].reshape(-1), x.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m["cov"], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-14)


def test_fd_from_store_equals_fd_from_raw_features(images):
    net = PixelFeatures()
    rng = np.random.default_rng(1)
    other = np.clip(all_x0(images)[:150] + 0.2 * rng.standard_normal((150, 1, 4, 4)), -1, 1)
    samples = FeatureStats.of(features(net, [other]), net.name)
    raw = FeatureStats.of(features(net, [all_x0(images)]), net.name)
    assert fid_from_stats(samples, reference(images, net)) == pytest.approx(fid_from_stats(samples, raw), rel=1e-9)


def test_split_half_floor_equals_fd_between_the_raw_halves(images):
    net = PixelFeatures()
    m = load_manifest(images)
    first, second = set_halves(images, m, net.name)               # 3 shards: the first vs the other two
    assert (first.num, second.num) == (SIZES[0], SIZES[1] + SIZES[2])
    half = [np.concatenate([r["x_0"] for r in read_shard(images / s.name)]) for s in m.shards]
    a = FeatureStats.of(features(net, [half[0]]), net.name)
    b = FeatureStats.of(features(net, [np.concatenate(half[1:])]), net.name)
    assert fid_from_stats(first, second) == pytest.approx(fid_from_stats(a, b), rel=1e-9)


def test_incremental_after_adding_shards_equals_from_scratch(images_copy, tmp_path, capsys):
    add_shards(images_copy, [17, 64], seed=5)
    before = zarr.open_group(images_copy / STORE, mode="r")["features/pixels/per_shard/outer"][:3]
    stats.run(StatsConfig(data=images_copy), progress=False)
    assert "recomputed 2 of 5 shards" in capsys.readouterr().out
    np.testing.assert_array_equal(zarr.open_group(images_copy / STORE, mode="r")
                                  ["features/pixels/per_shard/outer"][:3], before)
    scratch = Path(shutil.copytree(images_copy, tmp_path / "scratch"))
    shutil.rmtree(scratch / STORE)
    stats.run(StatsConfig(data=scratch), progress=False)
    inc, new = reference(images_copy, PixelFeatures()), reference(scratch, PixelFeatures())
    assert inc.num == new.num == sum(SIZES) + 81
    np.testing.assert_allclose(inc.mu, new.mu, rtol=1e-13)
    np.testing.assert_allclose(inc.sigma, new.sigma, rtol=1e-12, atol=1e-15)


def test_detector_features_sit_beside_pixels_and_export(images_copy, tmp_path, capsys):
    det = tmp_path / "pool.pt"
    torch.jit.script(Pool()).save(str(det))
    net = load_detector(det)
    stats.run(StatsConfig(data=images_copy, detector=det), progress=False)
    out = capsys.readouterr().out
    assert "recomputed 3 of 3 shards" in out and "4-d" in out     # moments up to date: only the features ran
    want = FeatureStats.of(features(net, [all_x0(images_copy)]), net.name)
    got = reference(images_copy, net)
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-9, atol=1e-14)
    assert reference(images_copy, PixelFeatures()).num == sum(SIZES)          # pixels kept
    attrs = zarr.open_group(images_copy / STORE, mode="r")[f"features/{net.name.replace(':', '-')}"].attrs
    assert attrs["detector"] == net.name and [s["sha256"] for s in attrs["shards"]] == \
        [s.sha256 for s in load_manifest(images_copy).shards]

    npz = tmp_path / "ref.npz"
    stats.reference(RefStatsConfig(data=images_copy, out=npz, detector=det),
                    StatsConfig(data=images_copy, detector=det), progress=False)
    ref = load_ref_stats(npz)
    assert ref.num == sum(SIZES) and ref.detector == net.name
    np.testing.assert_array_equal(ref.sigma, got.sigma)


def test_stale_store_is_refused_until_recomputed(images_copy):
    add_shards(images_copy, [10], seed=9)
    with pytest.raises(ConfigError, match=r"other shards \(3 listed, the manifest has 4.*kdm-pipe stats"):
        reference(images_copy, PixelFeatures())
    zarr.open_group(images_copy / STORE, mode="r+")["features/pixels"].attrs.update({"complete": False})
    with pytest.raises(ConfigError, match="incomplete"):
        reference(images_copy, PixelFeatures())
    stats.run(StatsConfig(data=images_copy), progress=False)
    assert reference(images_copy, PixelFeatures()).num == sum(SIZES) + 10
    assert reference(images_copy, load_detector(None)).detector == "pixels"


def test_vector_sets_refuse_a_detector(tmp_path):
    m = Manifest(teacher={"name": "hand"}, source={}, shape=[2], sigma_max=80.0, num_shards=1, pairs_per_shard=4,
                 dtypes={}, shards=[])
    from kdm_pipe.stats_update import feature_space_for
    assert feature_space_for(m, None, 1024, 250) == (None, None)
    with pytest.raises(ConfigError, match="vectors, not images"):
        feature_space_for(m, tmp_path / "x.pt", 1024, 250)
