"""Runs on s3:// against a real S3 API server (moto's, on loopback): train streams shards from the bucket into a run
directory in the bucket, bit for bit what a local run of the same settings writes; resume after a kill reads the
bucket; evaluate, sample and analyze read and write there; refusals leave the bucket as it was."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from faults import CLI, ENV, cli, error_line, kdm

SMALL = {"student": {"hidden": 32, "depth": 2, "latent_dim": 16}, "batch": 128, "log_every": 5, "ckpt_every": 10,
         "loader_workers": 1, "shuffle_buffer": 1024, "probe_pairs": 256, "probe_every": 5}


def aws_env(**kw) -> dict[str, str]:
    """The environment of a CLI subprocess: faults.ENV with the S3 server's variables (set after it was made)."""
    return {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}, **kw}


def fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def objects(url: str) -> dict[str, str]:
    """{key below url: sha256} of every object under url."""
    root = url.removeprefix("s3://").rstrip("/")
    f = fs()
    return {k[len(root) + 1:]: hashlib.sha256(f.cat_file(k)).hexdigest() for k in f.find(root)}


def files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def checkpoints(tree: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tree.items() if k.startswith("checkpoints/ckpt-") and k.endswith(".pt")}


def upload(local: Path, url: str) -> str:
    f = fs()
    for p in Path(local).iterdir():
        if p.is_file() and not p.name.startswith("."):
            f.put_file(str(p), f"{url.removeprefix('s3://')}/{p.name}")
    return url


def train_args(tmp: Path, data, out, steps: int, **kw) -> list:
    """`kdm-pipe train` with SMALL (and `kw`) as a preset file in `tmp`."""
    import yaml
    preset = tmp / f"preset-{len(list(tmp.glob('preset-*')))}.yaml"
    preset.write_text(yaml.safe_dump({"train": {**SMALL, **kw}}))
    return ["train", "--preset", preset, "--data", data, "--out", out, "--steps", steps]


def train(data, out, **kw) -> None:
    from kdm_pipe.config import TrainConfig
    from stages import train as stage
    stage.run(TrainConfig.model_validate({"data": data, "out": out, **SMALL, **kw}), progress=False)


