"""EMA or raw: chosen on a held-out distribution distance (not a paired error), on a selection split disjoint from
the reported one, recorded once in RUN/weights.json and used by every consumer (evaluate, sample, analyze)."""

import itertools
import json

import numpy as np
import pytest
import torch

from kdm_pipe.config import EvaluateConfig, SampleConfig, TrainConfig
from kdm_pipe.evaluation import (
    SELECTION_MAX,
    WEIGHTS_JSON,
    choice_distance,
    chosen_weights,
    evaluate,
    heldout_split,
    weight_choice,
)
from kdm_pipe.metrics import paired_errors
from kdm_pipe.teachers.analytic import CheckerboardTeacherConfig, build_checkerboard
from kdm_pipe.training import train
from stages import sample

SMALL_MLP = {"hidden": 32, "depth": 2, "latent_dim": 16}


@pytest.fixture(scope="module")
def run(vector_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "run"
    train(TrainConfig.model_validate({"data": vector_pairs, "out": out, "student": SMALL_MLP, "steps": 30,
                                      "batch": 128, "loader_workers": 0, "shuffle_buffer": 512, "ckpt_every": 30,
                                      "probe_every": 30, "tensorboard": False}), progress=False)
    return out


def test_selection_and_report_splits_are_disjoint_and_fixed(run):
    select, report = heldout_split(run, num=600)
    assert len(select["x_0"]) == min(1000 // 2, SELECTION_MAX) and len(report["x_0"]) == 500   # 1 shard × 1000
    assert not set(select["seed"].tolist()) & set(report["seed"].tolist())
    again, _ = heldout_split(run)                              # sample/analyze: the same selection, whatever num
    assert np.array_equal(again["seed"], select["seed"])


def test_choice_prefers_the_sharp_sampler_that_paired_error_would_reject(run):
    """A blurry regression-like student (the mean of x_0 everywhere) wins on paired MSE; a sharp one whose samples
    follow the teacher's distribution but not the pairing loses on it. The choice takes the sharp one."""
    teacher = build_checkerboard(CheckerboardTeacherConfig())
    select, _ = heldout_split(run)
    mean = torch.as_tensor(select["x_0"].mean(0), dtype=torch.float32)
    blurry = lambda x, y: mean.expand(len(x), -1)  # noqa: E731
    seeds = itertools.count(1)
    sharp = lambda x, y: torch.as_tensor(teacher.sample_data(len(x), seed=next(seeds)), dtype=torch.float32)  # noqa: E731
    (run / WEIGHTS_JSON).unlink(missing_ok=True)
    record = weight_choice(run, models={"ema": blurry, "raw": sharp})
    assert record["weights"] == "raw" and record["criterion"] == "sliced_wasserstein"
    assert record["scores"]["raw"] < 0.2 * record["scores"]["ema"]
    x_0 = select["x_0"]
    paired = {w: paired_errors(f(torch.as_tensor(select["x_T"]), None).numpy(), x_0)["mse"]
              for w, f in (("ema", blurry), ("raw", sharp))}
    assert paired["ema"] < paired["raw"]                       # what the old criterion would have picked
    (run / WEIGHTS_JSON).unlink()


def test_image_choice_is_a_frechet_distance_of_pooled_pixels():
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, (400, 1, 32, 32)) * (rng.uniform(size=(400, 1, 1, 1)) > 0.5)
    sharp = rng.uniform(-1, 1, (400, 1, 32, 32)) * (rng.uniform(size=(400, 1, 1, 1)) > 0.5)
    blurry = np.broadcast_to(ref.mean(0), ref.shape)
    assert choice_distance(sharp, ref) < choice_distance(blurry, ref)
    assert choice_distance(ref, ref) == pytest.approx(0, abs=1e-6)


def test_every_consumer_uses_the_recorded_choice(run, tmp_path):
    (run / WEIGHTS_JSON).unlink(missing_ok=True)
    # sample before evaluate: computes the choice once and records it
    sample.run(SampleConfig(run=run, out=tmp_path / "s1", num=4))
    record = json.loads((run / WEIGHTS_JSON).read_text())
    assert set(record["scores"]) == {"ema", "raw"} and record["checkpoint"].startswith("ckpt-")
    assert json.loads((tmp_path / "s1" / "samples.json").read_text())["settings"]["weights"] == record["weights"]
    # a recorded choice is reused as it stands (here: flipped by hand) by sample, evaluate and chosen_weights
    other = "raw" if record["weights"] == "ema" else "ema"
    (run / WEIGHTS_JSON).write_text(json.dumps({**record, "weights": other}))
    assert chosen_weights(run) == other
    sample.run(SampleConfig(run=run, out=tmp_path / "s2", num=4))
    assert json.loads((tmp_path / "s2" / "samples.json").read_text())["settings"]["weights"] == other
    res = evaluate(EvaluateConfig(run=run, num=400))
    assert res["weights"] == other and res["weights_choice"]["weights"] == other
    # both weights' numbers on the report split; the chosen ones are "student"
    assert set(res["by_weights"]) == {"ema", "raw"} and res["by_weights"][other] == res["student"]
    assert {"mse", "sliced_wasserstein", "off_support"} <= set(res["by_weights"][record["weights"]])
    assert chosen_weights(run, "ema") == "ema"                 # explicit weights as given
    # a new checkpoint (a resumed, longer run) makes the record stale: chosen again
    (run / WEIGHTS_JSON).write_text(json.dumps({**record, "weights": other, "checkpoint": "ckpt-00000001.pt"}))
    assert weight_choice(run)["weights"] == record["weights"]
