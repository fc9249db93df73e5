"""generate → shards → verify, with a real Ray session and real tars."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from kdm_pipe.config import ConfigError, GenerateConfig
from kdm_pipe.generation import shard_seeds
from kdm_pipe.integrity import verify
from kdm_pipe.manifest import load_manifest
from kdm_pipe.shards import read_shard
from kdm_pipe.teachers import build_teacher
from stages import generate

CLI = [sys.executable, "-m", "kdm_pipe.cli"]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def cfg(out, **kw):
    base = dict(out=out, shards=4, pairs_per_shard=300, batch=128, sampler={"steps": 6}, workers=2)
    return GenerateConfig.model_validate({**base, **kw})


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("shard-*.tar"))}


def test_shards_round_trip_and_manifest(ray_local, tmp_path):
    c = cfg(tmp_path / "a", trajectory="every-2")
    m = generate.run(c, progress=False)
    assert [s.index for s in m.shards] == [0, 1, 2, 3] and m.num_pairs == 1200
    assert m.nfe == 11 and m.trajectory_steps == [0, 2, 4, 6] and len(m.trajectory_sigmas) == 4
    assert m.teacher["name"] == "checkerboard" and len(m.teacher["sha256"]) == 64
    recs = list(read_shard(tmp_path / "a" / "shard-000002.tar"))
    assert [len(r["seed"]) for r in recs] == [128, 128, 44]       # records hold blocks of pairs
    got = {k: np.concatenate([r[k] for r in recs]) for k in recs[0]}
    seeds = list(shard_seeds(c, 2))
    assert got["seed"].tolist() == seeds
    want = build_teacher(c.teacher).sample(c.sampler, seeds[:128], [0, 2, 4, 6], torch.device("cpu"))
    np.testing.assert_array_equal(got["x_0"][:128], want["x_0"].numpy().astype(np.float32))
    np.testing.assert_array_equal(got["x_T"][:128], want["x_T"].numpy().astype(np.float32))
    assert got["traj"].shape == (300, 4, 2)
    assert verify(tmp_path / "a") == {}


@pytest.mark.slow
def test_same_pairs_for_any_worker_count(ray_local, tmp_path):
    generate.run(cfg(tmp_path / "w2", workers=2), progress=False)
    generate.run(cfg(tmp_path / "w1", workers=1, max_in_flight=1), progress=False)
    assert digests(tmp_path / "w1") == digests(tmp_path / "w2")
    # A separate process with its own local Ray cluster and one worker writes the very same bytes.
    r = subprocess.run(CLI + ["generate", "--out", str(tmp_path / "cli"), "--shards", "4", "--pairs-per-shard", "300",
                              "--batch", "128", "--steps", "6", "--workers", "1", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert digests(tmp_path / "cli") == digests(tmp_path / "w2")


def test_rerun_skips_complete_shards_and_grows(ray_local, tmp_path):
    c = cfg(tmp_path / "g")
    generate.run(c, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "g").glob("shard-*.tar")}
    generate.run(c, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "g").glob("shard-*.tar")} == mtimes
    m = generate.run(cfg(tmp_path / "g", shards=6), progress=False)    # more shards extend the same seed sequence
    assert m.num_shards == 6 and m.shards[-1].seed_start == 5 * 300
    with pytest.raises(ConfigError, match="sampler"):
        generate.run(cfg(tmp_path / "g", shards=6, sampler={"steps": 7}), progress=False)
    with pytest.raises(ConfigError, match="drop"):
        generate.run(cfg(tmp_path / "g", shards=2), progress=False)


def test_verify_catches_corruption_and_rerun_repairs(ray_local, tmp_path):
    c = cfg(tmp_path / "v")
    generate.run(c, progress=False)
    clean = digests(tmp_path / "v")
    s1, s2 = tmp_path / "v" / "shard-000001.tar", tmp_path / "v" / "shard-000002.tar"
    data = bytearray(s1.read_bytes())
    data[len(data) // 2] ^= 0x01
    s1.write_bytes(bytes(data))
    s2.write_bytes(s2.read_bytes()[:-1000])
    problems = verify(tmp_path / "v")
    assert set(problems) == {"shard-000001.tar", "shard-000002.tar"}
    assert "sha256" in problems["shard-000001.tar"] and "size" in problems["shard-000002.tar"]
    r = subprocess.run(CLI + ["verify", str(tmp_path / "v")], capture_output=True, text=True)
    assert r.returncode == 1 and "shard-000001.tar" in r.stderr and "shard-000002.tar" in r.stderr
    generate.run(c, progress=False)
    assert verify(tmp_path / "v") == {} and digests(tmp_path / "v") == clean


@pytest.mark.slow      # minutes: CI runs it in its slow pass
def test_killed_run_resumes_to_identical_bytes(tmp_path):
    args = ["generate", "--shards", "12", "--pairs-per-shard", "2000", "--batch", "500", "--steps", "18",
            "--workers", "1", "-q"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(CLI + args + ["--out", str(tmp_path / "k")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "k").glob("shard-*.tar"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)                        # driver, raylet and workers, mid-shard
    proc.wait()
    done_before = len(load_manifest(tmp_path / "k").shards)
    assert 0 < done_before < 12
    r = subprocess.run(CLI + args + ["--out", str(tmp_path / "k")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(CLI + args + ["--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert digests(tmp_path / "k") == digests(tmp_path / "ref") and len(digests(tmp_path / "ref")) == 12
    assert not list((tmp_path / "k").glob(".*tmp*"))
    assert verify(tmp_path / "k") == {}
