"""The writing half of s3:// (issue 15): generate, import and verify against a real S3 API server (moto's, on
loopback) with real Ray workers uploading their own shards. Each failure path checks the exit code, the one
`error:` line and that nothing was left in the bucket."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from faults import CLI, ENV, bucket_tree, cli, error_line, flip_object_byte, kdm
from infra import moto_server  # noqa: E402

from kdm_pipe import locks, storage
from kdm_pipe.config import GenerateConfig
from kdm_pipe.errors import DataError
from kdm_pipe.integrity import verify
from kdm_pipe.locks import directory_lock
from kdm_pipe.manifest import load_manifest
from kdm_pipe.pairset import PairSetWriter
from kdm_pipe.teachers.edm import DIGITS_CHECKPOINT
from stages import generate

SETTINGS = dict(shards=4, pairs_per_shard=300, batch=128, sampler={"steps": 6}, workers=2)
FLAGS = ["--shards", "4", "--pairs-per-shard", "300", "--batch", "128", "--steps", "6", "--workers", "2", "-q"]
WRITTEN = {"manifest.json", "generate.config.json", "generate.jsonl"}


@pytest.fixture(scope="module")
def ray_s3(s3_server, tmp_path_factory):
    """A private Ray session started after the S3 server (its workers inherit the AWS variables), with its own
    checkpoint cache (XDG_CACHE_HOME) so downloads can be watched; yields the cache directory."""
    cache = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield cache
    ray.shutdown()
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = saved


def run(out, **kw):
    return generate.run(GenerateConfig.model_validate({**SETTINGS, "out": out, **kw}), progress=False)


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).glob("shard-*.tar"))}


def shard_objects(url: str) -> dict[str, str]:
    return {k: v for k, v in bucket_tree(url).items() if k.startswith("shard-")}


@pytest.fixture(scope="module")
def local_ref(ray_s3, tmp_path_factory):
    """The same settings written to local files: the bytes every s3:// run must reproduce."""
    out = tmp_path_factory.mktemp("local") / "pairs"
    run(out)
    return digests(out)


# ---- generate → verify --------------------------------------------------------------------------------------------

def test_generate_to_s3_is_byte_identical_to_local_and_verifies(ray_s3, local_ref, bucket):
    url = f"{bucket}/pairs"
    m = run(url)
    assert len(m.shards) == 4 and len(local_ref) == 4
    assert shard_objects(url) == local_ref
    assert {s.name: s.sha256 for s in m.shards} == local_ref
    assert set(bucket_tree(url)) == WRITTEN | set(local_ref)          # no lock, no temp object, nothing else
    assert len(storage.location(url).joinpath("generate.jsonl").read_text().splitlines()) == 4   # flushed at exit
    r = cli("verify", url)
    assert r.returncode == 0, r.stderr
    assert verify(url) == {}
    assert not list(storage.upload_dir(storage.location(url)).glob("*"))   # local temp files gone


def test_flipped_byte_is_caught_by_verify_and_repaired_by_rerun(ray_s3, local_ref, bucket):
    url = f"{bucket}/pairs"
    run(url)
    assert cli("verify", url).returncode == 0
    flip_object_byte(f"{url}/shard-000001.tar", 1500)
    r = cli("verify", url)
    error_line(r, 1, "1 problem", url, "rerun")
    assert f"BAD {url}/shard-000001.tar: sha256" in r.stderr and "shard-000000" not in r.stderr
    fs, key = storage.location(bucket).fs, f"{url[5:].partition('/')[2]}/shard-000002.tar"
    fs.call_s3("create_multipart_upload", Bucket=bucket[5:], Key=key)  # an upload its killed worker never finished
    uploads = storage.upload_dir(storage.location(url))
    uploads.mkdir(parents=True, exist_ok=True)
    (uploads / ".shard-000002.tar.tmp-0123456789abcdef").write_bytes(b"half a shard")     # and its local file
    run(url)
    assert cli("verify", url).returncode == 0 and shard_objects(url) == local_ref
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket[5:]).get("Uploads") and not list(uploads.glob("*"))


def test_lost_manifest_is_rebuilt_from_the_log_object_and_strays_are_refused(ray_s3, local_ref, bucket):
    url = f"{bucket}/pairs"
    run(url)
    loc = storage.location(url)
    storage.remove(loc / "manifest.json")
    m = run(url)                                 # every shard adopted from generate.jsonl: nothing regenerated
    assert len(m.shards) == 4 and shard_objects(url) == local_ref
    storage.remove(loc / "manifest.json")
    storage.remove(loc / "generate.config.json")
    before = bucket_tree(url)
    error_line(cli("generate", "--out", url, *FLAGS), 2, "holds shard files but no manifest.json")
    error_line(cli("verify", url), 2, f"{url}/manifest.json not found")
    assert bucket_tree(url) == before


