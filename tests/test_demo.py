"""`make demo`'s pipeline at a reduced size: digits teacher → generate (Ray) → verify → stats → KDM and KD → evaluate →
reports, through the real CLI."""

import json
import signal
import subprocess
import sys
import time

import pytest
from infra import alive, children


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
    assert "kd in a second process, beside kdm" in r.stdout and (out / "kd.log").read_text() in r.stdout
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


@pytest.mark.slow              # ~4 min on 2 cores: CI runs it with the other slow tests
def test_sigterm_while_the_students_train_side_by_side_stops_both_and_a_rerun_finishes(tmp_path):
    """SIGTERM to the demo while KDM trains in it and KD beside it: both checkpoint, exit 143 with one error line
    saying how to continue, no process left; the same command resumes both and finishes."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "kdm_pipe.cli", "demo", "--out", str(out), "--scale", "0.05", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 480
    while time.time() < deadline and proc.poll() is None and not all(
            list((out / kind / "checkpoints").glob("*")) for kind in ("kdm", "kd")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    helpers = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 143 and len(errors) == 1 and "rerun the same demo command" in errors[0], stderr
    assert "Traceback" not in stderr and "beside kdm" in stdout
    time.sleep(1)
    assert not [p for p in helpers if alive(p)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("resuming its run") == 2, r.stdout      # both students went on from their checkpoints
    assert all(json.loads((out / kind / "eval.json").read_text())["step"] == 80 for kind in ("kdm", "kd"))
