"""A local working copy of a directory on an object store: how stages write run directories (and `sample --out`)
on s3://.

torch.save, zarr's LocalStore, TensorBoard's writer, matplotlib and the HTML report all write local files, and an
object store has no rename and no append. So a stage works in a mirror — a fresh directory under the cache
($KDM_PIPE_CACHE, else ~/.cache/kdm-pipe) that holds the remote URL in a marker file — pulls what it reads, and
pushes each finished file with `storage.commit_file`: one upload per file, checked by size (and sha256 where asked),
so an object under its final name is always whole. `push_changed` sends only files that changed since they were
pulled or pushed, array chunks before zarr metadata and marker files (`LAST`) last, so a reader of the bucket never
finds metadata that points at chunks not yet there.

The mirror lives as long as the process that made it (removed at exit; one left by a killed process is removed by the
next one that starts in the cache); nothing is ever read from an old mirror, so a stale copy cannot mask the bucket.
"""

from __future__ import annotations

import atexit
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError

MARKER = ".kdm-pipe-remote"                    # in a mirror's root: the URL it mirrors (never storage options)
# Written last: what tells a reader that the files beside it are complete (zarr metadata, sample's index).
LAST = ("zarr.json", ".zattrs", ".zgroup", ".zarray", "samples.json")
_mirrors: dict[str, "Mirror"] = {}             # this process's mirrors, by URL and by local path


def cache_root() -> Path:
    return Path(os.environ.get("KDM_PIPE_CACHE") or Path.home() / ".cache" / "kdm-pipe") / "mirrors"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_orphans(root: Path) -> None:
    """Mirrors of processes that died without cleaning up (SIGKILL, a lost node)."""
    for d in root.glob("*-p*-*"):
        m = re.search(r"-p(\d+)-[0-9a-f]+$", d.name)
        if m and not _alive(int(m[1])):
            shutil.rmtree(d, ignore_errors=True)


class Mirror:
    """The local copy `local` of remote directory `remote` (a UPath)."""

    def __init__(self, remote: Any, local: Path, owned: bool) -> None:
        self.remote, self.local, self.owned = remote, local, owned
        self.sent: dict[str, tuple[int, int]] = {}     # relative path → (size, mtime_ns) the bucket has a copy of

    @classmethod
    def create(cls, remote: Any) -> "Mirror":
        root = cache_root()
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_orphans(root)
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", remote.path)[-80:]
            local = root / f"{slug}-p{os.getpid()}-{uuid.uuid4().hex[:8]}"
            local.mkdir()
            (local / MARKER).write_text(str(remote))
        except OSError as e:
            raise ConfigError(f"{remote}: cannot make its local working copy under {root} ({e.strerror or e}); set "
                              f"KDM_PIPE_CACHE to a writable directory") from None
        m = cls(remote, local, owned=True)
        atexit.register(m.close, os.getpid())
        return m

    def rel(self, local: Path) -> str:
        return Path(local).relative_to(self.local).as_posix()

    def url(self, rel: str) -> Any:
        return self.remote / rel

    def _stamp(self, rel: str) -> tuple[int, int]:
        st = (self.local / rel).stat()
        return st.st_size, st.st_mtime_ns

    # ---- pulling ---------------------------------------------------------------------------------------------

    def pull(self, rel: str, what: str = "reading") -> bool:
        """Download file or directory `rel` (every object under it) unless the mirror has it; whether it exists."""
        dest = self.local / rel
        if dest.exists():
            return True
        src = self.url(rel)
        with storage.remote_errors(src, what, ConfigError):
            fs, key = src.fs, src.path
            if fs.isfile(key):
                keys = [key]
            else:
                keys = [k for k in fs.find(key) if not k.endswith("/")]
            for k in keys:
                sub = posixpath.relpath(k, self.remote.path)
                target = self.local / sub
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.pull-{uuid.uuid4().hex}")
                try:
                    fs.get_file(k, str(tmp))
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
                self.sent[sub] = self._stamp(sub)
        return bool(keys)

    def listing(self, rel: str, pattern: str) -> list[str]:
        """Names of the remote objects in directory `rel` matching glob `pattern`, sorted."""
        src = self.url(rel)
        with storage.remote_errors(src, "listing", ConfigError):
            return sorted(posixpath.basename(k) for k in src.fs.glob(f"{src.path}/{pattern}"))

    # ---- pushing ---------------------------------------------------------------------------------------------

    def push(self, rel: str, digest: str | None = None) -> None:
        """Upload file `rel` as one object (size checked; sha256 too when `digest` is given)."""
        src = self.local / rel
        link = src.with_name(f".{src.name}.push-{uuid.uuid4().hex}")
        os.link(src, link)                              # commit_file consumes its file; the mirror keeps its own
        size = src.stat().st_size
        storage.commit_file(link, self.url(rel), size, digest)
        self.sent[rel] = self._stamp(rel)

    def push_changed(self, skip: Callable[[str], bool] = lambda rel: False) -> list[str]:
        """Upload every file that changed since it was pulled or pushed (dot-files and `skip` aside): data first,
        then `LAST` files deepest first, so metadata never points at what is not there yet."""
        changed = []
        for dirpath, dirs, files in os.walk(self.local):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                rel = self.rel(Path(dirpath) / name)
                if not name.startswith(".") and not skip(rel) and self.sent.get(rel) != self._stamp(rel):
                    changed.append(rel)
        changed.sort(key=lambda r: (posixpath.basename(r) in LAST, -r.count("/"), r))
        for rel in changed:
            self.push(rel)
        return changed

    def rename(self, rel: str, new: str) -> None:
        """Move `rel` to `new`, here and in the bucket (a copy then a delete: S3 has no rename)."""
        src = self.url(rel)
        with storage.remote_errors(src, "renaming"):
            src.fs.mv(src.path, self.url(new).path)
        if (self.local / rel).exists():
            os.replace(self.local / rel, self.local / new)
        self.sent.pop(rel, None)

    def remote_files(self, rel: str) -> set[str]:
        """Relative paths of every object under `rel` in the bucket."""
        src = self.url(rel)
        with storage.remote_errors(src, "listing"):
            return {posixpath.relpath(k, self.remote.path) for k in src.fs.find(src.path)}

    def forget(self, rel: str) -> None:
        """Delete `rel` from the bucket only (the next `push_changed` uploads it again if the mirror has it)."""
        storage.remove(self.url(rel))
        self.sent.pop(rel, None)

    def remove(self, rel: str) -> None:
        self.forget(rel)
        (self.local / rel).unlink(missing_ok=True)

    def close(self, pid: int | None = None) -> None:
        if self.owned and os.getpid() == (pid or os.getpid()):   # not from a forked child (a loader worker)
            shutil.rmtree(self.local, ignore_errors=True)
            _mirrors.pop(str(self.remote), None)
            _mirrors.pop(str(self.local), None)


def of(remote: Any) -> Mirror:
    """This process's mirror of `remote` (made on first use)."""
    m = _mirrors.get(str(remote))
    if m is None or not m.local.is_dir():
        m = Mirror.create(remote)
        _mirrors[str(remote)] = _mirrors[str(m.local)] = m
    return m


def at(local: Path) -> Mirror | None:
    """The mirror whose local copy is `local` (this process's, or one whose marker names its URL), else None."""
    m = _mirrors.get(str(local))
    if m is not None:
        return m
    marker = Path(local) / MARKER
    if not marker.is_file():
        return None
    m = Mirror(storage.location(marker.read_text().strip()), Path(local), owned=False)
    _mirrors[str(local)] = m
    return m
