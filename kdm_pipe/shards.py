"""Pair shards: WebDataset tar files of `.npy` members, their manifest, and verification.

A shard is a plain tar. Each record holds a block of consecutive pairs (many pairs per record reads ~7× faster
than one pair per record); its members are `<key>.x_T.npy`, `<key>.x_0.npy`, `<key>.seed.npy` and, when present,
`<key>.label.npy` (one-hot) and `<key>.traj.npy` (B, S, ...). Tars are written deterministically (fixed mtime,
owner, order) to a temporary name and renamed when complete, so a shard on disk is whole and the same bytes for
the same settings.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError, DataError, one_line
from kdm_pipe.npyfiles import read_header

MANIFEST = "manifest.json"
VERIFIED = ".kdm-verified.json"        # check_shards' cache: shards whose sha256 matched, keyed by their stat
FIELDS = ("x_T", "x_0", "seed", "label", "traj")
REQUIRED = ("x_T", "x_0", "seed")
MAX_SAMPLE_ELEMENTS = 1 << 28          # one pair of 2^28 values (1 GiB in float32) is no pair set anyone writes


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    name: str
    pairs: int
    seed_start: int
    seed_end: int = Field(description="exclusive")
    bytes: int
    sha256: str


class FilteredShard(BaseModel):
    """One shard as the memorisation filter scored it: its bytes then, and the seeds it excluded."""

    model_config = ConfigDict(extra="forbid")
    sha256: str
    excluded: list[int] = Field(default_factory=list)


class FilterRecord(BaseModel):
    """`kdm-pipe filter`'s decision (kdm_pipe/exclusions.py applies it for every reader): the settings and reference
    it used, and per covered shard the seeds it excluded. A shard is covered only while its sha256 is unchanged."""

    model_config = ConfigDict(extra="forbid")
    settings: dict[str, Any] = Field(description="reference (source, sha256, count), metric, detector, rule, "
                                     "threshold, k")
    fingerprint: str = Field(description="sha256 of the settings: a rerun with another one is refused")
    scored: int = 0
    flagged: int = 0
    shards: dict[str, FilteredShard] = Field(default_factory=dict)


class Manifest(BaseModel):
    """What a pair directory holds: the settings that made it and every complete shard."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["kdm-pipe/pairs-v1"] = "kdm-pipe/pairs-v1"
    teacher: dict[str, Any] = Field(description="teacher fingerprint: name, params, weights_sha256, sha256")
    source: dict[str, Any] = Field(description="the settings that produced the pairs (generate config or import)")
    shape: list[int]
    label_dim: int = 0
    sigma_max: float
    x_T_convention: str = "x_T = sigma_max * z, z ~ N(0, I) drawn per seed"
    nfe: int | None = None
    num_shards: int
    pairs_per_shard: int
    dtypes: dict[str, str]
    trajectory_steps: list[int] | None = None
    trajectory_sigmas: list[float] | None = None
    sigmas: list[float] | None = Field(default=None, description="the sampler's σ (or t) schedule, N + 1 values "
                                       "ending in 0, as the teacher ran it (generate; imports do not know it)")
    shards: list[ShardInfo] = Field(default_factory=list)
    filter: FilterRecord | None = None

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        # Readers size their buffers from the shape: an absurd one must not reach an allocation.
        if not v or any(d < 1 for d in v) or math.prod(v) > MAX_SAMPLE_ELEMENTS:
            raise ValueError(f"shape {v} is not a sample shape (positive sizes, at most {MAX_SAMPLE_ELEMENTS} values)")
        return v

    @field_validator("num_shards", "pairs_per_shard", "label_dim")
    @classmethod
    def _count(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be ≥ 0, got {v}")
        return v

    @property
    def num_pairs(self) -> int:
        return sum(s.pairs for s in self.shards)

    def shard(self, index: int) -> ShardInfo | None:
        return next((s for s in self.shards if s.index == index), None)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


atomic_write_text = storage.write_text
sha256_file = storage.sha256


def save_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.shards.sort(key=lambda s: s.index)
    atomic_write_text(storage.location(directory) / MANIFEST, manifest.model_dump_json(indent=1))


def load_manifest(directory: Path) -> Manifest:
    path = storage.location(directory) / MANIFEST
    storage.check_bucket(path, "reading")
    with storage.remote_errors(path, "reading", ConfigError):      # before anything is written: bad input
        text = path.read_text() if path.is_file() else None
    if text is None:
        raise FileNotFoundError(f"{path} not found: is {directory} a pair directory written by `kdm-pipe generate`?")
    return Manifest.model_validate_json(text)


def read_manifest(directory: Path, label: str = "") -> Manifest:
    """The directory's manifest, refused (ConfigError, before anything is written) unless it is there and readable.
    `label` names where the directory came from (`--data`)."""
    where = f"{label} {directory}".strip()
    try:
        manifest = load_manifest(directory)
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"{label} {e}".strip()) from None
    except ValidationError as e:
        from kdm_pipe.config import format_validation
        raise ConfigError(f"{where}: {MANIFEST} is not a kdm-pipe manifest ({format_validation(e)}); pass a pair "
                          f"directory written by generate or import, or rerun the command that wrote it") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: unreadable manifest ({type(e).__name__}): rerun the `kdm-pipe generate` "
                          f"(or import) command that wrote it") from None
    return manifest


