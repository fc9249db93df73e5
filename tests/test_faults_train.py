"""Fault injection on the trainer's side of the data path: corrupt, truncated, deleted and crafted shards, bad
--out, damaged checkpoints, moved runs, and exact resume with dropout. Every case checks the exit code, the one
`error:` line, that the command ends in time (no hang) and that nothing was left behind or lost."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_resume_is_exact
from faults import CLI, ENV, bless, cli, error_line, flip_byte, kdm, left, small_disk, tree
from infra import alive, children

from kdm_pipe import run as kdm_run
from kdm_pipe.config import TrainConfig
from kdm_pipe.trained import latest_checkpoint

QUICK = ["--steps", "6", "--batch", "100", "--ckpt-every", "3", "--probe-every", "3", "--no-tensorboard", "-q",
         "--student", "kdm"]
TINY_UNET = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "w_adv": 1.0}


@pytest.fixture
def pairs(vector_pairs, tmp_path):
    """A private copy of the 5 × 1000 checkerboard pairs, free to damage."""
    return Path(shutil.copytree(vector_pairs, tmp_path / "pairs"))


def fresh(*args):
    """`cli` as a new process would run it: a process warns about a damaged checkpoint once, and these share one."""
    kdm_run._warned.clear()
    return cli(*args)




STALL = """
import os, sys, time
from pathlib import Path
from kdm_pipe import loader, cli
real, mark = loader.PairStream._read, Path(sys.argv[1])
def stalled(self, url):
    yield from real(self, url)
    mark.write_text(str(os.getpid()))
    time.sleep(3600)                  # the next shard never comes: a store that stopped answering
