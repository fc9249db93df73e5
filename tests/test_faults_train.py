"""Fault injection on the trainer's side of the data path: corrupt, truncated, deleted and crafted shards, bad
--out, damaged checkpoints, moved runs, and exact resume with dropout. Every case checks the exit code, the one
`error:` line, that the command ends in time (no hang) and that nothing was left behind or lost."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_resume_is_exact
from faults import bless, cli, error_line, flip_byte, kdm, tree

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
