"""A pair directory being written: the one writer behind `generate` and `import`.

`PairSetWriter` owns what both do to DIR — refuse a file for DIR, create DIR, hold its lock (locks.directory_lock),
open or create `manifest.json` and compare it with this run's identity, reconcile it with the shard files there
(reconcile, below), commit each finished shard (append its ShardInfo, rewrite the manifest atomically, append a log
line to `STAGE.jsonl`), record the resolved config (`STAGE.config.json`), clean up on the way out, and turn
SIGTERM / SIGINT into exit 143 / 130 with one `error:` line (kdm_pipe.interrupts). The stages bring what differs:
how shards are made (Ray workers running the teacher; records read from a source) and how an existing directory is
recognised as theirs.

Two policies, on purpose:

- resumable (`generate`): a pair depends only on (teacher, sampler, seed), and shards are expensive to make. Every
  committed shard stays whatever happens afterwards; a failure or a signal keeps them, and the same command
  finishes the set (reconcile drops what is missing or corrupt and the rest is generated).
- all or nothing (`import`): the pairs come from a source that may turn out bad deep inside (NaN at pair 1.5M,
  a crafted file) and is fixed by its owner, not by rerunning. A half import of a bad source is worse than none,
  so a failed run removes the shards it wrote and temp files, restores the manifest and logs it found, and removes
  DIR itself (and parents) if it created them; the fixed source then simply imports again. Only SIGKILL leaves a
  partial import, which the same command completes, since the manifest lists only complete shards.

In both, the manifest lists a shard only after its file is complete (renamed into place), so a reader never meets
a listed half shard, and a lock refused to a second run removes nothing (its holder may use what is there).

DIR may be an s3:// URL (kdm_pipe.storage): its bucket is checked before anything else (a missing bucket or refused
credentials are invalid input: exit 2, nothing written); there are no directories to create or remove, the lock is
a lease (kdm_pipe.locks), a shard becomes visible by one upload checked for size and sha256, and since objects
cannot be appended to, the log is rewritten whole — at most every LOG_FLUSH_SECONDS and when the run ends, as the
manifest, not the log, is what a rerun trusts.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError
from kdm_pipe.integrity import VERIFIED, check_shard
from kdm_pipe.interrupts import Terminated, stop_on_signals
from kdm_pipe.locks import LOCK, Lock, directory_lock
from kdm_pipe.manifest import MANIFEST, Manifest, ShardInfo, load_manifest, save_manifest, shard_name

STAGE_FILE = re.compile(r"(generate|import)\.(config\.json|jsonl)|manifest\.json\..+|stats\.zarr"
                        r"|filter(\.npz|\.html|-.+\.png)")
TEMP_FILE = re.compile(r"\..+\.tmp-[0-9a-f]+")          # storage.temp_beside's names


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


LOG_FLUSH_SECONDS = 10.0        # remote logs: rewritten at most this often (each rewrite uploads the whole log)


def free_bytes(path: Path) -> int:
    """Free disk space where `path` is (or will be created); for a remote `path`, where its files are finished
    before their upload (the local temp directory)."""
    if storage.is_remote(path):
        return shutil.disk_usage(tempfile.gettempdir()).free
    return shutil.disk_usage(existing_parent(path)).free


class PairSetWriter:
    """One run writing the pair directory `out` for `stage` ("generate" / "import"); `command` names the lock's
    holder in a second run's refusal. Use: `with w.stopping(): ... with w.writing(): ...`."""

    def __init__(self, out: Path, stage: str, command: str, all_or_nothing: bool):
        self.out, self.stage, self.command, self.all_or_nothing = storage.location(out), stage, command, all_or_nothing
        self.config, self.log_name = f"{stage}.config.json", f"{stage}.jsonl"
        self.manifest: Manifest | None = None
        self.created: Path | None = None      # the topmost directory this run created
        self.written: list[int] = []          # shard indices this run started to write
        self.found: dict[str, bytes] = {}     # all or nothing: manifest and logs as found, restored on failure
        self.lock: Lock | None = None
        self.remote = storage.is_remote(self.out)
        self.log_text: str | None = None      # remote: the whole log, rewritten on flush
        self.log_flushed = 0.0

    # ---- the run's frame -------------------------------------------------------------------------------------

    @contextmanager
    def stopping(self) -> Iterator[None]:
        """SIGTERM / SIGINT in the body: the run unwinds (cleanup as for any failure), one `error:` line says what
        was kept, and the process exits 143 / 130."""
        try:
            with stop_on_signals():
                yield
        except Terminated as e:
            kept = (f"removed what it had written into {self.out}" if self.all_or_nothing else
                    f"{len(self.manifest.shards) if self.manifest else 0} complete shards kept, rerun the same "
                    f"command to finish")
            print(f"error: {self.stage} stopped by {e.name}; {kept}", file=sys.stderr)
            raise

    def refuse_file(self) -> None:
        """Refuse an --out that is a file, or whose bucket is missing or not ours to use (before anything else)."""
        storage.check_bucket(self.out, "--out")
        with storage.remote_errors(self.out, "--out", ConfigError):
            is_file = self.out.is_file() if self.remote else self.out.exists() and not self.out.is_dir()
        if is_file:
            raise ConfigError(f"--out {self.out} is a file, not a directory; choose a directory for the pairs")

    @contextmanager
    def writing(self) -> Iterator["PairSetWriter"]:
        """Create DIR (and missing parents), hold its lock for the body, remove temp files on the way out; all or
        nothing: a body that fails (or is stopped) leaves DIR as it was found (see the module docstring)."""
        self.refuse_file()
        self.created = self._make_out()
        with ExitStack() as stack:
            try:
                self.lock = stack.enter_context(directory_lock(self.out, self.command))  # refused: nothing removed
            except OSError as e:       # a directory we cannot write in: invalid input (exit 2), nothing written
                self._remove_created()
                raise ConfigError(f"--out {self.out}: cannot write there ({e.strerror or e}); choose a writable "
                                  f"directory") from None
            if self.all_or_nothing:
                with storage.remote_errors(self.out, "reading", ConfigError):
                    self.found = {name: (self.out / name).read_bytes() for name in self.kept_files()
                                  if (self.out / name).exists()}
            try:
                yield self
            except BaseException:
                if self.all_or_nothing:
                    self._roll_back()
                raise
            finally:
                try:
                    self.flush_log()
                finally:
                    remove_temp_files(self.out)      # no writer is left (Ray is shut down before the body ends)

    def _make_out(self) -> Path | None:
        """Create DIR and missing parents; the topmost directory this process created (a concurrent run that
        created it first owns it), or None. An object store has no directories: nothing to create."""
        if self.remote:
            return None
        top = None
        try:
            for d in [*reversed(self.out.absolute().parents), self.out.absolute()]:
                if not d.is_dir():
                    try:
                        d.mkdir()
                        top = top or d
                    except FileExistsError:
                        pass
        except OSError as e:
            if top is not None:
                shutil.rmtree(top, ignore_errors=True)
            raise ConfigError(f"--out {self.out}: cannot write there ({e.strerror or e}); choose a writable "
                              f"directory") from None
        return top

    def _remove_created(self) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)

    def kept_files(self) -> tuple[str, ...]:
        return MANIFEST, self.config, self.log_name

    def _roll_back(self) -> None:
        """Remove this run's shards and temp files; the manifest and logs become what they were (so shards that
        reconcile found missing or corrupt are listed again, as they were, for the next rerun to repair); DIR
        itself goes if this run created it. Called holding the lock: no other run is inside."""
        self.log_text = None                        # the restored log replaces what this run would flush
        for k in self.written:
            storage.remove(self.out / shard_name(k))
        remove_temp_files(self.out)
        for name in self.kept_files():
            if name in self.found:
                atomic_write_bytes(self.out / name, self.found[name])
            else:
                storage.remove(self.out / name)
        self._remove_created()

    # ---- the manifest -----------------------------------------------------------------------------------------

    def open_manifest(self, fresh: Callable[[], Manifest], accept: Callable[[Manifest], Manifest],
                      unreadable: Callable[[Path, ValueError], str], strays: str | None) -> Manifest:
        """DIR's manifest as `accept` takes it (it raises ConfigError for another run's pairs), or `fresh()` when
        DIR has none. Shard files without a manifest are refused with the message `strays` (None: they are this
        run's own, to reconcile); a manifest that does not parse with the message `unreadable(path, error)`. A
        directory without a manifest that holds files a pair set does not have is refused: pairs are never written
        among unrelated files."""
        self.refuse_file()
        path = self.out / MANIFEST
        with storage.remote_errors(self.out, "reading", ConfigError):
            exists = path.exists()
            has_shards = not exists and strays is not None and any(self.out.glob("shard-*.tar"))
            foreign = [] if exists else self.foreign_files()
        if not exists:
            if has_shards:
                raise ConfigError(strays)
            if foreign:
                raise ConfigError(f"--out {self.out} is not empty and not a pair set (no {MANIFEST}; it holds "
                                  f"{', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}); choose an empty or "
                                  f"new directory")
            self.manifest = fresh()
            return self.manifest
        try:
            old = load_manifest(self.out)
        except ValueError as e:
            raise ConfigError(unreadable(path, e)) from None
        self.manifest = accept(old)
        return self.manifest

    def foreign_files(self) -> list[str]:
        """Names in DIR that no pair set holds (anything but shards, their temp files, the lock, the checksum cache
        the stages' config, log and report files, a manifest set aside, and temporary files a killed write left)."""
        if not self.out.is_dir():
            return []
        ours = (SHARD_FILE, TEMP_FILE, STAGE_FILE)
        return sorted(p.name for p in self.out.iterdir()
                      if p.name not in (LOCK, VERIFIED) and not any(r.fullmatch(p.name) for r in ours))

    def reconcile(self) -> Pending:
        """Shards still to write (missing or corrupt ones dropped from the manifest, orphans removed)."""
        return reconcile(self.out, self.manifest)

    def save(self) -> None:
        save_manifest(self.out, self.manifest)

    def shard_path(self, k: int) -> Path:
        """Where shard k goes; from now on a rollback removes it."""
        self.written.append(k)
        return self.out / shard_name(k)

    def commit(self, info: ShardInfo, log: dict[str, Any] | None = None) -> None:
        """A complete shard (its file renamed into place) enters the manifest, then the log."""
        if self.lock is not None:
            self.lock.check(self.out)
        self.manifest.shards.append(info)
        self.save()
        if log is not None:
            self.log(log)

    def log(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry) + "\n"
        if not self.remote:
            with open(self.out / self.log_name, "a") as f:
                f.write(line)
            return
        if self.log_text is None:
            path = self.out / self.log_name
            with storage.remote_errors(path, "reading"):
                self.log_text = path.read_text() if path.exists() else ""
        self.log_text += line
        if time.monotonic() - self.log_flushed >= LOG_FLUSH_SECONDS:
            self.flush_log()

    def flush_log(self) -> None:
        """Remote: write the log object whole (an object cannot be appended to)."""
        if self.log_text is not None:
            storage.write_text(self.out / self.log_name, self.log_text)
            self.log_flushed = time.monotonic()

    def record_config(self, text: str) -> None:
        storage.write_text(self.out / self.config, text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """storage.write_bytes, skipped when `path` already holds `data` (a rollback restores files mostly unchanged)."""
    if path.exists() and path.read_bytes() == data:
        return
    storage.write_bytes(path, data)


def remove_temp_files(out: Path) -> None:
    """Half-written shards of attempts that died with their worker, driver or node (call when none is running)."""
    if storage.is_remote(out):                      # this host's half-written files, and parts of dead uploads
        with storage.remote_errors(out, "cleaning up"):
            storage.abort_uploads(out, "shard-")
    for tmp in (storage.upload_dir(out) if storage.is_remote(out) else Path(out)).glob(".shard-*.tar.tmp-*"):
        tmp.unlink(missing_ok=True)


class Pending:
    """Shard indices still to write: range(num_shards) minus the complete ones, lazily (a plan may be huge)."""

    def __init__(self, num_shards: int, done: set[int]):
        self.num_shards, self.done = num_shards, done

    def __iter__(self) -> Iterator[int]:
        return (k for k in range(self.num_shards) if k not in self.done)

    def __len__(self) -> int:
        return self.num_shards - sum(1 for k in self.done if k < self.num_shards)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"Pending({len(self)} of {self.num_shards} shards)"


SHARD_FILE = re.compile(r"shard-(\d{6,})\.tar")


def reconcile(out: Path, manifest: Manifest) -> Pending:
    """Shards still to write: drop manifest entries whose file is missing or corrupt, remove orphans (files of a run
    killed after its rename but before its manifest update) and temp files. Mutates `manifest.shards`."""
    out = storage.location(out)
    remove_temp_files(out)
    good = []
    for info in manifest.shards:
        problem = check_shard(out / info.name, info)
        if problem:
            print(f"rebuilding {info.name}: {problem}", file=sys.stderr)
        else:
            good.append(info)
    manifest.shards = good
    done = {s.index for s in good}
    for path in out.glob("shard-*.tar"):            # the files there, not every planned index
        m = SHARD_FILE.fullmatch(path.name)
        if m and path.name == shard_name(int(m[1])) and int(m[1]) < manifest.num_shards and int(m[1]) not in done:
            storage.remove(path)
    return Pending(manifest.num_shards, done)
