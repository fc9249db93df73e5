"""Helpers of the fault-injection suites (tests/test_faults_*.py): run the real CLI in a subprocess with a
timeout (a hang fails the test instead of stalling CI), check the one-line error, and compare directory trees to
show that nothing was lost or left behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "kdm_pipe.cli"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def kdm(*args, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    """`kdm-pipe ARGS` in a fresh process; raises TimeoutExpired (the test fails) if it does not end in time."""
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=kw.pop("env", ENV), **kw)


def cli(*args) -> subprocess.CompletedProcess:
    """`kdm-pipe ARGS` inside this process (no interpreter start-up: ~10× faster than `kdm`); use `kdm` where a
    hang or a signal is what is tested."""
    from typer.testing import CliRunner

    from kdm_pipe.cli import app
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def error_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Assert exit `code` and a single `error: …` line on stderr containing every fragment; return the line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\nstderr:\n{proc.stderr}"
    assert len(errors) == 1, f"expected one 'error:' line, got:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f.lower() in errors[0].lower(), f"{f!r} not in {errors[0]!r}"
    return errors[0]


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (hidden ones included), for before/after comparisons."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place and put the mtime back (as a careless copy tool would): only ctime tells."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def bless(directory: Path) -> None:
    """Make the manifest agree with whatever is on disk: only reading a shard can then find its damage."""
    from kdm_pipe import storage
    from kdm_pipe.manifest import load_manifest, save_manifest
    m = load_manifest(directory)
    for s in m.shards:
        s.bytes, s.sha256 = (directory / s.name).stat().st_size, storage.sha256(directory / s.name)
    save_manifest(directory, m)


def bucket_tree(url: str) -> dict[str, str]:
    """{key under url: sha256} of every object under an s3:// url (hidden ones included): the bucket's `tree`."""
    from kdm_pipe import storage
    loc = storage.location(url)
    prefix = loc.path.rstrip("/") + "/"
    return {key[len(prefix):]: hashlib.sha256(loc.fs.cat_file(key)).hexdigest()
            for key in loc.fs.find(loc.path, refresh=True)}


def flip_object_byte(url: str, offset: int) -> None:
    """Change one byte of an object (the same size: only its sha256 or ETag tell)."""
    from kdm_pipe import storage
    loc = storage.location(url)
    data = bytearray(loc.fs.cat_file(loc.path))
    data[offset] ^= 0xFF
    loc.fs.pipe_file(loc.path, bytes(data))


def small_disk(mount: Path, options: str, *command) -> subprocess.CompletedProcess:
    """`command` with a fresh tmpfs (mount options `options`, e.g. size=1m) at `mount`, in a private mount namespace;
    afterwards, in the same namespace, prints what is left under `mount` (the tmpfs goes with the namespace)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs user and mount namespaces (unshare -rm) for a small disk")
    mount.mkdir(parents=True, exist_ok=True)
    script = ('mount -t tmpfs -o "$2" tmpfs "$1" || exit 99; m="$1"; shift 2; "$@"; rc=$?; '
              'echo "LEFT:$(cd "$m" && find . -mindepth 1 | sort | tr "\\n" " ")"; exit $rc')
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mount), options, *map(str, command)],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 99, r.stderr
    return r


def left(r: subprocess.CompletedProcess) -> list[str]:
    return r.stdout.rsplit("LEFT:", 1)[1].split()
