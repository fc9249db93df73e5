"""Images end to end: train a tiny KDM on digit pairs → stats ref → evaluate (pixel features and a TorchScript
detector, FID against the reference) → sample (EDM layout, one file per seed); the CLI refuses bad input with 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kdm_pipe.config import EvaluateConfig, RefStatsConfig, SampleConfig, TrainConfig
from kdm_pipe.training import train
from stages import evaluate, sample, stats

CLI = [sys.executable, "-m", "kdm_pipe.cli"]


class TinyDetector(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: uint8 NCHW → 16 features, or 5 class probabilities."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 16)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        f = self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1))
        return f if return_features else torch.softmax(self.head(f), dim=1)


@pytest.fixture(scope="module")
def run(digit_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "run"
    student = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    train(TrainConfig.model_validate({"data": digit_pairs, "out": out, "steps": 4, "batch": 16, "loader_workers": 0,
                                      "holdout_shards": 1, "tensorboard": False, "student": student}), progress=False)
    return out


def test_evaluate_with_reference_and_detector(run, tmp_path):
    ref = tmp_path / "ref.npz"
    stats.reference(RefStatsConfig(source="sklearn-digits", out=ref))
    with np.load(ref) as f:
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64)
    res = evaluate.run(EvaluateConfig(run=run, num=32, ref=str(ref), fid_num=40, batch=16))
    assert res == json.loads((run / "eval.json").read_text())
    assert res["student"]["fd_teacher"] >= 0 and 0 <= res["student"]["precision"] <= 1
    assert res["student"]["fd_teacher"] < res["untrained"]["fd_teacher"]
    assert res["fid"]["num_samples"] == 40 and res["fid"]["frechet_distance"] > 0
    sp = res["speed"]      # one vocabulary: steps and network passes (the teacher's are its NFE)
    assert (sp["teacher_steps"], sp["teacher_network_passes"]) == (3, 5)
    assert (sp["student_steps"], sp["student_network_passes"]) == (1, 2)          # KDM: encoder + decoder
    Image.open(run / "samples.png").verify()

    detector = tmp_path / "tiny.pt"
    torch.jit.script(TinyDetector()).save(str(detector))
    res = evaluate.run(EvaluateConfig(run=run, num=32, detector=detector, batch=16))
    assert res["detector"].startswith("tiny.pt") and "inception_score" in res["student"]


def test_sample_writes_edm_layout(run, tmp_path):
    out = tmp_path / "samples"
    sample.run(SampleConfig(run=run, out=out, num=12, seed=995, weights="ema"))
    rec = json.loads((out / "samples.json").read_text())
    assert rec["seeds"] == list(range(995, 1007)) and rec["settings"]["weights"] == "ema"
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (12, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        first = f["arr_0"][0, ..., 0]
    assert (out / "000000" / "000995.png").is_file() and (out / "001000" / "001006.png").is_file()
    assert np.array_equal(np.asarray(Image.open(out / "000000" / "000995.png")), first)
    sample.run(SampleConfig(run=run, out=tmp_path / "again", num=1, seed=995, weights="ema"))
    with np.load(tmp_path / "again" / "samples.npz") as f:
        assert np.array_equal(f["arr_0"][0, ..., 0], first)       # a sample depends only on its seed


def test_cli_refuses_bad_input_with_exit_2(run, tmp_path):
    script = f"""
import sys
from typer.testing import CliRunner
from kdm_pipe.cli import app
cases = [["sample", "{tmp_path}", "--out", "{tmp_path}/x"],
         ["sample", "{run}", "--out", "{tmp_path}/x", "--class", "3"],
         ["evaluate", "{run}", "--detector", "{tmp_path}/missing.pt"], ["stats", "ref", "sklearn-digits"],
         ["evaluate", "{run}", "--ref", "{tmp_path}/nope.npz"]]
for args in cases:
    r = CliRunner().invoke(app, args)
    print(r.exit_code, r.output.replace(chr(10), " "))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300).stdout.splitlines()
    assert [line.split()[0] for line in out] == ["2"] * 5, out
    for line, needle in zip(out, ["not a training run", "unconditional", "missing.pt", "--out", "nope.npz"]):
        assert needle in line, line
    assert not (tmp_path / "x").exists()