# ---- refused before anything is written --------------------------------------------------------------------------

def s3_env(**extra: str) -> dict[str, str]:
    """The CLI's environment now (faults.ENV was taken before the S3 server set the AWS variables)."""
    return {**os.environ, **{k: v for k, v in ENV.items() if not k.startswith("AWS_")}, **extra}


def no_credentials() -> dict[str, str]:
    env = {k: v for k, v in s3_env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                          "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    return {**env, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.mark.parametrize("where, fragments", [
    ("gs://b/pairs", ("gs:// is not supported", "s3://")),
    ("s3://Not_A_Bucket/pairs", ("not an s3:// URL of a bucket",)),
    ("s3://{missing}/pairs", ("bucket", "does not exist", "aws s3 mb")),
])
def test_bad_urls_and_missing_buckets_are_refused(s3_server, bucket, tmp_path, where, fragments):
    where = where.format(missing=f"{bucket[5:]}-missing")
    src = npy_source(tmp_path)
    for args in (("generate", "--out", where, *FLAGS), ("verify", where),
                 ("import", "--format", "npy", "--x-T", src["xT"], "--x-0", src["x0"], "--out", where, "-q")):
        error_line(cli(*args), 2, *fragments)
    assert bucket_tree(bucket) == {}


@pytest.mark.parametrize("case", ["no credentials",
                                  pytest.param("unreachable endpoint", marks=pytest.mark.slow)])  # retries: ~20 s
def test_no_credentials_or_no_store_is_one_clear_error(s3_server, bucket, case):
    env, fragments = ((no_credentials(), ("no credentials", "AWS_ACCESS_KEY_ID")) if case == "no credentials" else
                      (s3_env(AWS_ENDPOINT_URL="http://127.0.0.1:9"), ("cannot reach", "AWS_ENDPOINT_URL")))
    t0 = time.monotonic()
    error_line(kdm("generate", "--out", f"{bucket}/pairs", *FLAGS, env=env, timeout=120), 2, bucket, *fragments)
    assert time.monotonic() - t0 < 60
    assert bucket_tree(bucket) == {}


@pytest.fixture(scope="module")
def guarded_store(s3_server):
    """A second S3 server that checks credentials (moto's IAM: after INITIAL_NO_AUTH_ACTION_COUNT unchecked
    requests, only its users' keys are accepted), holding an empty bucket; yields (endpoint, bucket, good key)."""
    import boto3
    proc, env = moto_server(INITIAL_NO_AUTH_ACTION_COUNT="4")
    url = env["AWS_ENDPOINT_URL"]
    try:
        kw = dict(endpoint_url=url, region_name="us-east-1")
        boto3.client("s3", **kw).create_bucket(Bucket="guarded")                       # the four unchecked
        iam = boto3.client("iam", **kw)                                                 # requests
        iam.create_user(UserName="owner")
        key = iam.create_access_key(UserName="owner")["AccessKey"]
        iam.put_user_policy(UserName="owner", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        yield url, "s3://guarded", (key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_refused_credentials_are_one_clear_error(guarded_store, tmp_path):
    endpoint, url, (key, secret) = guarded_store
    wrong = ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", "key=AKIAWRONG",
             "--storage-option", "secret=wrong"]
    src = npy_source(tmp_path)
    try:
        for args in (("generate", "--out", f"{url}/pairs", *FLAGS), ("verify", f"{url}/pairs"),
                     ("import", "--format", "npy", "--x-T", src["xT"], "--x-0", src["x0"], "--out", f"{url}/pairs",
                      "-q")):
            error_line(cli(*args, *wrong), 2, "access denied", "check the credentials", "guarded")
    finally:
        storage.set_options(None)               # the CLI ran in this process: later locations use the defaults
    import boto3
    owner = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                         aws_secret_access_key=secret)
    assert owner.list_objects_v2(Bucket="guarded")["KeyCount"] == 0                     # nothing written


def test_missing_remote_checkpoint_is_refused(ray_s3, bucket):
    r = cli("generate", "--teacher", "edm", "--checkpoint", f"{bucket}/models/edm.pkl", "--out", f"{bucket}/pairs",
            *FLAGS)
    error_line(r, 2, f"{bucket}/models/edm.pkl", "does not exist")
    fs = storage.location(bucket).fs
    fs.put_file(str(DIGITS_CHECKPOINT), f"{bucket[5:]}/models/t.pt")                 # a .pt without its .json
    r = cli("generate", "--teacher", "edm", "--checkpoint", f"{bucket}/models/t.pt", "--out", f"{bucket}/pairs",
            *FLAGS)
    error_line(r, 2, "t.json", "beside it")
    assert set(bucket_tree(bucket)) == {"models/t.pt"}


