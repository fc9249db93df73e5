"""One writer per directory: generate, import and stats hold an exclusive lock on their output directory, train
on its run directory.

Local: an advisory `flock` on DIR/.kdm-pipe.lock, released by the kernel when its holder exits (even on SIGKILL),
so a crashed run never blocks the next one. The file names its holder (pid, host, command) for the refusal message
and is removed on release; a run that finds the file it locked was replaced meanwhile locks again.

Remote (s3://): object stores have no flock and nothing is released when a process dies, so the lock is a lease.
The object DIR/.kdm-pipe.lock is created with a conditional PUT (If-None-Match: *: of two runs exactly one
succeeds) and renewed every RENEW_SECONDS by a PUT conditional on its own last ETag (If-Match). A lock not renewed
for LEASE_SECONDS, by the store's own clock (its Date header against the object's Last-Modified: no skew between
machines), belongs to a dead or cut-off run and is taken over with a PUT conditional on the stale ETag (of two
runs taking it over one succeeds). A holder on this same host and pid namespace whose pid is gone (a SIGKILLed
driver, rerun in the same place) is taken over at once. A holder whose renewal finds another ETag has lost the
lock: `Lock.lost` is set and its writer stops before its next commit.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Iterator

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError, DataError

LOCK = ".kdm-pipe.lock"
LEASE_SECONDS = 60.0        # a remote lock unrenewed this long is taken over (a killed run on another host)
RENEW_SECONDS = 15.0        # four renewals per lease: one slow request does not lose the lock


class Lock:
    """A held lock; `lost` is set if a remote lease was taken over by another run (local locks are never lost)."""

    def __init__(self) -> None:
        self.lost = threading.Event()

    def check(self, directory: Any) -> None:
        if self.lost.is_set():
            raise DataError(f"{directory}: lost its lock to another run (this one stopped renewing it for "
                            f"{LEASE_SECONDS:.0f} s); stopped before writing more; rerun once that run has ended")


def _pid_namespace() -> str:
    # Containers may share a host name (host networking) but not their pids: a pid means something only within
    # its namespace.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _holder_json(command: str) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "pidns": _pid_namespace(),
                       "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")})


@contextmanager
def directory_lock(directory: Any, command: str) -> Iterator[Lock]:
    """Hold DIR's lock for the body; a second holder gets a ConfigError naming the first. A local DIR must exist."""
    if storage.is_remote(directory):
        with _lease(directory, command) as lock:
            yield lock
        return
    path = Path(directory) / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path.read_text(errors="replace") if path.exists() else "")
            os.close(fd)
            raise ConfigError(f"{directory} is in use by {holder}; wait for it to finish or stop it, then rerun "
                              f"(the lock is released when that process exits)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                    # the previous holder removed the file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _holder_json(command).encode())
        yield Lock()
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"`kdm-pipe {h['command']}` (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another kdm-pipe process"


# ---- remote: a lease ---------------------------------------------------------------------------------------------

def _dead_here(text: str) -> bool:
    """The holder ran on this host, in this pid namespace, and its process is gone."""
    try:
        h = json.loads(text)
        if h["host"] != socket.gethostname() or h.get("pidns") != _pid_namespace():
            return False
        os.kill(int(h["pid"]), 0)
        return False
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        return False


@contextmanager
def _lease(directory: Any, command: str) -> Iterator[Lock]:
    loc = directory / LOCK
    fs, bucket, key = loc.fs, storage.bucket(loc), loc.path.partition("/")[2]
    body = _holder_json(command).encode()
    with storage.remote_errors(directory, "locking", ConfigError):
        etag = _acquire(fs, bucket, key, body, directory)
    lock, stop = Lock(), threading.Event()

    def renew() -> None:
        nonlocal etag
        while not stop.wait(RENEW_SECONDS):
            try:
                etag = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]
            except Exception as e:  # noqa: BLE001  (botocore's connection errors are no OSError)
                if isinstance(e, OSError) and _taken(e):   # taken over (or removed by hand): no longer ours
                    lock.lost.set()
                    return
                # a transient failure of the store: try again at the next renewal, the lease has room for it

    renewer = threading.Thread(target=renew, name="kdm-pipe-lock-renewal", daemon=True)
    renewer.start()
    try:
        yield lock
    finally:
        stop.set()
        renewer.join()
        if not lock.lost.is_set():
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            except Exception:  # noqa: BLE001  (unreachable store or taken over: the lease runs out by itself;
                pass           # the failure that ended the run, if any, is the one to report)


def _taken(e: OSError) -> bool:
    """A conditional request refused because the lock object is no longer the one we knew (s3fs maps S3's 412
    PreconditionFailed to a plain OSError, a vanished object to FileNotFoundError)."""
    return isinstance(e, FileNotFoundError) or "pre-condition" in str(e).lower()


def _acquire(fs: Any, bucket: str, key: str, body: bytes, directory: Any) -> str:
    try:
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
    except FileExistsError:
        pass
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        text = fs.cat_file(f"{bucket}/{key}").decode(errors="replace")
    except FileNotFoundError:           # released between our PUT and HEAD: try once more, as a new lock
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
    now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
    age = (now - head["LastModified"]).total_seconds()
    if age <= LEASE_SECONDS and not _dead_here(text):
        raise ConfigError(f"{directory} is in use by {_holder(text)}; wait for it to finish or stop it, then rerun "
                          f"(its lock is a lease renewed every {RENEW_SECONDS:.0f} s: if that process is dead, it "
                          f"can be taken over in {max(1, round(LEASE_SECONDS - age))} s)")
    try:
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=head["ETag"])["ETag"]
    except OSError as e:
        if not _taken(e):
            raise
        raise ConfigError(f"{directory} is in use by another run that took over its stale lock just now; wait "
                          f"for it to finish or stop it, then rerun") from None