loader.PairStream._read = stalled
sys.argv = ["kdm-pipe", *sys.argv[2:]]
cli.main()
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_while_a_read_stalls_checkpoints_at_once(pairs, tmp_path, workers):
    """A scheduler's SIGTERM must not wait for a batch that never comes: the run checkpoints the step it finished and
    exits 143 within seconds, the stuck loader worker killed, and the checkpoint resumes."""
    run, mark = tmp_path / "run", tmp_path / "stalled"
    args = ["train", "--data", pairs, "--out", run, "--steps", "1000", "--batch", "100", "--shuffle-buffer", "100",
            "--log-every", "1", "--ckpt-every", "1000", "--probe-every", "1000", "--no-tensorboard", "-q",
            "--loader-workers", str(workers)]
    proc = subprocess.Popen([sys.executable, "-c", STALL, str(mark), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not mark.exists() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)                                   # the batches already read are trained on; then it waits
        reader = int(mark.read_text())
        proc.send_signal(signal.SIGTERM)
        t = time.time()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert time.time() - t < 15
    logged = [line for line in (run / "train.jsonl").read_text().splitlines()]
    state = torch.load(latest_checkpoint(run), weights_only=True)
    assert f"stopped by SIGTERM at step {state['step']}" in out and state["step"] == len(logged) > 0
    assert workers == 0 or not alive(reader)
    args[args.index("--steps") + 1] = state["step"] + 2
    r = cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == state["step"] + 2


def test_same_size_corruption_is_refused_before_training(pairs, tmp_path):
    ok = cli("train", "--data", pairs, "--out", tmp_path / "first", *QUICK)   # fills the checksum cache
    assert ok.returncode == 0, ok.stderr
    flip_byte(pairs / "shard-000002.tar", 2000)
    r = cli("train", "--data", pairs, "--out", tmp_path / "run", *QUICK)
    error_line(r, 1, "shard-000002.tar", "sha256", "rerun")
    assert not (tmp_path / "run").exists()


def test_unreadable_shard_mid_stream_stops_the_run_within_seconds(pairs, tmp_path):
    path = pairs / "shard-000001.tar"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    bless(pairs)                        # the checksums agree: only reading the shard can find the damage
    r = kdm("train", "--data", pairs, "--out", tmp_path / "run", *QUICK, "--loader-workers", "1", timeout=60)
    error_line(r, 1, "shard-000001.tar", "unreadable")
    assert not (tmp_path / "run").exists()          # failed before its first checkpoint: no run left behind


def test_deleted_shard_is_named(pairs, tmp_path):
    (pairs / "shard-000003.tar").unlink()
    r = cli("train", "--data", pairs, "--out", tmp_path / "run", *QUICK)
    error_line(r, 1, "shard-000003.tar", "missing")


def test_bad_heldout_shard_is_named(pairs, tmp_path):
    path = pairs / "shard-000004.tar"                # the held-out shard (holdout_shards = 1)
    with open(path, "r+b") as f:
        f.truncate(1500)
    bless(pairs)
    r = kdm("train", "--data", pairs, "--out", tmp_path / "run", *QUICK, "--loader-workers", "1", timeout=60)
    error_line(r, 1, "shard-000004.tar")


def test_holding_out_every_shard_says_which_flag_to_change(pairs, tmp_path):
    r = cli("train", "--data", pairs, "--out", tmp_path / "run", *QUICK, "--holdout-shards", "5")
    error_line(r, 2, "5 complete shards (5,000 pairs)", "holding out 5", "--holdout-shards 1",
               "--pairs-per-shard 555")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_unusable_out_is_bad_input(pairs, tmp_path, kind):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if kind == "file" else tmp_path / "f" / "run"
    r = cli("train", "--data", pairs, "--out", out, *QUICK, "--loader-workers", "1")
    error_line(r, 2, str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "x"


def test_damaged_latest_checkpoint_falls_back_everywhere(pairs, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--data", pairs, "--out", run, *QUICK).returncode == 0
    latest = run / "checkpoints" / "ckpt-00000006.pt"
    with open(latest, "r+b") as f:
        f.truncate(latest.stat().st_size // 3)
    for args in (["evaluate", run, "--num", "200"], ["sample", run, "--out", tmp_path / "s", "--num", "8"],
                 ["analyze", run, "--num", "200"]):
        r = fresh(*args)
        assert r.returncode == 0, r.stderr
        assert "ckpt-00000006.pt is damaged" in r.stderr and "Traceback" not in r.stderr
    r = fresh("train", "--data", pairs, "--out", run, *QUICK, "--resume")
    assert r.returncode == 0, r.stderr
    assert "falling back" in r.stderr
    assert (run / "checkpoints" / "ckpt-00000006.pt.damaged").is_file()     # set aside, not deleted
    ref = tmp_path / "ref"
    assert cli("train", "--data", pairs, "--out", ref, *QUICK).returncode == 0
    a, b = (torch.load(latest_checkpoint(d), weights_only=True) for d in (run, ref))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_no_intact_checkpoint_is_one_line(pairs, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--data", pairs, "--out", run, *QUICK).returncode == 0
    for ckpt in (run / "checkpoints").glob("ckpt-*.pt"):
        ckpt.write_bytes(os.urandom(4096))
    before = tree(run)
    for args in (["evaluate", run, "--num", "200"], ["sample", run, "--out", tmp_path / "s", "--num", "8"],
                 ["analyze", run, "--num", "200"]):
        error_line(cli(*args), 2, "none is intact")
    assert tree(run) == before and not (tmp_path / "s").exists()


def test_moved_run_and_pairs_resume_and_evaluate(pairs, tmp_path):
    old = tmp_path / "old"
    shutil.move(pairs, old / "pairs")
    assert cli("train", "--data", old / "pairs", "--out", old / "run", *QUICK[:1], "3", *QUICK[2:]).returncode == 0
    new = tmp_path / "moved"
    shutil.move(old, new)
    r = cli("train", "--data", new / "pairs", "--out", new / "run", *QUICK, "--resume")
    assert r.returncode == 0, r.stderr
    assert torch.load(latest_checkpoint(new / "run"), weights_only=True)["step"] == 6
    r = cli("evaluate", new / "run", "--num", "200")
    assert r.returncode == 0, r.stderr


def test_resume_on_other_pairs_is_refused(pairs, vector_pairs, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--data", pairs, "--out", run, *QUICK[:1], "3", *QUICK[2:]).returncode == 0
    flip_byte(pairs / "shard-000000.tar", 3000)
    bless(pairs)                        # valid pairs, but not the ones the run trained on
    before = tree(run)
    r = cli("train", "--data", pairs, "--out", run, *QUICK, "--resume")
    error_line(r, 2, "--resume", "split.json")
    assert tree(run) == before


def test_resume_with_dropout_is_exact(digit_pairs, tmp_path):
    """Dropout draws from the global RNG; the loader must not (its worker seeds once came after the restore)."""
    def cfg(out, steps):
        return TrainConfig.model_validate({
            "data": digit_pairs, "out": out, "steps": steps, "batch": 16, "loader_workers": 1, "shuffle_buffer": 32,
            "ckpt_every": 2, "probe_every": 100, "tensorboard": False, "student": {**TINY_UNET, "dropout": 0.3}})
    assert_resume_is_exact(cfg, tmp_path, steps=5, stop=2, parts=("model", "ema", "disc"))


# ---- trust round 3: divergence, sizes, one writer per run, full disk ---------------------------------------------

def preset(tmp_path: Path, **train) -> Path:
    """A preset file with these train settings (for settings without a flag of their own)."""
    import yaml
    path = tmp_path / f"preset-{len(list(tmp_path.glob('preset-*')))}.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    return path


@pytest.mark.parametrize("flag, value, says", [("--lr", "inf", "lr"), ("--lr", "nan", "lr"), ("--lr", "1e6", "lr"),
                                               ("--ema", "nan", "ema"), ("--w-adv", "inf", "w_adv")])
def test_non_finite_and_absurd_settings_are_refused(pairs, tmp_path, flag, value, says):
    before = tree(tmp_path)
    r = cli("train", "--data", pairs, "--out", tmp_path / "run", *QUICK, flag, value)
    error_line(r, 2, says)
    assert tree(tmp_path) == before


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path):
    """Pairs far from unit scale: every loss overflows float32. The run stops after nonfinite_steps steps."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x_T.npy", (80 * rng.standard_normal((1000, 2))).astype(np.float32))
    np.save(tmp_path / "x_0.npy", (1e20 * rng.standard_normal((1000, 2))).astype(np.float32))
    data, run = tmp_path / "pairs", tmp_path / "run"
    ok = cli("import", "--format", "npy", "--x-T", tmp_path / "x_T.npy", "--x-0", tmp_path / "x_0.npy", "--out", data,
             "--pairs-per-shard", "200")
    assert ok.returncode == 0, ok.stderr
    r = cli("train", "-p", preset(tmp_path, nonfinite_steps=3), "--data", data, "--out", run, "--steps", "50",
            "--batch", "50", "--ckpt-every", "2", "--probe-every", "2", "--no-tensorboard", "-q")
    error_line(r, 1, "diverged at step 3", "3 consecutive steps", "ckpt-00000002.pt is kept", "--lr")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002.pt", "ckpt-00000002.pt.sha256"]
    assert latest_checkpoint(run).name == "ckpt-00000002.pt"


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    run = kdm_run.Run(tmp_path / "run")
    run.ckpt_dir.mkdir(parents=True)
    good = {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}}
    assert run.save_checkpoint(1, good) is not None
    for bad in (float("nan"), float("inf")):
        assert run.save_checkpoint(2, {"model": {"w": torch.tensor([1.0, bad])}, "ema": good["ema"]}) is None
    assert [p.name for p in run.checkpoints()] == ["ckpt-00000001.pt"]
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-00000001.pt"


def test_probing_a_non_finite_operator_does_not_reach_lapack():
    """LAPACK on a NaN matrix printed oneMKL errors (and segfaulted a diverged run's probe, exit 139)."""
    code = ("import torch; from kdm_pipe.student.koopman import eigvals; "
            "m = torch.full((16, 16), float('nan')); lam = eigvals(m); "
            "assert lam.shape == (16,) and bool(lam.isnan().all()); "
            "m = torch.eye(16); m[3, 4] = float('inf'); assert bool(eigvals(m).isnan().all()); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok" and not r.stderr.strip(), r.stderr


@pytest.mark.parametrize("args, says", [
    (["--batch", str(10**12)], ("--batch 1,000,000,000,000", "4,000 training pairs")),
    (["--batch", "100", "SHUFFLE"], ("shuffle-buffer", "memory")),
])
def test_sizes_beyond_the_data_or_memory_are_refused_before_step_1(pairs, tmp_path, args, says):
    if "SHUFFLE" in args:
        args = [*args[:-1], "-p", preset(tmp_path, shuffle_buffer=10**13)]
    r = kdm("train", "--data", pairs, "--out", tmp_path / "run", *QUICK[:2], *QUICK[4:], *args, timeout=60)
    error_line(r, 2, *says)
    assert not (tmp_path / "run").exists()


LOADER = """
import os, sys, time
from kdm_pipe.loader import batches
from kdm_pipe.shards import read_shard

def slow(url):              # the second shard read hangs: a worker busy reading checks no parent
    if url.endswith("shard-000001.tar"):
        open(sys.argv[2], "w").close()
        time.sleep(600)
    yield from read_shard(url)

stream = batches(sys.argv[1], [(f"shard-00000{i}.tar", 1000) for i in range(2)], 200, 64, 0, workers=1, read=slow)
next(stream)
print(os.getpid(), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_loader_workers_die_with_a_killed_trainer(pairs, tmp_path):
    import signal
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    busy = tmp_path / "busy"
    parent = subprocess.Popen([sys.executable, script, pairs, busy], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        pid = int(parent.stdout.readline())
        deadline = time.time() + 60
        while not busy.exists() and time.time() < deadline:     # the worker is inside its slow read
            time.sleep(0.1)
        workers = children(pid)
        assert workers, "no loader worker started"
        os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.1)
        left = [w for w in workers if alive(w)]
        for w in left:
            os.kill(w, signal.SIGKILL)
        assert not left, f"loader worker(s) {left} outlived their killed trainer"
    finally:
        parent.kill()


@pytest.mark.slow
def test_one_writer_per_run_and_readers_see_only_committed_checkpoints(pairs, tmp_path):
    import signal
    run = tmp_path / "run"
    every_step = ["--data", pairs, "--out", run, "--batch", "100", "--ckpt-every", "1", "--probe-every", "50",
                  "--no-tensorboard", "-q"]
    assert cli("train", *every_step, "--steps", "3").returncode == 0
    first = subprocess.Popen([*CLI, "train", *every_step, "--steps", "100000", "--resume"], env=ENV,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(list((run / "checkpoints").glob("ckpt-*.pt"))) < 6 and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        second = cli("train", *every_step, "--steps", "10", "--resume")
        error_line(second, 2, str(run), "in use by", f"train --out {run}", f"pid {first.pid}")
        for _ in range(3):                   # checkpoints are written every step meanwhile
            r = fresh("evaluate", run, "--num", "200")
            assert r.returncode == 0 and "damaged" not in r.stderr, r.stderr
        assert first.poll() is None, first.stderr.read()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143, first.stderr.read()
    finally:
        first.kill()
    assert not (run / ".kdm-pipe.lock").exists()
    assert not list((run / "checkpoints").glob(".*"))
    step = torch.load(latest_checkpoint(run), weights_only=True)["step"]
    r = fresh("train", *every_step, "--steps", str(step + 2), "--resume")
    assert r.returncode == 0, r.stderr


def test_a_full_disk_while_checkpointing_is_one_line(pairs, tmp_path):
    disk = tmp_path / "disk"
    r = small_disk(disk, "size=256k", *CLI, "train", "--data", pairs, "--out", disk / "run", *QUICK,
                   "--loader-workers", "0")
    line = error_line(r, 1, f"disk full at {disk / 'run' / 'checkpoints'}", "need ~", "MB free")
    assert "inline_container" not in r.stderr
    need = int(line.split("need ~")[1].split(" MB")[0].replace(",", ""))
    assert need >= 1
    assert left(r) == []                 # a new run without a checkpoint is removed whole
