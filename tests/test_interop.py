"""Other tools read kdm-pipe's pair shards as they are: Hugging Face `datasets` (its WebDataset builder) and
`ray.data.read_webdataset` give back every record's x_T, x_0, seed and label, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from faults import cli

from kdm_pipe.manifest import load_manifest
from kdm_pipe.shards import read_pairs

FIELDS = ("x_T", "x_0", "seed", "label")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """300 labelled image-shaped pairs (1×4×4) in 3 shards of records of 50 pairs."""
    root = tmp_path_factory.mktemp("interop")
    rng = np.random.default_rng(0)
    np.save(root / "xT.npy", 80 * rng.standard_normal((300, 1, 4, 4)))
    np.save(root / "x0.npy", rng.uniform(-1, 1, (300, 1, 4, 4)))
    np.save(root / "y.npy", rng.integers(0, 3, 300))
    assert cli("import", "--format", "npy", "--x-T", root / "xT.npy", "--x-0", root / "x0.npy", "--labels",
               root / "y.npy", "--label-dim", "3", "--out", root / "pairs", "--pairs-per-shard", "128",
               "--batch", "50", "-q").returncode == 0
    return root / "pairs"


def expected(directory):
    m = load_manifest(directory)
    return read_pairs(directory, [s.name for s in m.shards], m.num_pairs)


def same_pairs(records, directory) -> None:
    """`records`: dicts with the shard members (`x_T.npy` …), one per tar record, in shard order."""
    want = expected(directory)
    for field in FIELDS:
        got = np.concatenate([np.asarray(r[f"{field}.npy"], dtype=want[field].dtype) for r in records])
        assert np.array_equal(got, want[field]), field


def test_hugging_face_datasets_reads_the_shards(pairs, tmp_path, monkeypatch):
    import datasets
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shards = sorted(str(p) for p in pairs.glob("shard-*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train",
                               cache_dir=str(tmp_path / "cache")).with_format("numpy")
    assert len(ds) == 6 and ds[0]["x_T.npy"].shape == (50, 1, 4, 4)
    same_pairs(list(ds), pairs)


def test_ray_data_reads_the_shards(pairs, ray_cluster):
    import ray.data
    shards = sorted(str(p) for p in pairs.glob("shard-*.tar"))
    rows = ray.data.read_webdataset(shards).take_all()
    rows.sort(key=lambda r: (r["__url__"], r["__key__"]))     # blocks may arrive in any order
    assert len(rows) == 6 and rows[0]["x_T.npy"].shape == (50, 1, 4, 4)
    same_pairs(rows, pairs)


@pytest.mark.parametrize("fmt", ["rectified-flow", "kdm-npz", "get", "fastgen"])
def test_pair_formats_round_trip(pairs, tmp_path, fmt):
    """export DIR --format F, then import it back: the same pairs (x_T / σ_max where F stores unit noise)."""
    out = tmp_path / fmt
    assert cli("export", pairs, "--out", out, "--format", fmt).returncode == 0
    back = tmp_path / "back"
    assert cli("import", out, "--format", fmt, "--out", back, "-q").returncode == 0
    want, got = expected(pairs), expected(back)
    assert np.array_equal(got["x_0"], want["x_0"]) and np.array_equal(got["label"], want["label"])
    if fmt == "rectified-flow":                    # z0 = x_T / σ_max, imported with σ_max = 1
        assert load_manifest(back).sigma_max == 1.0 and np.array_equal(got["x_T"], want["x_T"] / np.float32(80))
    else:                                          # GET's z is scaled back by --sigma-max (80 by default)
        np.testing.assert_allclose(got["x_T"], want["x_T"], rtol=1e-6)
        assert load_manifest(back).sigma_max == 80.0
    if fmt in ("kdm-npz", "fastgen"):                # x_T as stored
        assert np.array_equal(got["x_T"], want["x_T"])


def fastgen_samples(folder) -> list[dict]:
    """The exported shards as the webdataset library (FastGen's reader) yields them, .npy members decoded."""
    import webdataset as wds
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_fastgen_export_is_one_pair_per_webdataset_sample(pairs, tmp_path):
    out = tmp_path / "fastgen"
    assert cli("export", pairs, "--out", out, "--format", "fastgen").returncode == 0
    want, samples = expected(pairs), fastgen_samples(out)
    assert len(samples) == len(want["x_0"]) == 300
    assert [s["__key__"] for s in samples] == [f"{int(s):012d}" for s in want["seed"]]
    for name, field in (("real.npy", "x_0"), ("noise.npy", "x_T"), ("condition.npy", "label")):
        assert np.array_equal(np.stack([s[name] for s in samples]), want[field]), name
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 300 and index["key_map"]["condition"] == "condition.npy"


def test_fastgen_path_holds_the_states_before_x_0(tmp_path):
    rng = np.random.default_rng(1)
    stack = np.stack([80 * rng.standard_normal((40, 3)), 5 * rng.standard_normal((40, 3)),
                      rng.uniform(-1, 1, (40, 3))])                                # (T=3, N, 3): x_T … x_0
    np.save(tmp_path / "stack.npy", stack)
    assert cli("import", tmp_path / "stack.npy", "--format", "npy", "--sigma-max", "80", "--times", "80,5,0",
               "--out", tmp_path / "pairs", "-q").returncode == 0
    assert cli("export", tmp_path / "pairs", "--out", tmp_path / "fg", "--format", "fastgen").returncode == 0
    samples = fastgen_samples(tmp_path / "fg")
    paths = np.stack([s["path.npy"] for s in samples])
    assert paths.shape == (40, 2, 3) and np.array_equal(paths, np.moveaxis(stack[:2], 0, 1).astype(np.float32))
    assert json.loads((tmp_path / "fg" / "index.json").read_text())["path_timesteps"] == [80.0, 5.0]
