"""Images end to end through the CLI: train a tiny KDM on digit pairs → stats ref → evaluate (pixel features and a
TorchScript detector, FID against the reference) → sample; bad input exits 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

CLI = [sys.executable, "-m", "kdm_pipe.cli"]
STUDENT = ["--preset", "digits", "--batch", "16", "--loader-workers", "0", "--device", "cpu", "--threads", "1",
           "--no-tensorboard", "--holdout-shards", "1", "--quiet"]


def cli(*args, check=True):
    r = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


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
    cli("train", "--data", digit_pairs, "--out", out, "--steps", "4", "--ckpt-every", "2", *STUDENT,
        "--probe-every", "2")
    return out


def test_evaluate_with_reference_and_detector(run, digit_pairs, tmp_path):
    ref = tmp_path / "ref.npz"
    cli("stats", "ref", "sklearn-digits", "--out", ref)
    with np.load(ref) as f:
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64)
    r = cli("evaluate", run, "--num", "32", "--ref", ref, "--fid-num", "40", "--batch", "16")
    res = json.loads((run / "eval.json").read_text())
    assert res["student"]["fd_teacher"] >= 0 and 0 <= res["student"]["precision"] <= 1
    assert res["fid"]["num_samples"] == 40 and res["fid"]["frechet_distance"] > 0
    assert res["speed"]["teacher_nfe"] == 5 and res["speed"]["student_nfe"] == 1
    assert "fd_teacher" in r.stdout and "Fréchet distance vs" in r.stdout
    Image.open(run / "samples.png").verify()

    detector = tmp_path / "tiny.pt"
    torch.jit.script(TinyDetector()).save(str(detector))
    cli("evaluate", run, "--num", "32", "--detector", detector, "--batch", "16")
    res = json.loads((run / "eval.json").read_text())
    assert res["detector"].startswith("tiny.pt") and "inception_score" in res["student"]


def test_sample_writes_edm_layout(run, tmp_path):
    out = tmp_path / "samples"
    cli("sample", run, "--out", out, "--num", "12", "--seed", "995", "--weights", "ema")
    rec = json.loads((out / "samples.json").read_text())
    assert rec["seeds"] == list(range(995, 1007)) and rec["settings"]["weights"] == "ema"
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (12, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        first = f["arr_0"][0, ..., 0]
    assert (out / "000000" / "000995.png").is_file() and (out / "001000" / "001006.png").is_file()
    assert np.array_equal(np.asarray(Image.open(out / "000000" / "000995.png")), first)
    again = tmp_path / "again"
    cli("sample", run, "--out", again, "--num", "1", "--seed", "995", "--weights", "ema")
    with np.load(again / "samples.npz") as f:
        assert np.array_equal(f["arr_0"][0, ..., 0], first)       # a sample depends only on its seed


def test_bad_input_exits_2(run, tmp_path):
    r = cli("sample", tmp_path, "--out", tmp_path / "x", check=False)
    assert r.returncode == 2 and "not a training run" in r.stderr
    r = cli("sample", run, "--out", tmp_path / "x", "--class", "3", check=False)
    assert r.returncode == 2 and "unconditional" in r.stderr
    r = cli("evaluate", run, "--detector", tmp_path / "missing.pt", check=False)
    assert r.returncode == 2 and "missing.pt" in r.stderr
    r = cli("stats", "ref", "sklearn-digits", check=False)
    assert r.returncode == 2 and "--out" in r.stderr
