"""Fault cases of the statistics the pipeline uses (feature references, normalisation, latent statistics): exit 2
with one `error:` line, no traceback, nothing written (the directory lock and the shard check's cache aside)."""

from pathlib import Path

import pytest
from faults import cli, error_line, tree
from handmade import random_pair_set

from kdm_pipe.integrity import VERIFIED
from kdm_pipe.locks import LOCK


def files(directory: Path) -> dict[str, str]:
    return {k: v for k, v in tree(directory).items() if k not in (LOCK, VERIFIED)}


@pytest.mark.parametrize("args, fragments", [
    (["--detector", "{d}/missing.pt"], ["missing.pt", "no such file"]),
    (["--detector", "{d}/manifest.json"], ["manifest.json", "not a TorchScript file"]),
])
def test_bad_detector_writes_no_store(tmp_path, args, fragments):
    d = random_pair_set(tmp_path / "images", (1, 4, 4))
    before = files(d)
    error_line(cli("stats", d, "-q", *[a.format(d=d) for a in args]), 2, *fragments)
    assert files(d) == before


def test_detector_on_vector_pairs_is_refused(tmp_path):
    d = random_pair_set(tmp_path / "vectors", (2,))
    (tmp_path / "net.pt").write_bytes(b"not looked at")
    before = files(d)
    error_line(cli("stats", d, "--detector", tmp_path / "net.pt", "-q"), 2, "vectors, not images", "drop --detector")
    assert files(d) == before


@pytest.mark.parametrize("args, fragments", [
    (["ref", "--out", "{t}/r.npz"], ["usage", "--from DIR"]),
    (["ref", "sklearn-digits", "--from", "{t}", "--out", "{t}/r.npz"], ["either SOURCE", "not both"]),
    (["ref", "--from", "{t}", "--num", "5", "--out", "{t}/r.npz"], ["--num applies to SOURCE"]),
])
def test_stats_ref_usage(tmp_path, args, fragments):
    error_line(cli("stats", *[a.format(t=tmp_path) for a in args]), 2, *fragments)
    assert not (tmp_path / "r.npz").exists()


def test_train_refuses_standard_normalisation_of_images(tmp_path):
    d = random_pair_set(tmp_path / "images", (1, 4, 4))
    error_line(cli("train", "--data", d, "--out", tmp_path / "run", "--normalize", "standard"), 2,
               "images keep EDM's [-1, 1]")
    assert not (tmp_path / "run").exists() and not (d / "stats.zarr").exists()
