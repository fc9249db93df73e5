"""The whole pipeline on s3:// against a real S3 API server (moto's, on loopback): generate on a two-node Ray
cluster → verify → stats → train → evaluate, every location a URL, and the shards the same bytes as a local
generate of the same settings. Nothing is left in the bucket but what the stages publish."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import s3fs
from infra import LocalCluster  # noqa: E402

from kdm_pipe.manifest import load_manifest

CLI = [sys.executable, "-m", "kdm_pipe.cli"]
GENERATE = ["generate", "--preset", "checkerboard-quick", "--shards", "4", "--pairs-per-shard", "1000", "--batch",
            "500", "--workers", "2", "-q"]


def kdm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"kdm-pipe {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow      # a few minutes: CI runs it in its slow pass
def test_the_pipeline_runs_entirely_on_s3(bucket, tmp_path):
    pairs, run = f"{bucket}/pairs", f"{bucket}/runs/kdm"
    cluster = LocalCluster(object_store_mb=100, env={"OMP_NUM_THREADS": "1"})    # after s3_server: AWS_* inherited
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        kdm(*GENERATE, "--out", pairs, "--address", cluster.address)
        kdm("verify", pairs)
        kdm("stats", pairs, "--address", cluster.address, "-q")
    finally:
        cluster.stop()
    kdm(*GENERATE, "--out", str(tmp_path / "pairs"))
    remote, local = load_manifest(pairs), load_manifest(tmp_path / "pairs")
    assert [(s.name, s.sha256) for s in remote.shards] == [(s.name, s.sha256) for s in local.shards]

    kdm("train", "--preset", "checkerboard-quick", "--data", pairs, "--out", run, "--steps", "40",
        "--ckpt-every", "20", "-q")
    kdm("evaluate", run)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    keys = [k.split("/", 1)[1] for k in fs.find(bucket.removeprefix("s3://"))]
    assert {f"pairs/shard-{k:06d}.tar" for k in range(4)} | {"pairs/manifest.json", "runs/kdm/config.json",
                                                              "runs/kdm/eval.json"} <= set(keys)
    assert any(k.startswith("pairs/stats.zarr/") for k in keys)
    assert any(k.startswith("runs/kdm/checkpoints/ckpt-") and k.endswith(".pt") for k in keys)
    assert not [k for k in keys if ".tmp" in k or k.endswith(".lock")], keys