@pytest.fixture
def s3_pairs(bucket, vector_pairs):
    return upload(vector_pairs, f"{bucket}/pairs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, s3_server, vector_pairs):
    """One run of the same settings on s3 (data and run in a bucket) and locally: (s3 run URL, local run)."""
    name = f"kdm-runs-{os.getpid()}"
    fs().mkdir(name)
    data = upload(vector_pairs, f"s3://{name}/pairs")
    local = tmp_path_factory.mktemp("local") / "run"
    train(data, f"s3://{name}/run", steps=20)
    train(vector_pairs, local, steps=20)
    return f"s3://{name}/run", local


@pytest.mark.slow
def test_a_run_on_s3_is_the_local_run_bit_for_bit(trained):
    url, local = trained
    remote, here = objects(url), files(local)
    assert checkpoints(remote) == checkpoints(here) and len(checkpoints(here)) == 2
    for ckpt in checkpoints(remote):                   # every checkpoint has its checksum beside it
        assert fs().cat_file(f"{url[5:]}/{ckpt}.sha256").decode().strip() == remote[ckpt]
    rows = lambda text: [{k: v for k, v in json.loads(ln).items() if not k.endswith("_per_s")}  # noqa: E731
                         for ln in text.splitlines()]
    assert rows(fs().cat_file(f"{url[5:]}/train.jsonl").decode()) == rows((local / "train.jsonl").read_text())
    assert any(k.startswith("tensorboard/") for k in remote) and "latents.zarr/zarr.json" in remote
    assert not any(Path(k).name.startswith(".") for k in remote)      # no temp files, no mirror marker
    config = json.loads(fs().cat_file(f"{url[5:]}/config.json"))
    split = json.loads(fs().cat_file(f"{url[5:]}/split.json"))
    assert config["out"] == url and config["data"] == url.replace("/run", "/pairs")
    assert split["data_from_run"] == "../pairs"


@pytest.mark.slow
def test_evaluate_sample_and_analyze_read_and_write_an_s3_run(trained, tmp_path):
    url, local = trained
    assert cli("evaluate", url, "--num", "400").returncode == 0
    assert cli("evaluate", local, "--num", "400").returncode == 0
    remote = objects(url)
    for name in ("eval.json", "weights.json", "samples.png", "report.html"):
        assert name in remote, name
    ours, theirs = json.loads(fs().cat_file(f"{url[5:]}/eval.json")), json.loads((local / "eval.json").read_text())
    assert ours["student"] == theirs["student"] and ours["weights"] == theirs["weights"]
    assert ours["data"] == url.replace("/run", "/pairs")          # the recorded pairs, found in the bucket

    out = url.replace("/run", "/samples")
    assert cli("sample", url, "--out", out, "--num", "32").returncode == 0
    assert cli("sample", local, "--out", tmp_path / "samples", "--num", "32").returncode == 0
    with fs().open(f"{out[5:]}/samples.npz", "rb") as f:
        got = np.load(f)["x_0"]
    assert np.array_equal(got, np.load(tmp_path / "samples" / "samples.npz")["x_0"])
    assert "samples.json" in objects(out)

    r = cli("analyze", url, "--num", "200")
    assert r.returncode == 0, r.stderr
    assert "analysis/analysis.json" in objects(url)


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_bucket(s3_pairs, bucket, tmp_path):
    """SIGKILL a training process once checkpoints reach the bucket, damage the newest one there, resume with
    --resume in a new process: it passes over the damaged checkpoint (setting it aside), resumes from the one
    before, and ends with the checkpoint an uninterrupted local run writes."""
    run = f"{bucket}/run"
    proc = subprocess.Popen(CLI + [str(a) for a in train_args(tmp_path, s3_pairs, run, steps=100000, ckpt_every=5)],
                            env=aws_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(fs().glob(f"{run[5:]}/checkpoints/ckpt-*.pt")) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoints reached the bucket"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    have = sorted(k.split("/run/")[1] for k in fs().glob(f"{run[5:]}/checkpoints/ckpt-*.pt"))
    newest = have[-1]
    fs().pipe_file(f"{run[5:]}/{newest}", b"not a checkpoint")
    step = int(Path(have[-2]).stem.split("-")[1]) + 5
    r = kdm(*train_args(tmp_path, s3_pairs, run, steps=step, ckpt_every=5), "--resume", env=aws_env())
    assert r.returncode == 0, r.stderr
    assert "damaged" in r.stderr
    local = tmp_path / "full"
    train(s3_pairs, local, steps=step, ckpt_every=5)
    # torch.save lays a resumed run's storages out in another order: the states are compared, not the bytes.
    with fs().open(f"{run[5:]}/checkpoints/ckpt-{step:08d}.pt", "rb") as f:
        ours = torch.load(io.BytesIO(f.read()), weights_only=True)
    theirs = torch.load(local / "checkpoints" / f"ckpt-{step:08d}.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(ours[part][k], theirs[part][k]) for k in theirs[part]), part
    assert f"{newest}.damaged" in objects(run)


def test_refusals_write_nothing(s3_pairs, bucket, tmp_path):
    from kdm_pipe import storage
    from kdm_pipe.integrity import check_shards
    from kdm_pipe.manifest import load_manifest
    pairs = storage.location(s3_pairs)
    check_shards(pairs, load_manifest(pairs))          # the pair set's checksum cache, which any reader may write
    before = objects(bucket)
    error_line(cli(*train_args(tmp_path, s3_pairs, "s3://kdm-no-such-bucket-4711/run", steps=5)), 2, "does not exist")
    error_line(cli(*train_args(tmp_path, "s3://kdm-no-such-bucket-4711/pairs", f"{bucket}/run", steps=5)), 2, "--data",
               "does not exist")
    error_line(cli(*train_args(tmp_path, s3_pairs, f"{bucket}/run", steps=5), "--resume"), 2, "holds no run")
    error_line(cli("evaluate", f"{bucket}/nothing"), 2, "not a training run")
    error_line(cli("sample", f"{bucket}/nothing", "--out", f"{bucket}/samples"), 2, "not a training run")
    error_line(cli("analyze", f"{bucket}/nothing"), 2, "not a training run")
    assert objects(bucket) == before
    env = {k: v for k, v in aws_env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    error_line(kdm(*train_args(tmp_path, s3_pairs, f"{bucket}/run", steps=5), env=env, timeout=60), 2, "credentials")
    error_line(kdm("evaluate", f"{bucket}/run", env=env, timeout=60), 2, "credentials")
    assert objects(bucket) == before


def test_a_corrupt_shard_object_stops_training_naming_it(s3_pairs, bucket, vector_pairs, tmp_path):
    """A shard whose bytes changed in the bucket and whose manifest entry was made to agree: only reading it can
    find the damage. The loader worker's error ends the run within seconds (exit 1, the shard named), and a run
    that failed before its first checkpoint leaves nothing in the bucket."""
    from kdm_pipe.manifest import Manifest
    bad = tmp_path / "shard-000001.tar"
    data = bytearray((vector_pairs / "shard-000001.tar").read_bytes())
    data[600] ^= 0xFF                                  # inside the first member's .npy header
    bad.write_bytes(bytes(data))
    manifest = Manifest.model_validate_json((vector_pairs / "manifest.json").read_text())
    for s in manifest.shards:
        if s.name == bad.name:
            s.sha256 = hashlib.sha256(bytes(data)).hexdigest()
    f = fs()
    f.put_file(str(bad), f"{s3_pairs[5:]}/{bad.name}")
    f.pipe_file(f"{s3_pairs[5:]}/manifest.json", manifest.model_dump_json(indent=1).encode())
    t = time.monotonic()
    r = kdm(*train_args(tmp_path, s3_pairs, f"{bucket}/run", steps=400, ckpt_every=1000, loader_workers=2), timeout=120,
            env=aws_env())
    error_line(r, 1, "shard-000001.tar")
    assert time.monotonic() - t < 60
    assert not any(k.startswith("run/") for k in objects(bucket))


@pytest.mark.slow
def test_stats_on_an_s3_pair_set_and_its_readers(s3_pairs, bucket, vector_pairs, tmp_path):
    """`stats s3://…` writes stats.zarr into the bucket (root metadata last: no temp objects, no mirror marker), its
    moments are the pairs' own, and `train --normalize standard` reads them there; before it exists, train refuses."""
    from kdm_pipe.manifest import load_manifest
    from kdm_pipe.shards import read_pairs
    from kdm_pipe.stats import load_stats
    error_line(cli(*train_args(tmp_path, s3_pairs, f"{bucket}/run", steps=2), "--normalize", "standard"), 2,
               "stats.zarr is missing or stale", "kdm-pipe stats")
    r = cli("stats", s3_pairs, "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    keys = objects(s3_pairs)
    assert "stats.zarr/zarr.json" in keys and not any(Path(k).name.startswith(".") for k in keys if "stats" in k)
    merged = load_stats(s3_pairs)
    names = [s.name for s in load_manifest(vector_pairs).shards]
    x_0 = read_pairs(vector_pairs, names, 10**6)["x_0"]
    assert merged["x_0"]["count"] == len(x_0)
    np.testing.assert_allclose(merged["x_0"]["mean"], x_0.astype(np.float64).mean(0), rtol=1e-10)
    r = cli(*train_args(tmp_path, s3_pairs, f"{bucket}/run", steps=2), "--normalize", "standard")
    assert r.returncode == 0, r.stderr


def test_stats_refuses_a_changed_shard_object_and_writes_nothing(s3_pairs, bucket):
    f = fs()
    key = f"{s3_pairs[5:]}/shard-000002.tar"
    data = bytearray(f.cat_file(key))
    data[-2000] ^= 0xFF
    f.pipe_file(key, bytes(data))
    error_line(cli("stats", s3_pairs, "--workers", "1", "--quiet"), 1, "shard-000002.tar", "sha256")
    assert not any(k.startswith("stats.zarr") for k in objects(s3_pairs))


def test_filter_refuses_an_s3_pair_set(s3_pairs):
    before = objects(s3_pairs)
    error_line(cli("filter", s3_pairs, "--ref", "sklearn-digits"), 2, "not filtered yet")
    assert objects(s3_pairs) == before


def test_an_unwritable_cache_is_refused_before_anything_is_written(s3_pairs, bucket, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("KDM_PIPE_CACHE", str(tmp_path / "file"))
    before = objects(bucket)
    error_line(cli(*train_args(tmp_path, s3_pairs, f"{bucket}/run", steps=5)), 2, "KDM_PIPE_CACHE")
    assert objects(bucket) == before


@pytest.mark.slow
def test_the_store_going_away_mid_run_ends_training_within_seconds(vector_pairs, tmp_path):
    """Pairs local, the run in a bucket of a second S3 server that is killed once the first checkpoint is there:
    the next upload fails, and the run ends with exit 1 and one line naming the object, not a hang."""
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = aws_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        other = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=f"http://127.0.0.1:{port}")
        other.mkdir("kdm-gone")
        proc = subprocess.Popen(CLI + [str(a) for a in train_args(tmp_path, vector_pairs, "s3://kdm-gone/run",
                                                                  steps=100000, ckpt_every=20)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not other.glob("kdm-gone/run/checkpoints/ckpt-*.pt"):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.2)
    finally:
        server.kill()
        server.wait()
    t = time.monotonic()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    error_line(r, 1, "s3://kdm-gone/run", "cannot reach")
    assert time.monotonic() - t < 90


@pytest.mark.slow
def test_sigterm_checkpoints_into_the_bucket_and_exits_143(s3_pairs, bucket, tmp_path):
    """Preemption of a run in a bucket: the step ends, its checkpoint (with checksum) and the logs up to it are
    uploaded, exit 143; `--resume` then continues from that step."""
    import re
    run = f"{bucket}/run"
    proc = subprocess.Popen(CLI + [str(a) for a in train_args(tmp_path, s3_pairs, run, steps=100000, ckpt_every=50)],
                            env=aws_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not fs().glob(f"{run[5:]}/checkpoints/ckpt-*.pt"):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", out)[1])
    have = objects(run)
    last = f"checkpoints/ckpt-{step:08d}.pt"
    assert max(checkpoints(have)) == last
    assert fs().cat_file(f"{run[5:]}/{last}.sha256").decode().strip() == have[last]
    rows = [json.loads(ln) for ln in fs().cat_file(f"{run[5:]}/train.jsonl").decode().splitlines()]
    assert rows and rows[-1]["step"] <= step
    r = kdm(*train_args(tmp_path, s3_pairs, run, steps=step + 5, ckpt_every=50), "--resume", env=aws_env())
    assert r.returncode == 0, r.stderr
    assert f"checkpoints/ckpt-{step + 5:08d}.pt" in objects(run)


@pytest.mark.slow
def test_image_feature_statistics_in_the_bucket_are_the_local_ones(digit_pairs, bucket, tmp_path):
    """`stats` of an image set on s3 (moments and pixel-feature statistics, which evaluate's set Fréchet distance
    reads) equals `stats` of the same shards on local files, read back from the bucket."""
    import shutil

    from kdm_pipe.feature_stats import set_reference
    from kdm_pipe.manifest import load_manifest
    from kdm_pipe.stats import load_stats
    local = tmp_path / "digits"
    shutil.copytree(digit_pairs, local)
    url = upload(local, f"{bucket}/digits")
    for where in (local, url):
        r = cli("stats", where, "--workers", "1", "--quiet")
        assert r.returncode == 0, r.stderr
    manifest = load_manifest(local)
    ours, theirs = set_reference(url, manifest, "pixels"), set_reference(local, manifest, "pixels")
    assert ours is not None and ours.num == theirs.num == manifest.num_pairs
    assert np.array_equal(ours.mu, theirs.mu) and np.array_equal(ours.sigma, theirs.sigma)
    a, b = load_stats(url), load_stats(local)
    assert all(np.array_equal(a[f][k], b[f][k]) for f in b for k in b[f])


def test_a_second_writer_of_an_s3_run_is_refused_naming_the_holder(s3_pairs, bucket, tmp_path):
    """The run's lease (kdm_pipe.locks, as pair sets use it) is held by a `train` writing the run."""
    from kdm_pipe import storage
    from kdm_pipe.locks import directory_lock
    run = f"{bucket}/run"
    with directory_lock(storage.location(run), f"train --out {run}"):
        r = cli(*train_args(tmp_path, s3_pairs, run, steps=5))
        error_line(r, 2, run, "in use by", f"train --out {run}", f"pid {os.getpid()}")
        assert list(objects(run)) == [".kdm-pipe.lock"]              # nothing written beside the lock
    assert objects(run) == {}
    r = cli(*train_args(tmp_path, s3_pairs, run, steps=5))       # released: the run can be written
    assert r.returncode == 0, r.stderr
    assert ".kdm-pipe.lock" not in objects(run)
