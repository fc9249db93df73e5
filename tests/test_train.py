"""train → evaluate on checkerboard pairs; exact resume; clear refusals."""

import subprocess
import sys

import pytest
import ray
from conftest import assert_resume_is_exact

from kdm_pipe.config import ConfigError, EvaluateConfig, GenerateConfig, TrainConfig
from kdm_pipe.evaluation import evaluate
from kdm_pipe.training import train
from stages import generate

CLI = [sys.executable, "-m", "kdm_pipe.cli"]
SMALL = {"hidden": 64, "depth": 3, "latent_dim": 32}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        generate.run(GenerateConfig(out=out, shards=5, pairs_per_shard=2000, batch=1000), progress=False)
    finally:
        ray.shutdown()
    return out


def tcfg(pairs, out, **kw):
    return TrainConfig.model_validate({"data": pairs, "out": out, "student": SMALL, "batch": 256, "log_every": 10,
                                       "ckpt_every": 10, "loader_workers": 1, "shuffle_buffer": 2048, **kw})


def test_resume_is_bit_exact(pairs, tmp_path):
    assert_resume_is_exact(lambda out, steps: tcfg(pairs, out, steps=steps), tmp_path, steps=30, stop=20)


def test_refuses_to_mix_runs(pairs, tmp_path):
    train(tcfg(pairs, tmp_path / "r", steps=10), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(tcfg(pairs, tmp_path / "r", steps=10), progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(tcfg(pairs, tmp_path / "r", steps=20, lr=1e-3), resume=True, progress=False)
    with pytest.raises(ConfigError, match="holding out"):
        train(tcfg(pairs, tmp_path / "x", holdout_shards=5), progress=False)


def test_trained_student_beats_untrained_and_lands_on_the_board(pairs, tmp_path):
    run = tmp_path / "q"
    train(tcfg(pairs, run, steps=800, lr=1e-3, ema=0.99, student={"hidden": 128, "depth": 3, "latent_dim": 64},
               ckpt_every=400), progress=False)
    res = evaluate(EvaluateConfig(run=run, num=1000))
    s, u = res["student"], res["untrained"]
    assert s["sliced_wasserstein"] < 0.25 * u["sliced_wasserstein"]
    assert s["mse"] < 0.1 * u["mse"]
    # most samples on the black squares after 800 steps (the teacher itself: ~3% off). The untrained student puts
    # every sample near one point, on or off the board by chance of its init: its off-support fraction says nothing.
    assert s["off_support"] < 0.4 and res["teacher_floor"]["off_support"] < 0.1
    assert (run / "eval.json").is_file() and (run / "samples.png").stat().st_size > 10_000


@pytest.mark.parametrize("args", [
    ["generate", "--shards", "0", "--out", "OUT"],
    ["generate", "--teacher", "nope", "--out", "OUT"],
    ["generate", "--trajectory", "sometimes", "--out", "OUT"],
    ["generate", "--preset", "BADYAML", "--out", "OUT"],
    ["generate", "--preset", "UNKNOWNKEY", "--out", "OUT"],
    ["train", "--data", "OUT", "--out", "OUT/run"],
    ["evaluate", "OUT"],
    ["verify", "OUT"],
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args):
    (tmp_path / "bad.yaml").write_text("generate: [unclosed\n")
    (tmp_path / "unknown.yaml").write_text("generate:\n  shards: 2\n  colour: blue\n")
    out = tmp_path / "out"
    args = [a.replace("OUT", str(out)).replace("BADYAML", str(tmp_path / "bad.yaml"))
            .replace("UNKNOWNKEY", str(tmp_path / "unknown.yaml")) for a in args]
    r = subprocess.run(CLI + args, capture_output=True, text=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() and "Traceback" not in r.stderr
    assert not out.exists()


def test_dry_run_prints_the_resolved_config(tmp_path):
    r = subprocess.run(CLI + ["generate", "--preset", "checkerboard", "--shards", "3", "--out", str(tmp_path / "o"),
                              "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0 and GenerateConfig.model_validate_json(r.stdout).shards == 3
    assert not (tmp_path / "o").exists()
