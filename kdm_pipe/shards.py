"""Pair shards: WebDataset tar files of `.npy` members, their manifest, and verification.

A shard is a plain tar. Each record holds a block of consecutive pairs (many pairs per record reads ~7× faster
than one pair per record); its members are `<key>.x_T.npy`, `<key>.x_0.npy`, `<key>.seed.npy` and, when present,
`<key>.label.npy` (one-hot) and `<key>.traj.npy` (B, S, ...). Tars are written deterministically (fixed mtime,
owner, order) to a temporary name and renamed when complete, so a shard on disk is whole and the same bytes for
the same settings.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "manifest.json"
FIELDS = ("x_T", "x_0", "seed", "label", "traj")


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    name: str
    pairs: int
    seed_start: int
    seed_end: int = Field(description="exclusive")
    bytes: int
    sha256: str


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
    shards: list[ShardInfo] = Field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return sum(s.pairs for s in self.shards)

    def shard(self, index: int) -> ShardInfo | None:
        return next((s for s in self.shards if s.index == index), None)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.shards.sort(key=lambda s: s.index)
    atomic_write_text(Path(directory) / MANIFEST, manifest.model_dump_json(indent=1))


def load_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a pair directory written by `kdm-pipe generate`?")
    return Manifest.model_validate_json(path.read_text())


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, records: Iterable[dict[str, np.ndarray]]) -> tuple[int, str]:
    """Write records atomically; returns (bytes, sha256). Same records → same bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for rec in records:
                    key = f"s{int(rec['seed'][0]):012d}"
                    for field in FIELDS:
                        if field in rec:
                            data = _npy_bytes(rec[field])
                            info = tarfile.TarInfo(f"{key}.{field}.npy")
                            info.size, info.mtime, info.mode = len(data), 0, 0o644
                            tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        size, digest = tmp.stat().st_size, sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return size, digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_shard(path: Path) -> Iterator[dict[str, np.ndarray]]:
    """Records of one shard, in order (plain tarfile: used by verify and stats; training streams via webdataset)."""
    rec: dict[str, np.ndarray] = {}
    key = None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            k, field = member.name.split(".", 1)
            if key is not None and k != key:
                yield rec
                rec = {}
            key = k
            rec[field.removesuffix(".npy")] = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
    if rec:
        yield rec


def read_pairs(directory: Path, names: list[str], num: int) -> dict[str, np.ndarray] | None:
    """The first `num` pairs of shards `names` (in that order), trajectories left out; None if there are none."""
    recs, n = [], 0
    for name in names:
        for rec in read_shard(Path(directory) / name):
            recs.append(rec)
            n += len(rec["x_0"])
            if n >= num:
                break
        if n >= num:
            break
    if not recs:
        return None
    return {k: np.concatenate([r[k] for r in recs])[:num] for k in recs[0] if k != "traj"}


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
        except (tarfile.TarError, ValueError, KeyError, EOFError) as e:
            return f"unreadable: {e}"
        if len(seeds) != info.pairs or not np.array_equal(seeds, np.arange(info.seed_start, info.seed_end)):
            return f"holds {len(seeds)} pairs / seeds not {info.seed_start}..{info.seed_end - 1}"
    return None


def verify(directory: Path) -> dict[str, str]:
    """Every problem in a pair directory: {shard name: what is wrong}. Empty when all shards match."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems = {}
    for info in manifest.shards:
        err = check_shard(directory / info.name, info)
        if err:
            problems[info.name] = err
    listed = {s.index for s in manifest.shards}
    for k in range(manifest.num_shards):
        if k not in listed:
            problems[shard_name(k)] = "not generated yet (rerun the same generate command to complete it)"
    return problems


def remove_temp_files(out: Path) -> None:
    """Half-written shards of attempts that died with their worker, driver or node (call when none is running)."""
    for tmp in Path(out).glob(".shard-*.tar.tmp-*"):
        tmp.unlink(missing_ok=True)


def reconcile(out: Path, manifest: Manifest) -> list[int]:
    """Shards still to write: drop manifest entries whose file is missing or corrupt, remove orphans (files of a run
    killed after its rename but before its manifest update) and temp files. Mutates `manifest.shards`."""
    out = Path(out)
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
    todo = [k for k in range(manifest.num_shards) if k not in done]
    for k in todo:
        (out / shard_name(k)).unlink(missing_ok=True)
    return todo
