"""generate on a two-node Ray cluster (two `ray start`s on this machine) that loses a node mid-run."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from infra import FAST_FAILURE_DETECTION, LocalCluster  # noqa: E402

from kdm_pipe.config import GenerateConfig
from kdm_pipe.generation import make_shard
from kdm_pipe.integrity import verify
from kdm_pipe.manifest import load_manifest

CLI = [sys.executable, "-m", "kdm_pipe.cli"]
SHARDS, PER_SHARD, BATCH, STEPS = 8, 3000, 1000, 30     # ~1.5 s a shard: time to kill a node mid-shard


@pytest.fixture
def cluster():
    c = LocalCluster(object_store_mb=100, env=FAST_FAILURE_DETECTION)
    try:
        c.add_node(num_cpus=1)
        c.add_node(num_cpus=1, resources={"node2": 1})
        yield c
    finally:
        c.stop()


def nodes(address: str) -> list[dict]:
    ray.init(address=address, log_to_driver=False)
    try:
        return ray.nodes()
    finally:
        ray.shutdown()


def landed(out: Path) -> int:
    return len(json.loads((out / "manifest.json").read_text())["shards"]) if (out / "manifest.json").exists() else 0


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("shard-*.tar"))}


@pytest.mark.slow      # minutes: CI runs it in its slow pass
def test_generate_survives_losing_a_node(cluster, tmp_path):
    before = nodes(cluster.address)
    second = [n["NodeID"] for n in before if n["Alive"] and "node2" in n["Resources"]]
    assert len(before) == 2 and len(second) == 1

    out, log = tmp_path / "pairs", tmp_path / "driver.log"
    args = ["generate", "--shards", str(SHARDS), "--pairs-per-shard", str(PER_SHARD), "--batch", str(BATCH),
            "--steps", str(STEPS), "--workers", "2", "-q", "--out", str(out), "--address", cluster.address]
    with open(log, "w") as f:
        driver = subprocess.Popen(CLI + args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # One CPU per task and per node: at most two shards in progress (a temp file each), one on each node.
        # Node 2 is killed once a shard has landed and both nodes are mid-shard.
        deadline, killed, most = time.time() + 120, False, 0
        while driver.poll() is None:
            assert time.time() < deadline, log.read_text()[-3000:]
            running = list(out.glob(".shard-*.tmp-*"))
            most = max(most, len(running))
            if not killed and 1 <= landed(out) < SHARDS - 1 and len(running) == 2:
                cluster.kill_raylet(1)
                killed = True
            time.sleep(0.02)
        assert driver.returncode == 0, log.read_text()[-3000:]
        assert killed, f"never saw a shard landed with both nodes busy:\n{log.read_text()[-2000:]}"
        assert most == 2
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)

    deadline = time.time() + 30          # the task was retried at once; the GCS's verdict on the node follows
    while [n["Alive"] for n in nodes(cluster.address) if n["NodeID"] in second] != [False]:
        assert time.time() < deadline, "the GCS still lists the killed node as alive"
        time.sleep(1)
    manifest = load_manifest(out)
    assert sorted(s.index for s in manifest.shards) == list(range(SHARDS))     # each shard once, none missing
    assert verify(out) == {}
    assert not list(out.glob(".*tmp*"))                 # the lost attempt's half-written shard is gone
    lines = (out / "generate.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["shard"] for x in lines) == list(range(SHARDS))

    # The same shards written by this process alone, without Ray.
    cfg = GenerateConfig.model_validate(dict(out=tmp_path / "ref", shards=SHARDS, pairs_per_shard=PER_SHARD,
                                             batch=BATCH, sampler={"steps": STEPS}))
    cfg.out.mkdir()
    for k in range(SHARDS):
        make_shard(cfg, k)
    assert digests(out) == digests(cfg.out) and len(digests(out)) == SHARDS
