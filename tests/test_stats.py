import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import zarr
from handmade import pair_set
from zarr.codecs import BloscCodec

from kdm_pipe.config import ConfigError, GenerateConfig, StatsConfig
from kdm_pipe.errors import DataError
from kdm_pipe.manifest import MANIFEST, load_manifest, save_manifest
from kdm_pipe.shards import read_shard, write_shard
from kdm_pipe.stats import STORE, load_stats
from stages import generate, stats


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = old


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Three checkerboard shards with trajectories, and their statistics store."""
    out = tmp_path_factory.mktemp("pairs")
    generate.run(GenerateConfig(out=out, shards=3, pairs_per_shard=300, batch=100, trajectory="every-6"),
                 progress=False)
    stats.run(StatsConfig(data=out), progress=False)
    return out


@pytest.fixture
def pairs_copy(pairs, tmp_path) -> Path:
    """A private copy (pair shards + store) for tests that change it."""
    return Path(shutil.copytree(pairs, tmp_path / "pairs"))


def shard_arrays(path: Path) -> dict[str, np.ndarray]:
    recs = list(read_shard(path))
    return {k: np.concatenate([r[k] for r in recs]).astype(np.float64) for k in recs[0]}


def all_arrays(directory: Path) -> dict[str, np.ndarray]:
    parts = [shard_arrays(directory / s.name) for s in load_manifest(directory).shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def assert_moments(got: dict[str, np.ndarray], x: np.ndarray) -> None:
    """`got` describes samples x of shape (n, d)."""
    assert got["count"] == len(x)
    np.testing.assert_allclose(got["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["std"], x.std(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(got["cov"], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got["min"], x.min(0))
    np.testing.assert_array_equal(got["max"], x.max(0))


def per_shard(directory: Path, name: str) -> np.ndarray:
    return zarr.open_group(directory / STORE, mode="r")[f"per_shard/{name}"][:]


def test_merged_stats_match_numpy(pairs):
    data, s = all_arrays(pairs), load_stats(pairs)
    assert set(s) == {"x_0", "x_T", "traj"}
    assert_moments(s["x_0"], data["x_0"])
    assert_moments(s["x_T"], data["x_T"])
    assert 60 < s["x_T"]["std"].mean() < 100           # x_T = 80·z: the fields are not swapped
    steps = data["traj"].shape[1]
    assert s["traj"]["mean"].shape == (steps, 2) and s["traj"]["cov"].shape == (steps, 2, 2)
    for k in range(steps):
        assert_moments({name: a[k] for name, a in s["traj"].items()}, data["traj"][:, k])
    np.testing.assert_allclose(s["traj"]["mean"][0], s["x_T"]["mean"], rtol=1e-6)   # the first state is x_T


def test_per_shard_rows_match_each_shard(pairs):
    manifest = load_manifest(pairs)
    for info in manifest.shards:
        data = shard_arrays(pairs / info.name)
        for field in ("x_0", "x_T"):
            x = data[field]
            assert per_shard(pairs, f"{field}/count")[info.index] == info.pairs
            np.testing.assert_allclose(per_shard(pairs, f"{field}/sum")[info.index], x.sum(0), rtol=1e-12)
            np.testing.assert_allclose(per_shard(pairs, f"{field}/sumsq")[info.index], (x**2).sum(0), rtol=1e-12)
            np.testing.assert_allclose(per_shard(pairs, f"{field}/outer")[info.index], x.T @ x, rtol=1e-12)
            np.testing.assert_array_equal(per_shard(pairs, f"{field}/min")[info.index], x.min(0))
            np.testing.assert_array_equal(per_shard(pairs, f"{field}/max")[info.index], x.max(0))
        t = data["traj"]
        np.testing.assert_allclose(per_shard(pairs, "traj/sum")[info.index], t.sum(0), rtol=1e-12)
        np.testing.assert_allclose(per_shard(pairs, "traj/outer")[info.index],
                                   np.einsum("bsi,bsj->sij", t, t), rtol=1e-12)
        assert per_shard(pairs, "sha256")[info.index].tobytes().hex() == info.sha256


def test_store_is_zarr3_blosc_one_chunk_per_shard_row(pairs):
    root = zarr.open_group(pairs / STORE, mode="r")
    manifest = load_manifest(pairs)
    assert root.metadata.zarr_format == 3
    arrays = [a for _, a in root.members(max_depth=None) if isinstance(a, zarr.Array)]
    assert len(arrays) > 20
    for a in arrays:
        (codec,) = a.compressors
        assert isinstance(codec, BloscCodec)
        assert (codec.cname.value, codec.clevel, codec.shuffle.value) == ("zstd", 3, "bitshuffle")
    for name, a in root["per_shard"].members(max_depth=None):
        if isinstance(a, zarr.Array):
            assert a.shape[0] == manifest.num_shards and a.chunks == (1,) + a.shape[1:], name
    attrs = root.attrs
    assert attrs["complete"] is True and attrs["num_pairs"] == 900 and attrs["cov_max_dim"] == 1024
    assert attrs["teacher_sha256"] == manifest.teacher["sha256"]
    assert [(s["index"], s["sha256"]) for s in attrs["shards"]] == [(s.index, s.sha256) for s in manifest.shards]
    assert attrs["dtypes"]["data"] == manifest.dtypes and attrs["covariance_skipped"] == {}


def test_rerun_recomputes_only_changed_shards(pairs_copy, capsys):
    before = per_shard(pairs_copy, "computed_at")
    stats.run(StatsConfig(data=pairs_copy), progress=False)
    assert "all 3 shards up to date" in capsys.readouterr().out
    np.testing.assert_array_equal(per_shard(pairs_copy, "computed_at"), before)

    # shard 1 comes back with other contents (as after regenerating with a fixed teacher)
    manifest = load_manifest(pairs_copy)
    info = manifest.shard(1)
    recs = list(read_shard(pairs_copy / info.name))
    for r in recs:
        r["x_0"] = r["x_0"] * 2 + 1
    info.bytes, info.sha256 = write_shard(pairs_copy / info.name, recs)
    save_manifest(pairs_copy, manifest)

    stats.run(StatsConfig(data=pairs_copy), progress=False)
    out = capsys.readouterr().out
    assert "recomputed 1 of 3 shards" in out and "pairs/s" in out
    after = per_shard(pairs_copy, "computed_at")
    assert after[1] > before[1] and after[0] == before[0] and after[2] == before[2]
    assert per_shard(pairs_copy, "sha256")[1].tobytes().hex() == info.sha256
    assert_moments(load_stats(pairs_copy)["x_0"], all_arrays(pairs_copy)["x_0"])


def test_more_shards_add_rows(pairs_copy):
    generate.run(GenerateConfig(out=pairs_copy, shards=4, pairs_per_shard=300, batch=100, trajectory="every-6"),
                 progress=False)
    before = per_shard(pairs_copy, "computed_at")
    stats.run(StatsConfig(data=pairs_copy), progress=False)
    after = per_shard(pairs_copy, "computed_at")
    assert after.shape == (4,) and np.array_equal(after[:3], before[:3]) and after[3] > 0
    assert_moments(load_stats(pairs_copy)["x_T"], all_arrays(pairs_copy)["x_T"])


def test_corrupt_shard_refused_and_previous_stats_kept(pairs_copy):
    before = load_stats(pairs_copy)
    zarr.open_group(pairs_copy / STORE, mode="r+")["per_shard/sha256"][2] = 0   # row 2 must be recomputed
    info = load_manifest(pairs_copy).shard(2)
    raw = bytearray((pairs_copy / info.name).read_bytes())
    raw[2000] ^= 0xFF                                  # same size, other bytes: only the sha256 tells
    (pairs_copy / info.name).write_bytes(bytes(raw))
    with pytest.raises(DataError, match="shard-000002.tar.*sha256.*rerun the `kdm-pipe generate`"):
        stats.run(StatsConfig(data=pairs_copy), progress=False)
    after = load_stats(pairs_copy)
    for field in before:
        for name in before[field]:
            np.testing.assert_array_equal(after[field][name], before[field][name])
    assert not per_shard(pairs_copy, "sha256")[2].any()    # the row is no longer trusted


def test_labels_and_skipped_covariance(tmp_path):
    rng = np.random.default_rng(0)
    shards, xs, ys = [], [], []
    for k in range(2):
        x0, xT = rng.standard_normal((50, 1, 4, 4)), 80 * rng.standard_normal((50, 1, 4, 4))
        y = np.eye(3, dtype=np.float32)[rng.integers(3, size=50)]
        shards.append([{"seed": np.arange(50 * k + b, 50 * k + b + 25), "x_T": xT[b:b + 25], "x_0": x0[b:b + 25],
                        "label": y[b:b + 25]} for b in (0, 25)])
        xs.append(x0)
        ys.append(y)
    pair_set(tmp_path, shards, teacher={"name": "hand", "sha256": "ab"})
    stats.run(StatsConfig(data=tmp_path, cov_max_dim=8), progress=False)
    s = load_stats(tmp_path)
    np.testing.assert_array_equal(s["label"]["count"], np.concatenate(ys).sum(0))
    x = np.concatenate(xs)
    assert "cov" not in s["x_0"] and s["x_0"]["mean"].shape == (1, 4, 4)
    np.testing.assert_allclose(s["x_0"]["mean"], x.mean(0), atol=1e-12)
    np.testing.assert_allclose(s["x_0"]["std"], x.std(0, ddof=1), rtol=1e-10)
    attrs = zarr.open_group(tmp_path / STORE, mode="r").attrs
    skipped = attrs["covariance_skipped"]
    assert set(skipped) == {"x_0", "x_T"} and "16 > cov_max_dim = 8" in skipped["x_0"]

    # another layout: the store is rebuilt with cov
    stats.run(StatsConfig(data=tmp_path, cov_max_dim=16), progress=False)
    cov = load_stats(tmp_path)["x_0"]["cov"]
    np.testing.assert_allclose(cov, np.cov(x.reshape(100, 16), rowvar=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("manifest_text", [None, "{not json", '{"format": "kdm-pipe/pairs-v1"}'])
def test_bad_directory_raises_config_error_and_writes_nothing(tmp_path, manifest_text):
    if manifest_text is not None:
        (tmp_path / MANIFEST).write_text(manifest_text)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="manifest"):
        stats.run(StatsConfig(data=tmp_path), progress=False)
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(ConfigError, match="kdm-pipe stats"):
        load_stats(tmp_path)
    with pytest.raises(ConfigError, match="manifest"):
        stats.run(StatsConfig(data=tmp_path / "missing"), progress=False)
    assert not (tmp_path / "missing").exists()


def test_incomplete_store_is_not_read(pairs_copy):
    root = zarr.open_group(pairs_copy / STORE, mode="r+")
    root.attrs.update({"complete": False})            # as if killed while rewriting merged/
    with pytest.raises(ConfigError, match="not a complete"):
        load_stats(pairs_copy)
    stats.run(StatsConfig(data=pairs_copy), progress=False)
    assert load_stats(pairs_copy)["x_0"]["count"] == 900


def test_unreadable_store_is_rebuilt(pairs_copy):
    shutil.rmtree(pairs_copy / STORE)
    (pairs_copy / STORE).mkdir()
    (pairs_copy / STORE / "zarr.json").write_text("{not json")
    with pytest.raises(ConfigError, match="kdm-pipe stats"):
        load_stats(pairs_copy)
    stats.run(StatsConfig(data=pairs_copy), progress=False)
    assert_moments(load_stats(pairs_copy)["x_0"], all_arrays(pairs_copy)["x_0"])
