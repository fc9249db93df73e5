"""kdm_pipe.storage against a real S3 API (moto's server on loopback): what a URL becomes, how a finished file
becomes visible, and the one-line refusals for buckets and credentials that will not do."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import s3fs

from kdm_pipe import shards, storage
from kdm_pipe.errors import ConfigError, DataError


def fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_local_paths_stay_paths_and_s3_urls_become_remote(tmp_path):
    assert storage.location(tmp_path) == tmp_path and not storage.is_remote(storage.location(tmp_path))
    for typed in ["s3://bucket/pairs/a", "s3:/bucket/pairs/a", "s3://bucket/pairs/a/"]:   # typer folds s3:// to s3:/
        loc = storage.location(typed)
        assert storage.is_remote(loc) and str(loc) == "s3://bucket/pairs/a" and storage.bucket(loc) == "bucket"
        assert str(loc / "manifest.json") == "s3://bucket/pairs/a/manifest.json"
    for bad, says in [("gs://b/x", "gs:// is not supported"), ("s3://", "not an s3:// URL of a bucket"),
                      ("s3://UPPER/x", "not an s3:// URL of a bucket")]:
        with pytest.raises(ValueError, match=says):
            storage.location(bad)


def test_storage_options_reach_the_location_and_survive_pickling():
    import pickle
    try:
        storage.set_options(["anon=false", "client_kwargs={\"region_name\": \"eu-west-1\"}"])
        loc = pickle.loads(pickle.dumps(storage.location("s3://bucket/x")))
        assert loc.storage_options["anon"] is False
        assert loc.storage_options["client_kwargs"] == {"region_name": "eu-west-1"}
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            storage.set_options(["novalue"])
    finally:
        storage.set_options([])


def test_a_shard_commits_as_one_object_and_streams_back(bucket, tmp_path):
    recs = [{"x_T": np.full((5, 3), i, np.float32), "x_0": np.zeros((5, 3), np.float32),
             "seed": np.arange(5 * i, 5 * i + 5)} for i in range(3)]
    remote, local = storage.location(bucket) / "pairs" / "shard-000000.tar", tmp_path / "shard-000000.tar"
    assert shards.write_shard(remote, recs) == shards.write_shard(local, recs)      # same bytes, same digest
    assert fs().cat(remote.path) == local.read_bytes()
    assert [r["seed"].tolist() for r in shards.read_shard(remote)] == [r["seed"].tolist() for r in recs]
    assert fs().ls(f"{storage.bucket(remote)}/pairs") == [remote.path]                # no temp object left
    assert not list(tmp_path.glob(".*tmp*"))


def test_an_upload_that_does_not_match_is_removed(bucket, tmp_path):
    tmp, dest = tmp_path / "part", storage.location(bucket) / "x.bin"
    tmp.write_bytes(b"abc")
    with pytest.raises(DataError, match="bytes arrived.*removed"):
        storage.commit_file(tmp, dest, size=4)
    assert not fs().exists(dest.path) and not tmp.exists()
    tmp.write_bytes(b"abc")
    with pytest.raises(DataError, match="sha256 differs"):
        storage.commit_file(tmp, dest, size=3, digest="0" * 64)
    assert not fs().exists(dest.path)


def test_a_changed_object_changes_its_stamp(bucket):
    loc = storage.location(bucket) / "m.json"
    storage.write_text(loc, "one")
    first = storage.stamp(loc)
    storage.write_text(loc, "two")                                  # same size, other bytes
    assert storage.stamp(loc) != first and storage.stamp(loc)[0] == 3
    assert storage.stamp(storage.location(bucket) / "nothing") is None


def test_missing_bucket_is_refused_naming_the_fix(s3_server):
    with pytest.raises(ConfigError, match="bucket no-such-bucket does not exist; create it"):
        storage.check_bucket(storage.location("s3://no-such-bucket/pairs"), "--out")


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdm_pipe.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_verify_without_credentials_or_endpoint_says_which(bucket, tmp_path):
    """One `error:` line, exit 2, for no credentials at all and for an endpoint nobody answers on."""
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_creds = {**bare, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    r = run_cli(["verify", f"{bucket}/pairs"], no_creds)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "no credentials found" in r.stderr, r.stderr
    unreachable = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    r = run_cli(["verify", f"{bucket}/pairs"], unreachable)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "cannot reach the object store" in r.stderr, \
        r.stderr
    assert "Traceback" not in r.stderr