def test_import_refuses_a_shard_larger_than_the_local_temp_space(s3_server, bucket, tmp_path):
    """An s3:// --out has no disk to fill, but each shard is finished in the local temp directory first."""
    d, free = 1024, shutil.disk_usage(tempfile.gettempdir()).free
    n = int(free * 1.5 / (8 * d)) + 1             # one shard of n float32 pairs: more than the temp dir holds
    rng = np.random.default_rng(0)
    for name, a in (("xT", 80 * rng.standard_normal((64, d))), ("x0", rng.uniform(-1, 1, (64, d)))):
        with open(tmp_path / f"{name}.npy", "wb") as f:                     # sparse: no disk used
            np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (n, d)})
            f.write(a.tobytes())
            f.truncate(f.tell() + (n - 64) * d * 8)
    r = cli("import", "--format", "npy", "--x-T", tmp_path / "xT.npy", "--x-0", tmp_path / "x0.npy", "--out",
            f"{bucket}/pairs", "--pairs-per-shard", n, "-q")
    error_line(r, 2, "local temp directory", "TMPDIR", "--pairs-per-shard")
    assert bucket_tree(bucket) == {}


def test_generate_refuses_shards_the_local_temp_space_cannot_hold(s3_server, bucket, monkeypatch):
    """The disk check of an s3:// --out is on the temp directory, for the shards in progress here (a nearly full
    disk is simulated: filling the shared machine's disk is not an option)."""
    import collections
    usage = collections.namedtuple("usage", "total used free")
    asked = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: asked.append(str(p)) or usage(10**6, 10**6 - 5000, 5000))
    r = cli("generate", "--out", f"{bucket}/pairs", *FLAGS)
    error_line(r, 2, "2 shard(s) in progress", tempfile.gettempdir(), "TMPDIR")
    assert asked == [tempfile.gettempdir()] and bucket_tree(bucket) == {}


# ---- one writer ---------------------------------------------------------------------------------------------------

def test_second_generate_on_the_same_s3_out_is_refused(s3_server, bucket):
    url = f"{bucket}/pairs"
    with directory_lock(storage.location(url), "generate --out first"):
        before = bucket_tree(url)
        assert set(before) == {locks.LOCK}
        r = cli("generate", "--out", url, *FLAGS)
        error_line(r, 2, "in use by", "generate --out first", f"pid {os.getpid()}", "lease")
        assert bucket_tree(url) == before
    assert bucket_tree(url) == {}                                        # released: the object is gone


def write_lock(url: str, **holder) -> None:
    loc = storage.location(url) / locks.LOCK
    loc.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "command": "generate", "since": "then",
                               **holder}))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_lock_of_a_killed_holder_is_taken_over(s3_server, bucket, monkeypatch):
    url = storage.location(f"{bucket}/pairs")
    here = dict(host=socket.gethostname(), pidns=os.readlink("/proc/self/ns/pid"))
    write_lock(str(url), pid=dead_pid(), **{**here, "pidns": "pid:[1]"})     # another container's pid: no
    with pytest.raises(locks.ConfigError, match="in use by"):
        with directory_lock(url, "generate"):
            pass
    write_lock(str(url), pid=dead_pid(), **here)                        # a SIGKILLed run here: taken over at once
    with directory_lock(url, "generate --out again"):
        assert json.loads((url / locks.LOCK).read_text())["command"] == "generate --out again"
    write_lock(str(url))                                                # a live-looking holder on another host
    monkeypatch.setattr(locks, "LEASE_SECONDS", 2.0)
    with pytest.raises(locks.ConfigError, match="taken over in"):
        with directory_lock(url, "generate"):
            pass
    time.sleep(3.5)                                                     # Last-Modified has 1 s resolution
    with directory_lock(url, "generate --out late"):                    # its lease ran out: taken over
        assert json.loads((url / locks.LOCK).read_text())["command"] == "generate --out late"
    assert not (url / locks.LOCK).exists()