def checked_manifest(directory: Path, label: str = "") -> Manifest:
    """`read_manifest` for a stage that reads pairs: refused unless it lists shards to read."""
    manifest = read_manifest(directory, label)
    where = f"{label} {directory}".strip()
    if not manifest.shards:
        raise ConfigError(f"{where} holds no complete shards yet; run `kdm-pipe generate` first")
    return manifest


def open_pairs(directory: Path, names: Iterable[str] | None = None, label: str = "") -> Manifest:
    """The one way to open a pair set for reading (train, stats, filter, evaluate, analyze, sample): its manifest
    (`checked_manifest`: ConfigError, exit 2) and the shards about to be read (`names`; default every shard)
    checked against it by size and sha256 (`check_shards`, cached), DataError naming each bad one (exit 1)."""
    manifest = checked_manifest(directory, label)
    problems = check_shards(directory, manifest, names)
    if problems:
        raise bad_shards_error(directory, problems)
    return manifest


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def pair_bytes(manifest: Manifest) -> int:
    """Bytes one pair takes in a shard: x_T, x_0, the kept trajectory states, its seed and one-hot label."""
    d = math.prod(manifest.shape)
    size = {k: np.dtype(manifest.dtypes.get(k, "float32")).itemsize for k in ("x_T", "x_0", "traj")}
    traj = len(manifest.trajectory_steps or []) * d * size["traj"]
    return d * (size["x_T"] + size["x_0"]) + traj + 8 + 4 * manifest.label_dim


def estimated_shard_bytes(manifest: Manifest, pairs: int, batch: int) -> int:
    """A shard's size on disk: its pairs plus, per record, a tar header, an .npy header and padding per member."""
    members = 3 + (manifest.label_dim > 0) + bool(manifest.trajectory_steps)
    records = -(-pairs // max(1, min(batch, pairs)))
    return pairs * pair_bytes(manifest) + records * members * 1536 + 10240


def add_npy(tar: tarfile.TarFile, name: str, a: np.ndarray) -> None:
    """`a` as the `.npy` member `name`, with fixed mtime and mode: the same arrays give the same bytes."""
    data = _npy_bytes(a)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, records: Iterable[dict[str, np.ndarray]]) -> tuple[int, str]:
    """Write records atomically; returns (bytes, sha256). Same records → same bytes."""
    path = storage.location(path)
    tmp = storage.temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for rec in records:
                    key = f"s{int(rec['seed'][0]):012d}"
                    for field in FIELDS:
                        if field in rec:
                            add_npy(tar, f"{key}.{field}.npy", rec[field])
            f.flush()
            os.fsync(f.fileno())
        size, digest = tmp.stat().st_size, sha256_file(tmp)
        storage.commit_file(tmp, path, size, digest)
    finally:
        tmp.unlink(missing_ok=True)
    return size, digest


def repair_hint(directory: Path) -> str:
    return f"rerun the `kdm-pipe generate` (or import) command that wrote {directory} to repair it"


