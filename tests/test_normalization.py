"""normalize: standard — the student trains on standardised x_0 (the training shards' mean/std from stats.zarr,
computed when missing), the checkpoint carries them and sampling answers in the data's own units."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from handmade import pair_set

from kdm_pipe.config import ConfigError, SampleConfig, StatsConfig, TrainConfig
from kdm_pipe.manifest import Manifest, shard_name
from kdm_pipe.normalization import Standardized
from kdm_pipe.run import Run
from kdm_pipe.shards import read_shard
from kdm_pipe.stats import STORE
from kdm_pipe.trained import load_weights
from kdm_pipe.training import resolved, train
from stages import sample, stats

CENTRE, SCALE = np.array([100.0, -40.0]), np.array([5.0, 0.5])


pytestmark = pytest.mark.usefixtures("ray_cluster")     # one private Ray session per module


@pytest.fixture(scope="module")
def far_pairs(tmp_path_factory) -> Path:
    """2-D pairs far from the origin and badly scaled (x_0 ≈ (100, −40) ± (5, 0.5)), 3 shards of 400."""
    out, rng, shards = tmp_path_factory.mktemp("far"), np.random.default_rng(0), []
    for k in range(3):
        x_0 = CENTRE + SCALE * rng.standard_normal((400, 2))
        x_T = 80 * rng.standard_normal((400, 2))
        shards.append([{"seed": np.arange(400 * k, 400 * k + 400), "x_T": x_T, "x_0": x_0}])
    return pair_set(out, shards)


def fit(data: Path, out: Path, **kw) -> Path:
    train(TrainConfig.model_validate({"data": data, "out": out, "steps": 40, "batch": 128, "loader_workers": 0,
                                      "tensorboard": False, "holdout_shards": 1, "lr": 3e-3,
                                      "student": {"hidden": 32, "depth": 2, "latent_dim": 16}, **kw}),
          progress=False)
    return out


def test_round_trip_in_the_data_units(far_pairs, tmp_path):
    assert not (far_pairs / STORE).exists()
    run = fit(far_pairs, tmp_path / "std", normalize="standard")
    assert (far_pairs / STORE).exists()                                # computed because it was missing
    assert Run(run).config.normalize == "standard"
    model = load_weights(run)[0]
    assert isinstance(model, Standardized)
    x = np.concatenate([r["x_0"] for k in (0, 1) for r in read_shard(far_pairs / shard_name(k))])
    np.testing.assert_allclose(model.mean_0.numpy(), x.mean(0), rtol=1e-6)   # training shards only
    np.testing.assert_allclose(model.std_0.numpy(), x.std(0, ddof=1), rtol=1e-5)

    sample.run(SampleConfig(run=run, out=tmp_path / "samples", num=500, weights="ema"))
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        got = f["x_0"]
    assert np.all(np.abs(got.mean(0) - CENTRE) < 2 * SCALE)           # back in the data's units
    assert np.all(got.std(0) < 4 * SCALE)

    plain = load_weights(fit(far_pairs, tmp_path / "none", normalize="none"))[0]
    with torch.no_grad():
        out = plain(torch.as_tensor(80 * np.random.default_rng(1).standard_normal((500, 2)), dtype=torch.float32))
    assert np.abs(out.numpy().mean(0) - CENTRE).max() > 10              # 40 steps do not get there unaided


@pytest.mark.slow
def test_x_T_standardised_and_old_runs_load_as_none(far_pairs, tmp_path):
    run = fit(far_pairs, tmp_path / "both", normalize="standard", normalize_x_T=True)
    model = load_weights(run)[0]
    assert model.x_T and 60 < float(model.std_T.mean()) < 100
    z = torch.randn(8, 2) * 80
    with torch.no_grad():
        want = model.units(model.student((z - model.mean_T) / model.std_T))
        np.testing.assert_allclose(model(z).numpy(), want.numpy(), rtol=1e-6)

    old = fit(far_pairs, tmp_path / "old", normalize="none")
    cfg = json.loads((old / "config.json").read_text())
    del cfg["normalize"], cfg["normalize_x_T"]                         # as written before normalisation existed
    (old / "config.json").write_text(json.dumps(cfg))
    assert not isinstance(load_weights(old)[0], Standardized)


def test_images_refuse_standard():
    image = Manifest(teacher={"name": "hand"}, source={}, shape=[1, 8, 8], sigma_max=80.0, num_shards=1,
                     pairs_per_shard=1, dtypes={}, shards=[])
    assert resolved(TrainConfig(), image).normalize == "none"
    vector = image.model_copy(update={"shape": [2]})
    assert resolved(TrainConfig(), vector).normalize == "none"             # the measured default (BENCHMARKS)
    with pytest.raises(ConfigError, match="images keep EDM"):
        resolved(TrainConfig(normalize="standard"), image)


@pytest.mark.slow
def test_stale_store_is_recomputed(far_pairs, tmp_path, capsys):
    stats.run(StatsConfig(data=far_pairs), progress=False)
    import zarr
    zarr.open_group(far_pairs / STORE, mode="r+")["per_shard/sha256"][1] = 0      # row 1 no longer trusted
    capsys.readouterr()
    fit(far_pairs, tmp_path / "again", normalize="standard")
    assert "recomputed 1 of 3 shards" in capsys.readouterr().out