def test_a_writer_that_lost_its_lock_stops_before_committing(s3_server, bucket, monkeypatch):
    monkeypatch.setattr(locks, "RENEW_SECONDS", 0.2)
    w = PairSetWriter(f"{bucket}/pairs", "generate", "generate", all_or_nothing=False)
    with w.writing():
        write_lock(str(w.out), command="generate --out thief")         # another run took it over
        deadline = time.monotonic() + 10
        while not w.lock.lost.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(DataError, match="lost its lock"):
            w.commit(None)
    assert json.loads((w.out / locks.LOCK).read_text())["command"] == "generate --out thief"   # theirs: kept


# ---- import -------------------------------------------------------------------------------------------------------

def npy_source(folder: Path, nan_at: int | None = None) -> dict[str, Path]:
    """2,000 EDM-like pairs as two .npy files (x_T = 80·z, x_0 uniform), optionally one NaN in x_0[nan_at]."""
    rng = np.random.default_rng(0)
    x_T, x_0 = 80 * rng.standard_normal((2000, 64)), rng.uniform(-1, 1, (2000, 64))
    if nan_at is not None:
        x_0[nan_at, 7] = np.nan
    np.save(folder / "xT.npy", x_T)
    np.save(folder / "x0.npy", x_0)
    return {"xT": folder / "xT.npy", "x0": folder / "x0.npy"}


def test_import_to_s3_is_all_or_nothing(s3_server, bucket, tmp_path):
    src = npy_source(tmp_path, nan_at=1500)     # past the orientation check: found while writing shard 3
    url = f"{bucket}/pairs"
    args = ("import", "--format", "npy", "--x-T", src["xT"], "--x-0", src["x0"], "--out", url,
            "--pairs-per-shard", "500", "-q")
    error_line(cli(*args), 2, "non-finite x_0", "pair 1500")
    assert bucket_tree(bucket) == {}                                    # three uploaded shards removed again
    npy_source(tmp_path)
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert set(bucket_tree(url)) == {"manifest.json", "import.config.json", "import.jsonl",
                                     *(f"shard-{k:06d}.tar" for k in range(4))}
    assert cli("verify", url).returncode == 0


# ---- teacher weights from the bucket ------------------------------------------------------------------------------

def test_generate_with_a_checkpoint_in_the_bucket(ray_s3, bucket, tmp_path):
    fs = storage.location(bucket).fs
    for src in (DIGITS_CHECKPOINT, DIGITS_CHECKPOINT.with_suffix(".json")):
        fs.put_file(str(src), f"{bucket[5:]}/models/{src.name}")
    kw = dict(shards=2, pairs_per_shard=64, batch=32, sampler={"steps": 3})
    remote = run(f"{bucket}/pairs", teacher={"name": "edm", "checkpoint": f"{bucket}/models/digits-teacher.pt"}, **kw)
    local = run(tmp_path / "pairs", teacher={"name": "edm", "checkpoint": str(DIGITS_CHECKPOINT)}, **kw)
    assert remote.teacher == local.teacher                              # the same weights (sha256) and network
    assert shard_objects(f"{bucket}/pairs") == digests(tmp_path / "pairs")
    cached = sorted(p.name for p in ray_s3.rglob("digits-teacher*"))
    assert cached == ["digits-teacher.json", "digits-teacher.pt"]       # one download per host, both files


# ---- killed mid-run ----------------------------------------------------------------------------------------------

SLOW = ["--shards", "6", "--pairs-per-shard", "4000", "--batch", "1000", "--steps", "18", "--workers", "1", "-q"]


def shard_worker(endpoint: str) -> int | None:
    """The pid of a Ray worker running make_shard for this test session (its title, and our S3 server in its
    environment: other Ray jobs on this shared machine are left alone)."""
    mine = f"AWS_ENDPOINT_URL={endpoint}".encode()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if (d / "cmdline").read_bytes().startswith(b"ray::make_shard") and \
                    mine in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def slow_ref(tmp_path_factory):
    """The killed runs' settings written locally by a run nobody disturbs: {shard: sha256} and the shard sizes."""
    out = tmp_path_factory.mktemp("slowref") / "pairs"
    r = kdm("generate", "--out", out, *SLOW, timeout=300, env=s3_env())
    assert r.returncode == 0, r.stderr
    return digests(out), {p.stat().st_size for p in out.glob("shard-*.tar")}