class ShardError(DataError):
    """An unreadable shard: one line naming the file, what is wrong (`.what`) and how to repair it."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = storage.location(path), one_line(what)
        super().__init__(f"{self.path}: {self.what}; {repair_hint(self.path.parent)}")

    def __reduce__(self):                               # crosses Ray's process boundary intact
        return ShardError, (self.path, self.what)


def shard_error(path: Path, what: str) -> ShardError:
    return ShardError(path, what)


def read_npy(f: Any, size: int) -> np.ndarray:
    """A `.npy` of `size` bytes from stream `f`, allocating only once the header has been shown to describe exactly
    the bytes that are there (np.load would allocate whatever a crafted header declares). ValueError if not."""
    start = f.tell()
    h = read_header(f, "", error=ValueError)                # the one .npy header parser (kdm_pipe/npyfiles.py)
    shape, fortran, dtype, nbytes = h.shape, h.fortran, h.dtype, h.nbytes
    have = size - (f.tell() - start)
    if nbytes != have:
        raise ValueError(f"header declares shape {tuple(shape)} {dtype} ({nbytes} bytes) but {have} bytes follow")
    buf = np.empty(nbytes, np.uint8)                        # not bytearray: no zero-fill before the read
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"ends after {got} of {nbytes} data bytes")
        got += n
    return buf.view(dtype).reshape(shape, order="F" if fortran else "C")


def npy_from_bytes(data: bytes) -> np.ndarray:
    """`read_npy` of an in-memory member (e.g. a WebDataset sample's bytes)."""
    return read_npy(io.BytesIO(data), len(data))


def _check_record(rec: dict[str, np.ndarray]) -> None:
    missing = [f for f in REQUIRED if f not in rec]
    if missing:
        raise ValueError(f"a record lacks {', '.join(missing)}")
    n = {len(a) if a.ndim else -1 for a in rec.values()}
    if len(n) != 1:
        raise ValueError(f"a record's members hold different numbers of pairs ({sorted(n)})")


def _records(tar: tarfile.TarFile, f: Any, file_size: int) -> Iterator[dict[str, np.ndarray]]:
    rec: dict[str, np.ndarray] = {}
    key = None
    for member in tar:
        k, _, field = member.name.partition(".")
        field = field.removesuffix(".npy")
        if not member.isfile() or field not in FIELDS or not member.name.endswith(".npy"):
            raise ValueError(f"unexpected member {member.name!r}")
        if member.offset_data + member.size > file_size:
            raise ValueError(f"member {member.name} declares {member.size} bytes, past the end of the file")
        if key is not None and k != key:
            _check_record(rec)
            yield rec
            rec = {}
        key = k
        try:
            f.seek(member.offset_data)                          # read from the file itself: tarfile's member
            rec[field] = read_npy(f, member.size)               # reader copies everything twice
        except ValueError as e:
            raise ValueError(f"member {member.name}: {e}") from None
    _check_end(f, tar.offset, file_size)
    if rec:
        _check_record(rec)
        yield rec


def _check_end(f: Any, offset: int, file_size: int) -> None:
    # tarfile stops quietly at a header cut short; a whole tar ends in two zero blocks right after its last member.
    f.seek(offset)
    if file_size < offset + 1024 or f.read(1024).strip(b"\0"):
        raise ValueError("truncated (no end-of-archive marker after the last member)")


def read_shard(path: Path) -> Iterator[dict[str, np.ndarray]]:
    """Records of one shard, in order: the one reader of shards (loader, verify, stats, evaluate).

    Any structural problem (not a tar, truncated, a member that is not a plain `.npy` of the size its header
    declares, a record without x_T / x_0 / seed) raises DataError naming the file and the repair; memory stays
    bounded by the file's size whatever its headers declare.
    """
    path = storage.location(path)
    try:
        with storage.open_read(path) as f:
            size = storage.size_of(f)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                yield from _records(tar, f, size)
    except FileNotFoundError:
        raise shard_error(path, "missing") from None
    except (tarfile.TarError, EOFError, ValueError, KeyError, OverflowError, UnicodeError, MemoryError) as e:
        kind = "" if type(e) is ValueError else f"{type(e).__name__}: "     # our own checks need no type name
        raise shard_error(path, f"unreadable: {kind}{e}") from None


def read_pairs(directory: Path, names: list[str], num: int,
               read: Callable[[Path], Iterator[dict[str, np.ndarray]]] = read_shard,
               traj: bool = False) -> dict[str, np.ndarray] | None:
    """The first `num` pairs of shards `names` (in that order), trajectories left out unless `traj`; None if there
    are none. `read` reads one shard (a filtered pair set's `Exclusions.read`). Values that are not finite stop the
    read naming the shard (ShardError): metrics over them would be garbage, or a failure deep inside a metric."""
    recs, n = [], 0
    for name in names:
        path = storage.location(directory) / name
        for rec in read(path):
            for k in ("x_T", "x_0", "traj") if traj else ("x_T", "x_0"):
                ok = np.isfinite(rec[k]).reshape(len(rec[k]), -1).all(axis=1) if k in rec else True
                if not np.all(ok):
                    raise shard_error(path, f"{k} of seed {int(rec['seed'][~ok][0])} holds non-finite values (NaN "
                                      f"or inf; {int((~ok).sum())} pair(s) in its record): `kdm-pipe verify "
                                      f"{directory}` tells whether the file changed since it was written")
            recs.append(rec)
            n += len(rec["x_0"])
            if n >= num:
                break
        if n >= num:
            break
    if not recs:
        return None
    return {k: np.concatenate([r[k] for r in recs])[:num] for k in recs[0] if traj or k != "traj"}


def check_shard(path: Path, info: ShardInfo, full: bool = True) -> str | None:
    """None if the shard on disk matches its manifest entry, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != info.bytes:
        return f"size {size} bytes, manifest says {info.bytes}"
    if full:
        digest = sha256_file(path)
        if digest != info.sha256:
            return f"sha256 {digest[:12]}…, manifest says {info.sha256[:12]}…"
        try:
            seeds = np.concatenate([r["seed"] for r in read_shard(path)])
        except ShardError as e:
            return e.what
        if len(seeds) != info.pairs or not np.array_equal(seeds, np.arange(info.seed_start, info.seed_end)):
            return f"holds {len(seeds)} pairs / seeds not {info.seed_start}..{info.seed_end - 1}"
    return None


def _load_verified(directory: Path) -> dict[str, list]:
    try:
        data = json.loads((directory / VERIFIED).read_text())
        return {k: v for k, v in data["shards"].items() if isinstance(v, list)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}                                  # no cache, or one we cannot trust: hash everything


def _save_verified(directory: Path, entries: dict[str, list]) -> None:
    try:
        atomic_write_text(directory / VERIFIED, json.dumps({"format": "kdm-pipe/verified-v1", "shards": entries}))
    except (OSError, DataError):
        pass                                        # a read-only pair set: verify every run, write nothing


def check_shards(directory: Path, manifest: Manifest, names: Iterable[str] | None = None) -> dict[str, str]:
    """{name: problem} for the named complete shards (default: every shard of the manifest) whose size or sha256
    differs from the manifest; empty when all match.

    Shards whose sha256 matched before and whose storage.stamp (local: size, mtime, ctime, inode; remote: size, ETag,
    last modified) and manifest sha256 are unchanged since are not re-hashed: DIR/.kdm-verified.json remembers them
    (skipped when DIR is read-only).
    """
    directory = storage.location(directory)
    listed = {s.name: s for s in manifest.shards}
    cache = _load_verified(directory)
    keep = {k: v for k, v in cache.items() if k in listed}
    problems: dict[str, str] = {}
    for name in (listed if names is None else names):
        info = listed.get(name)
        if info is None:
            problems[name] = "not a complete shard of the manifest"
            continue
        problem, stamp = _check_one(directory / name, info, cache.get(name))
        if problem:
            problems[name] = problem
            keep.pop(name, None)
        else:
            keep[name] = stamp
    if keep != cache:
        _save_verified(directory, keep)
    return problems


def _check_one(path: Path, info: ShardInfo, cached: list | None) -> tuple[str | None, list | None]:
    stamp = storage.stamp(path)
    if stamp is None:
        return "missing", None
    if stamp[0] != info.bytes:
        return f"size {stamp[0]} bytes, manifest says {info.bytes}", None
    stamp = [info.sha256, *stamp]                   # the manifest's sha256 too: a changed entry misses the cache
    if cached == stamp:
        return None, stamp
    digest = sha256_file(path)
    if digest != info.sha256:
        return f"sha256 {digest[:12]}…, manifest says {info.sha256[:12]}… (same size: changed in place)", None
    return None, stamp


def bad_shards_error(directory: Path, problems: dict[str, str]) -> DataError:
    """One line for `check_shards`' problems: which shards, what is wrong, how to repair."""
    listed = "; ".join(f"{name}: {p}" for name, p in list(problems.items())[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return DataError(f"{directory}: {len(problems)} shard(s) do not match the manifest ({listed}{more}); "
                     f"{repair_hint(directory)}")


def missing_ranges(manifest: Manifest) -> Iterator[tuple[int, int]]:
    """[start, stop) runs of planned shard indices with no complete shard: O(complete shards), whatever num_shards."""
    nxt = 0
    for k in sorted({s.index for s in manifest.shards if s.index < manifest.num_shards}):
        if k > nxt:
            yield nxt, k
        nxt = k + 1
    if nxt < manifest.num_shards:
        yield nxt, manifest.num_shards


def verify(directory: Path, manifest: Manifest | None = None) -> dict[str, str]:
    """Every problem in a pair directory: {shard name: what is wrong}. Empty when all shards match.

    Shards not generated yet are reported as runs ("shard-000004.tar … shard-000009.tar": "6 shards …"), so a plan
    of 10^12 shards costs no memory.
    """
    directory = storage.location(directory)
    manifest = manifest or load_manifest(directory)
    problems = {}
    for info in manifest.shards:
        err = check_shard(directory / info.name, info)
        if err:
            problems[info.name] = err
    rerun = "rerun the same generate command to complete it"
    for start, stop in missing_ranges(manifest):
        if stop - start == 1:
            problems[shard_name(start)] = f"not generated yet ({rerun})"
        else:
            run = f"{shard_name(start)} … {shard_name(stop - 1)}"
            problems[run] = f"{stop - start} shards not generated yet ({rerun})"
    return problems


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
