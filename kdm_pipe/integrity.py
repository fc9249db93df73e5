"""What a reader checks before it trusts a pair set: the manifest is there and lists shards, and every shard about
to be read matches it by size and sha256 (remembered per file in DIR/.kdm-verified.json, so an unchanged set is not
hashed again); `verify` checks everything, contents and missing shards included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError, DataError
from kdm_pipe.manifest import Manifest, ShardInfo, load_manifest, missing_ranges, read_manifest, shard_name
from kdm_pipe.shards import ShardError, read_shard, repair_hint

VERIFIED = ".kdm-verified.json"        # check_shards' cache: shards whose sha256 matched, keyed by their stat


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


def check_shard(path: Path, info: ShardInfo, full: bool = True) -> str | None:
    """None if the shard on disk matches its manifest entry, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != info.bytes:
        return f"size {size} bytes, manifest says {info.bytes}"
    if full:
        digest = storage.sha256(path)
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
        storage.write_text(directory / VERIFIED, json.dumps({"format": "kdm-pipe/verified-v1", "shards": entries}))
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
    digest = storage.sha256(path)
    if digest != info.sha256:
        return f"sha256 {digest[:12]}…, manifest says {info.sha256[:12]}… (same size: changed in place)", None
    return None, stamp


def bad_shards_error(directory: Path, problems: dict[str, str]) -> DataError:
    """One line for `check_shards`' problems: which shards, what is wrong, how to repair."""
    listed = "; ".join(f"{name}: {p}" for name, p in list(problems.items())[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return DataError(f"{directory}: {len(problems)} shard(s) do not match the manifest ({listed}{more}); "
                     f"{repair_hint(directory)}")


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
