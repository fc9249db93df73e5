"""evaluate's FD to the whole teacher set from stats.zarr: equals the FD computed from raw features, both counts
reported; a store that no longer describes the set is refused (exit 2, nothing written)."""

import shutil

import numpy as np
import pytest
import ray
from faults import cli, error_line, tree

from kdm_pipe.config import EvaluateConfig, StatsConfig, TrainConfig
from kdm_pipe.evaluation import fresh_samples
from kdm_pipe.manifest import load_manifest
from kdm_pipe.metrics import FeatureStats, PixelFeatures, features, fid_from_stats
from kdm_pipe.pages import fmt
from kdm_pipe.shards import read_shard
from kdm_pipe.trained import load_weights
from kdm_pipe.training import train
from stages import evaluate, stats


@pytest.fixture(scope="module")
def setup(digit_pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    data = shutil.copytree(digit_pairs, root / "pairs")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        stats.run(StatsConfig(data=data), progress=False)
    finally:
        ray.shutdown()
    student = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    train(TrainConfig.model_validate({"data": data, "out": root / "run", "steps": 4, "batch": 16, "loader_workers": 0,
                                      "tensorboard": False, "student": student}), progress=False)
    return data, root / "run"


def test_fd_to_the_teacher_set_equals_raw_features(setup, capsys):
    data, run = setup
    res = evaluate.run(EvaluateConfig(run=run, num=32, set_num=40, batch=16))
    fd = res["fd_set"]
    manifest = load_manifest(data)
    assert fd["num_samples"] == 40 and fd["num_reference"] == manifest.num_pairs == 192
    assert fd["seeds"] == [192, 232]                       # after the set's seeds: no shared noise
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("FD to the whole teacher set (40 fresh samples"))
    assert row.split()[-2:] == [fmt(fd["fd"]), fmt(fd["floor"]["fd"])]       # the table's first row: value, floor
    assert "40 fresh student samples vs the set's 192 pairs" in out
    assert f"compares {res['fd_teacher_samples'][0]} with {res['fd_teacher_samples'][1]} samples" in out

    net = PixelFeatures()
    x_0 = np.concatenate([r["x_0"] for s in manifest.shards for r in read_shard(data / s.name)])
    model = load_weights(run, res["weights"])[0]
    samples = np.concatenate(list(fresh_samples(model, manifest, 192, 40, 16, "cpu")))
    want = fid_from_stats(FeatureStats.of(features(net, [samples]), net.name),
                          FeatureStats.of(features(net, [x_0]), net.name))
    assert fd["fd"] == pytest.approx(want, rel=1e-6)
    h = len(manifest.shards) // 2 * 64                     # the floor: the first half of the shards vs the rest
    floor = fid_from_stats(FeatureStats.of(features(net, [x_0[:h]]), net.name),
                           FeatureStats.of(features(net, [x_0[h:]]), net.name))
    assert fd["floor"]["num"] == [h, 192 - h] and fd["floor"]["fd"] == pytest.approx(floor, rel=1e-6)


def test_stale_store_refused_with_exit_2(setup, tmp_path):
    data, run = setup
    stale = shutil.copytree(data, tmp_path / "pairs")
    m = load_manifest(stale)
    (stale / "manifest.json").write_text((stale / "manifest.json").read_text().replace(m.shards[0].sha256, "0" * 64))
    before = tree(run)
    r = cli("evaluate", run, "--data", stale, "--num", 32)
    error_line(r, 2, "stats.zarr", "other shards", f"kdm-pipe stats {stale}")
    assert tree(run) == before


def test_statistics_from_before_the_filter_refused_with_exit_2(setup, tmp_path):
    """`evaluate` after `filter` never reports an FD against statistics that still count the excluded pairs."""
    data, run = setup
    filtered = shutil.copytree(data, tmp_path / "pairs")
    r = cli("filter", filtered, "--ref", "sklearn-digits", "--rule", "absolute", "--threshold", "2.8", "-q")
    assert r.returncode == 0, r.stderr
    assert load_manifest(filtered).filter.flagged > 0
    before = tree(run)
    r = cli("evaluate", run, "--data", filtered, "--num", 32)
    error_line(r, 2, "stats.zarr", "before the memorisation filter", f"kdm-pipe stats {filtered}")
    assert tree(run) == before