@pytest.mark.slow
def test_worker_killed_mid_upload_is_retried_to_identical_bytes(s3_server, bucket, slow_ref, tmp_path):
    ref, sizes = slow_ref
    url = f"{bucket}/pairs"
    uploads = storage.upload_dir(storage.location(url))                # where the worker finishes each shard
    proc = subprocess.Popen(CLI + ["generate", "--out", url, *SLOW], env=s3_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        worker, killed, deadline = None, None, time.time() + 240
        while killed is None:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            worker = worker or shard_worker(s3_server)
            for tmp in uploads.glob(".shard-*.tar.tmp-*") if worker else ():
                try:
                    complete = tmp.stat().st_size in sizes
                except FileNotFoundError:
                    continue                                            # uploaded and removed meanwhile
                if complete:       # the worker is hashing, uploading or reading it back: kill it there
                    os.kill(worker, signal.SIGKILL)
                    killed = tmp.name
                    break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err                                    # Ray ran the task again
    assert shard_objects(url) == ref and set(bucket_tree(url)) == WRITTEN | set(ref)
    assert not list(uploads.glob(".shard-*"))


def generate_until(url: str, shards: int, **popen) -> subprocess.Popen:
    """`generate --out URL` with the slow settings in the background, returned once its manifest lists `shards`."""
    proc = subprocess.Popen(CLI + ["generate", "--out", url, *SLOW], env=s3_env(), **popen)
    manifest, deadline = storage.location(url) / "manifest.json", time.time() + 240
    while not (manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= shards):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_to_identical_bytes(s3_server, bucket, slow_ref):
    ref, _ = slow_ref
    url = f"{bucket}/pairs"
    proc = generate_until(url, 2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)                                 # driver, raylet and workers, mid-shard
    proc.wait()
    assert 2 <= len(load_manifest(url).shards) < 6
    assert locks.LOCK in bucket_tree(url)                               # left behind by the killed driver
    r = kdm("generate", "--out", url, *SLOW, timeout=300, env=s3_env())   # this host, holder dead: taken over at once
    assert r.returncode == 0, r.stderr
    assert shard_objects(url) == ref and set(bucket_tree(url)) == WRITTEN | set(ref)
    assert cli("verify", url).returncode == 0


@pytest.mark.slow
def test_two_node_cluster_uploads_from_both_nodes_with_the_checkpoint_from_the_bucket(s3_server, bucket, tmp_path):
    """`--address` to a cluster of two `ray start` nodes, each with its own cache: every node fetches the teacher
    from the bucket itself and uploads its own shards; the bytes are those of a local run."""
    from infra import LocalCluster
    fs = storage.location(bucket).fs
    for src in (DIGITS_CHECKPOINT, DIGITS_CHECKPOINT.with_suffix(".json")):
        fs.put_file(str(src), f"{bucket[5:]}/models/{src.name}")
    args = ["generate", "--teacher", "edm", "--shards", "4", "--pairs-per-shard", "64", "--batch", "32", "--steps",
            "3", "--workers", "2", "-q"]
    caches = [tmp_path / "node0", tmp_path / "node1"]
    cluster = LocalCluster(object_store_mb=100)
    try:
        for cache in caches:                    # one CPU each: the two tasks in flight run one on each node
            cluster.env["XDG_CACHE_HOME"] = str(cache)
            cluster.add_node(num_cpus=1)
        r = kdm(*args, "--checkpoint", f"{bucket}/models/digits-teacher.pt", "--out", f"{bucket}/pairs",
                "--address", cluster.address, env=s3_env(XDG_CACHE_HOME=str(tmp_path / "driver")), timeout=300)
        assert r.returncode == 0, r.stderr
    finally:
        cluster.stop()
    for cache in [*caches, tmp_path / "driver"]:
        assert sorted(p.name for p in cache.rglob("digits-teacher*")) == ["digits-teacher.json", "digits-teacher.pt"]
    r = kdm(*args, "--checkpoint", DIGITS_CHECKPOINT, "--out", tmp_path / "local", env=s3_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert shard_objects(f"{bucket}/pairs") == digests(tmp_path / "local")


@pytest.mark.slow
def test_sigterm_during_s3_generate_exits_143_releases_the_lock_and_resumes(s3_server, bucket, slow_ref):
    ref, _ = slow_ref
    url = f"{bucket}/pairs"
    proc = generate_until(url, 1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 143, "SIGTERM",
               "rerun the same command")
    left = bucket_tree(url)
    assert locks.LOCK not in left and not list(storage.upload_dir(storage.location(url)).glob("*"))
    listed = load_manifest(url).shards
    assert 1 <= len(listed) < 6 and all(left[s.name] == ref[s.name] for s in listed)   # what it lists is whole
    assert len(storage.location(url).joinpath("generate.jsonl").read_text().splitlines()) >= 1   # flushed on exit
    r = kdm("generate", "--out", url, *SLOW, timeout=300, env=s3_env())
    assert r.returncode == 0, r.stderr
    assert shard_objects(url) == ref
