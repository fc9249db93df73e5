"""Pair shards: WebDataset tar files of `.npy` members; the one writer and the one reader.

A shard is a plain tar. Each record holds a block of consecutive pairs (many pairs per record reads ~7× faster
than one pair per record); its members are `<key>.x_T.npy`, `<key>.x_0.npy`, `<key>.seed.npy` and, when present,
`<key>.label.npy` (one-hot) and `<key>.traj.npy` (B, S, ...). Tars are written deterministically (fixed mtime,
owner, order) to a temporary name and renamed when complete, so a shard on disk is whole and the same bytes for
the same settings.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from kdm_pipe import storage
from kdm_pipe.errors import DataError, one_line
from kdm_pipe.npyfiles import read_header

FIELDS = ("x_T", "x_0", "seed", "label", "traj")

REQUIRED = ("x_T", "x_0", "seed")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


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
        size, digest = tmp.stat().st_size, storage.sha256(tmp)
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
