"""Latent statistics of a trained student over a pair set (RUN/latents.zarr/statistics): with identity encoders
they reproduce the data's statistics; rows are reused for unchanged shards and dropped for another checkpoint."""

from pathlib import Path

import numpy as np
import pytest
import torch
from faults import cli, error_line, tree
from handmade import pair_set

from kdm_pipe.analysis import analyze
from kdm_pipe.config import StatsConfig, TrainConfig
from kdm_pipe.latents import load_latent_stats, participation_ratio
from kdm_pipe.manifest import shard_name
from kdm_pipe.probes import load_probes
from kdm_pipe.report import write_report
from kdm_pipe.run import Run
from kdm_pipe.shards import read_shard
from kdm_pipe.training import train
from stages import stats

C = np.array([[2.0, 0.3], [0.0, 0.5]])


pytestmark = pytest.mark.usefixtures("ray_cluster")     # one private Ray session per module


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Correlated 2-D pairs in 3 uneven shards."""
    out, rng, shards = tmp_path_factory.mktemp("pairs"), np.random.default_rng(0), []
    for k, n in enumerate([300, 170, 230]):
        x_T = 80 * rng.standard_normal((n, 2))
        x_0 = x_T @ np.array([[0.02, 0.01], [0.0, 0.03]]) + 0.5 * rng.standard_normal((n, 2)) + [1.0, -2.0]
        shards.append([{"seed": np.arange(n) + 1000 * k, "x_T": x_T, "x_0": x_0}])
    return pair_set(out, shards)


@pytest.fixture(scope="module")
def identity_run(pairs, tmp_path_factory) -> Path:
    """A KDM student whose encoders are identities and whose operator is C: each encoder is Linear(2 → 4), SiLU,
    Linear(4 → 2) set to x ↦ [x, −x] ↦ SiLU(x) − SiLU(−x) = x·σ(x) + x·σ(−x) = x."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig.model_validate({"data": pairs, "out": out, "steps": 1, "batch": 32, "loader_workers": 0,
                                      "tensorboard": False, "normalize": "none", "probe_every": 1,
                                      "student": {"mlp": "linear-head", "depth": 1, "hidden": 4, "latent_dim": 2,
                                                  "operator": "linear"}}), progress=False)
    r = Run(out)
    state = r.load_checkpoint()[0]
    sd = {k: v.clone() for k, v in state["ema"].items()}
    eye = torch.eye(2)
    for enc in ("enc_T", "enc_0"):
        sd[f"{enc}.0.weight"], sd[f"{enc}.0.bias"] = torch.cat([eye, -eye]), torch.zeros(4)
        sd[f"{enc}.2.weight"], sd[f"{enc}.2.bias"] = torch.cat([eye, -eye], 1), torch.zeros(2)
    sd["koopman.op.weight"] = torch.as_tensor(C, dtype=torch.float32)
    r.save_checkpoint(2, {"model": sd, "ema": sd})
    return out


def data(directory: Path) -> dict[str, np.ndarray]:
    recs = [r for k in range(3) for r in read_shard(directory / shard_name(k))]
    return {k: np.concatenate([r[k] for r in recs]) for k in ("x_0", "x_T")}


def test_identity_encoders_reproduce_the_data_statistics(pairs, identity_run, capsys):
    stats.run(StatsConfig(data=pairs, run=identity_run), progress=False)
    assert "effective rank" in capsys.readouterr().out
    got = load_latent_stats(identity_run)
    d = data(pairs)
    z_T = d["x_T"] / 80                                       # the vector student's E_T sees x_T / σ_max
    want = {"z_0": np.cov(d["x_0"], rowvar=False), "z_T": np.cov(z_T, rowvar=False),
            "Cz_T": C @ np.cov(z_T, rowvar=False) @ C.T}
    for k, cov in want.items():
        np.testing.assert_allclose(got["eigenvalues"][k], np.linalg.eigvalsh(cov)[::-1], rtol=1e-5)
        assert got["summary"]["effective_rank"][k] == pytest.approx(participation_ratio(np.linalg.eigvalsh(cov)),
                                                                   rel=1e-5)
    residual = d["x_0"] - z_T @ C.T
    explained = 1 - (residual**2).sum(1).mean() / np.trace(want["z_0"])
    assert got["summary"]["explained"] == pytest.approx(explained, rel=1e-5)
    assert got["summary"]["num_pairs"] == 700 and got["checkpoint"] == "ckpt-00000002.pt"
    assert got["summary"]["z_T_isotropy"] == pytest.approx(participation_ratio(np.linalg.eigvalsh(want["z_T"])) / 2,
                                                           rel=1e-5)
    assert set(load_probes(identity_run / "latents.zarr")) >= {"step", "z_0/mean"}
    assert not any(k.startswith("statistics") for k in load_probes(identity_run / "latents.zarr"))

    stats.run(StatsConfig(data=pairs, run=identity_run), progress=False)    # nothing stale: the same numbers
    assert load_latent_stats(identity_run)["summary"] == got["summary"]

    res = analyze(identity_run, num=200)
    assert res["latent_spectra"]["effective_rank"] == got["summary"]["effective_rank"]
    assert "analysis/latent_spectra.png" in res["figures"] and (identity_run / "analysis/latent_spectra.png").is_file()
    assert "C z_T explains" in write_report(identity_run).read_text()


def test_kd_and_non_runs_are_refused(pairs, tmp_path):
    kd = tmp_path / "kd"
    train(TrainConfig.model_validate({"data": pairs, "out": kd, "steps": 1, "batch": 32, "loader_workers": 0,
                                      "tensorboard": False, "student": {"kind": "kd", "hidden": 8, "depth": 1}}),
          progress=False)
    before = tree(kd)
    error_line(cli("stats", pairs, "--run", kd), 2, "KD student", "no latent")
    assert tree(kd) == before
    error_line(cli("stats", pairs, "--run", tmp_path), 2, "not a training run")
