"""`make demo`'s pipeline at a reduced size: digits teacher → generate (Ray) → verify → stats → KDM and KD → evaluate →
reports, through the real CLI."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow              # ~3 min on 2 cores: CI runs it with the other slow tests (.ci/run)
def test_digits_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "kdm_pipe.cli", "demo", "--out", str(out), "--scale", "0.05", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("== generate", "== verify", "== filter", "== stats", "== train kdm", "== train kd", "== evaluate kd"):
        assert stage in r.stdout
    assert "pairs as copies of sklearn-digits" in r.stdout
    assert "KD/KDM" in r.stdout and "FD to the whole teacher set" in r.stdout and "secondary:" in r.stdout
    assert "starting a local Ray session" in r.stdout and r.stdout.count("== starting") == 1   # one session
    assert "INFO" not in r.stderr
    html = (out / "report.html").read_text()
    assert 'src="kdm/samples.png"' in html and 'src="kd/samples.png"' in html
    for kind in ("kdm", "kd"):
        res = json.loads((out / kind / "eval.json").read_text())
        assert res["student"]["fd_teacher"] < res["untrained"]["fd_teacher"]
        assert res["student"]["mse"] < res["untrained"]["mse"]
        assert (out / kind / "report.html").is_file()
    assert json.loads((out / "kdm" / "config.json").read_text())["student"]["kind"] == "kdm"
    assert json.loads((out / "kd" / "config.json").read_text())["student"]["kind"] == "kd"


@pytest.mark.slow      # minutes: CI runs it in its slow pass
def test_checkerboard_demo_keeps_the_2d_pipeline(tmp_path):
    out = tmp_path / "cb"
    r = subprocess.run([sys.executable, "-m", "kdm_pipe.cli", "demo", "--preset", "checkerboard-quick",
                        "--out", str(out),
                        "--scale", "0.02", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sliced_wasserstein" in r.stdout and "off_support" in r.stdout
    for kind in ("kdm", "kd"):
        res = json.loads((out / kind / "eval.json").read_text())
        assert res["student"]["sliced_wasserstein"] < res["untrained"]["sliced_wasserstein"]
