"""Zarr statistics of a pair directory: per-shard sufficient statistics, merged into moments.

Store `DIR/stats.zarr` (zarr format 3, Blosc zstd + bitshuffle):

    per_shard/<field>/{count, sum, sumsq, outer, min, max}   row k = shard k (chunk = one row)
    per_shard/label/count                                     per-class counts (label_dim > 0 only)
    per_shard/sha256, per_shard/computed_at                   what each row was computed from, and when
    merged/<field>/{count, mean, std, cov, min, max}          from the valid rows of the manifest's shards
    merged/label/count

Image sets also hold `features/<detector>/`, the feature statistics of x_0 for Fréchet distances, with rows and a
merged view of their own (kdm_pipe.feature_stats); kdm_pipe.stats_update fills both.

Fields are `x_0`, `x_T` and, when the pairs keep trajectories, `traj`, whose arrays carry a step axis after the
shard axis. `outer` / `cov` exist only when the flattened dimension d ≤ cov_max_dim. Sums and moments are float64.

Safety: one Ray task owns one row of every per-shard array and writes it as invalidate (sha256 row ← 0) → statistics
→ sha256 row, so a row is trusted only when a task finished it. The merged view is published by the root attributes:
the driver sets `complete: false`, rewrites `merged/`, then writes every attribute with `complete: true` in one
atomic write (zarr's LocalStore writes through a temporary file + rename). Readers refuse a store that is not
complete, and an interrupted run leaves the rows it finished for the next run to reuse. (A store of another
layout, e.g. after changing cov_max_dim, is deleted and rebuilt from scratch.)

A pair set on s3:// has its store in the bucket: `stats` builds it in a local mirror and uploads it with its root
metadata last (stages/stats.py), and readers open it there read-only (`store_at`).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from kdm_pipe import storage
from kdm_pipe.config import ConfigError
from kdm_pipe.errors import DataError
from kdm_pipe.exclusions import NO_EXCLUSIONS, Exclusions, exclusions
from kdm_pipe.manifest import Manifest, ShardInfo, load_manifest
from kdm_pipe.shards import repair_hint, shard_error

STORE = "stats.zarr"
FORMAT = "kdm-pipe/stats-v1"
LABEL = "label"


def store_at(directory: Any) -> Any:
    """DIR/stats.zarr as zarr opens it for reading: a local path, or a read-only fsspec store in the bucket."""
    loc = storage.location(directory) / STORE
    if not storage.is_remote(loc):
        return loc
    from zarr.storage import FsspecStore
    return FsspecStore.from_url(str(loc), storage_options=dict(loc.storage_options), read_only=True)


def compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


class ShardMismatch(DataError):
    """A shard file is not the one its manifest entry describes."""


@dataclass(frozen=True)
class FieldSpec:
    """One statistics field: `lead` axes (the trajectory step axis, or none) over samples of `shape`."""

    name: str
    lead: tuple[int, ...]
    shape: tuple[int, ...]
    outer: bool

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one shard's sufficient statistics."""
        shapes = {"count": self.lead, "sum": self.lead + self.shape, "sumsq": self.lead + self.shape,
                  "min": self.lead + self.shape, "max": self.lead + self.shape}
        if self.outer:
            shapes["outer"] = self.lead + (self.dim, self.dim)
        return shapes


def field_specs(manifest: Manifest, cov_max_dim: int) -> list[FieldSpec]:
    shape = tuple(manifest.shape)
    outer = math.prod(shape) <= cov_max_dim
    specs = [FieldSpec("x_0", (), shape, outer), FieldSpec("x_T", (), shape, outer)]
    if manifest.trajectory_steps:
        specs.append(FieldSpec("traj", (len(manifest.trajectory_steps),), shape, outer))
    return specs


def layout(specs: list[FieldSpec], label_dim: int) -> dict[str, Any]:
    """What the per-shard arrays look like, apart from the number of rows (compared on rerun)."""
    out: dict[str, Any] = {s.name: {"lead": list(s.lead), "shape": list(s.shape), "outer": s.outer} for s in specs}
    out[LABEL] = label_dim
    return out


class Moments:
    """Running float64 sums of one field over batches shaped (B, *lead, *shape)."""

    def __init__(self, spec: FieldSpec):
        self.spec = spec
        flat = spec.lead + (spec.dim,)
        self.count = np.zeros(spec.lead, np.int64)
        self.sum = np.zeros(flat)
        self.sumsq = np.zeros(flat)
        self.outer = np.zeros(spec.lead + (spec.dim, spec.dim)) if spec.outer else None
        self.min = np.full(flat, np.inf)
        self.max = np.full(flat, -np.inf)

    def add(self, batch: np.ndarray) -> None:
        x = batch.reshape((len(batch),) + self.spec.lead + (self.spec.dim,)).astype(np.float64)
        self.count += len(x)
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        if self.outer is not None:
            xt = np.moveaxis(x, 0, -1)                         # (..., d, B): one BLAS product per step
            self.outer += xt @ np.swapaxes(xt, -1, -2)
        np.minimum(self.min, x.min(0), out=self.min)
        np.maximum(self.max, x.max(0), out=self.max)

    def arrays(self) -> dict[str, np.ndarray]:
        full = self.spec.lead + self.spec.shape
        out = {"count": self.count, "sum": self.sum.reshape(full), "sumsq": self.sumsq.reshape(full),
               "min": self.min.reshape(full), "max": self.max.reshape(full)}
        if self.outer is not None:
            out["outer"] = self.outer
        return out


class ShardMoments:
    """Sufficient statistics of every field of one shard (and its per-class counts), fed record by record."""

    def __init__(self, path: Path, specs: list[FieldSpec], label_dim: int):
        self.path, self.label_dim = path, label_dim
        self.moments = {s.name: Moments(s) for s in specs}
        self.labels = np.zeros(label_dim, np.int64)

    def add(self, rec: dict[str, np.ndarray]) -> None:
        try:
            for name, m in self.moments.items():
                m.add(rec[name])
            if self.label_dim:
                self.labels += np.bincount(rec[LABEL].argmax(1), minlength=self.label_dim)
        except (KeyError, ValueError, IndexError) as e:      # a record whose arrays the manifest does not describe
            raise shard_error(self.path, f"a record does not match the manifest's shape/fields ({type(e).__name__}: "
                                         f"{e})") from None

    def arrays(self) -> dict[str, dict[str, np.ndarray]]:
        out = {name: m.arrays() for name, m in self.moments.items()}
        if self.label_dim:
            out[LABEL] = {"count": self.labels}
        return out


def checked_digest(directory: Path, info: ShardInfo) -> str:
    """The shard's sha256, refused (ShardMismatch) unless it is the one its manifest entry names."""
    path = storage.location(directory) / info.name
    digest = storage.sha256(path)
    if digest != info.sha256:
        raise ShardMismatch(f"{path} has sha256 {digest[:12]}…, its manifest entry says {info.sha256[:12]}…; "
                            f"{repair_hint(directory)}")
    return digest


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: str,
                 chunks: tuple[int, ...]) -> zarr.Array:
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=compressor(),
                              overwrite=True)


def open_store(path: Path, manifest: Manifest, specs: list[FieldSpec]) -> zarr.Group | None:
    """The store at `path` if it has this layout (resized to one row per planned shard: more shards only add rows),
    else None: another layout (shape, trajectory steps, labels, cov_max_dim) or an unreadable store is rebuilt."""
    if not path.exists():
        return None
    try:
        root = zarr.open_group(path, mode="r+")
    except (OSError, ValueError):
        return None
    if root.attrs.get("format") != FORMAT or root.attrs.get("layout") != layout(specs, manifest.label_dim):
        return None
    for _, a in root["per_shard"].members(max_depth=None):
        if isinstance(a, zarr.Array) and a.shape[0] != manifest.num_shards:
            a.resize((manifest.num_shards,) + a.shape[1:])
    return root


def create_store(path: Path, manifest: Manifest, specs: list[FieldSpec]) -> zarr.Group:
    """A new store with one row per planned shard, its per-shard arrays created here, in the driver."""
    n = manifest.num_shards
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.attrs.update({"format": FORMAT, "layout": layout(specs, manifest.label_dim), "complete": False})
    rows = root.create_group("per_shard")
    for s in specs:
        g = rows.create_group(s.name)
        for name, shape in s.row_shapes().items():
            create_array(g, name, (n,) + shape, "int64" if name == "count" else "float64", (1,) + shape)
    if manifest.label_dim:
        create_array(rows.create_group(LABEL), "count", (n, manifest.label_dim), "int64", (1, manifest.label_dim))
    create_array(rows, "sha256", (n, 32), "uint8", (1, 32))
    create_array(rows, "computed_at", (n,), "float64", (1,))
    return root


def publish(tmp: Path, path: Path) -> None:
    """Put the finished store `tmp` at `path`, replacing whatever is there (the name is reserved for this store)."""
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, path)


def temp_store_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def remove_temp_stores(path: Path) -> None:
    """Stores of runs killed before they were published (call under the directory's lock)."""
    for p in path.parent.glob(f".{path.name}.*-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def filtered_alike(root: zarr.Group, manifest: Manifest, directory: Path) -> bool:
    """Whether the store's rows left out exactly the pairs the manifest's filter excludes now."""
    drop = exclusions(manifest, directory)
    return root.attrs.get("excluded_sha256", NO_EXCLUSIONS) == drop.digest(s.name for s in manifest.shards)


def stale_shards(root: zarr.Group, manifest: Manifest) -> list[ShardInfo]:
    """The manifest's shards whose row was not computed from exactly their bytes."""
    if not manifest.shards:
        return []
    index = [s.index for s in manifest.shards]          # only the listed rows: a plan may have 10^12 of them
    done = root["per_shard/sha256"].get_orthogonal_selection((index, slice(None)))
    return [s for s, row in zip(manifest.shards, done) if row.tobytes().hex() != s.sha256]


def merge(spec: FieldSpec, rows: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Moments of the union of shards from their sufficient statistics; cov and std are unbiased.

    Σx² − nμ² in float64 loses digits only when |μ| ≫ σ, which the data here (x_0 ≈ [−1, 1], x_T ≈ 0 ± σ_max)
    never approaches.
    """
    flat = spec.lead + (spec.dim,)
    n, s, s2, xx, lo, hi = 0, 0.0, 0.0, 0.0, np.inf, -np.inf
    for r in rows:
        n = n + r["count"]
        s = s + r["sum"].reshape(flat)
        s2 = s2 + r["sumsq"].reshape(flat)
        lo, hi = np.minimum(lo, r["min"]), np.maximum(hi, r["max"])
        if spec.outer:
            xx = xx + r["outer"]
    n = np.asarray(n, np.int64)
    nf = n[..., None].astype(np.float64)
    mu = s / nf
    dof = np.where(nf > 1, nf - 1, np.nan)
    var = np.clip((s2 - nf * mu**2) / dof, 0, None)
    full = spec.lead + spec.shape
    out = {"count": n, "mean": mu.reshape(full), "std": np.sqrt(var).reshape(full), "min": lo, "max": hi}
    if spec.outer:
        out["cov"] = (xx - nf[..., None] * mu[..., :, None] * mu[..., None, :]) / dof[..., None]
    return out


def write_merged(root: zarr.Group, manifest: Manifest, specs: list[FieldSpec], cov_max_dim: int,
                 drop: Exclusions) -> None:
    """Rewrite `merged/` from the rows of the manifest's shards, then publish it with `complete: true`; the rows
    were computed without the pairs `drop` excludes, whose digest is recorded (`excluded_sha256`)."""
    rows, index = root["per_shard"], [s.index for s in manifest.shards]
    computed = {}                # everything that can fail on odd data, before the published view is touched
    for spec in specs:
        arrays = {name: rows[f"{spec.name}/{name}"] for name in spec.row_shapes()}
        computed[spec.name] = merge(spec, ({name: a[k] for name, a in arrays.items()} for k in index))
    counts = sum(rows[f"{LABEL}/count"][k] for k in index) if manifest.label_dim else None
    root.attrs.update({"complete": False})
    if "merged" in root:
        del root["merged"]
    merged = root.create_group("merged")
    for spec in specs:
        g = merged.create_group(spec.name)
        for name, a in computed[spec.name].items():
            create_array(g, name, a.shape, str(a.dtype), (1,) * len(spec.lead) + a.shape[len(spec.lead):])[...] = a
    if counts is not None:
        create_array(merged.create_group(LABEL), "count", counts.shape, "int64", counts.shape)[...] = counts
    d = math.prod(manifest.shape)
    skipped = {} if d <= cov_max_dim else {s.name: f"d = {d} > cov_max_dim = {cov_max_dim}" for s in specs}
    root.attrs.update({
        "teacher_sha256": manifest.teacher.get("sha256"),
        "num_pairs": sum(drop.kept(s) for s in manifest.shards),
        "excluded_sha256": drop.digest(s.name for s in manifest.shards),
        "num_shards": manifest.num_shards,
        "shards": [{"index": s.index, "name": s.name, "pairs": s.pairs, "sha256": s.sha256} for s in manifest.shards],
        "dtypes": {"data": manifest.dtypes, "statistics": "float64"},
        "cov_max_dim": cov_max_dim,
        "covariance_skipped": skipped,
        "label_dim": manifest.label_dim,
        "trajectory_steps": manifest.trajectory_steps,
        "trajectory_sigmas": manifest.trajectory_sigmas,
        "complete": True,
    })


def load_stats(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """Merged statistics of a pair directory: {field: {name: array}}, e.g. stats["x_0"]["mean"]."""
    path = storage.location(directory) / STORE
    try:
        root = zarr.open_group(store_at(directory), mode="r")
    except (OSError, ValueError):
        raise ConfigError(f"{path} is not a kdm-pipe statistics store: run `kdm-pipe stats {directory}`") from None
    if root.attrs.get("format") != FORMAT or root.attrs.get("complete") is not True:
        raise ConfigError(f"{path} is not a complete kdm-pipe statistics store: rerun `kdm-pipe stats {directory}`")
    if not filtered_alike(root, load_manifest(directory), directory):
        raise ConfigError(f"{path} was computed before the memorisation filter of {directory} changed: rerun "
                          f"`kdm-pipe stats {directory}`")
    return {field: {name: a[...] for name, a in g.arrays()} for field, g in root["merged"].groups()}


def training_moments(directory: Path, manifest: Manifest, names: list[str], update) -> dict[str, np.ndarray]:
    """μ and s of x_0 and x_T over the shards `names`, from their rows in stats.zarr; `update()` is called first
    when the store is missing, of another layout, or stale for any shard of the manifest."""
    path = storage.location(directory) / STORE
    specs = field_specs(manifest, cov_max_dim=0)       # mean and std only: any layout of the store has them
    root = _trusted(directory, manifest, specs)
    if root is None:
        update()
        root = _trusted(directory, manifest, specs)
        if root is None:
            raise ConfigError(f"{path} could not be brought up to date; rerun `kdm-pipe stats {directory}`")
    index = [s.index for s in manifest.shards if s.name in set(names)]
    rows = root["per_shard"]
    out = {}
    for spec, key in ((s, s.name[2:]) for s in specs if s.name in ("x_0", "x_T")):
        arrays = {n: rows[f"{spec.name}/{n}"] for n in ("count", "sum", "sumsq", "min", "max")}
        m = merge(spec, ({n: a[k] for n, a in arrays.items()} for k in index))
        std = m["std"].reshape(-1)
        out[f"mean_{key}"] = m["mean"].reshape(-1)
        out[f"std_{key}"] = np.where(std > 0, std, 1.0)      # a constant coordinate is left as it is
    return out


def _trusted(directory: Path, manifest: Manifest, specs) -> zarr.Group | None:
    """The store if every shard of the manifest has a trusted row, else None (read-only: nothing is changed)."""
    try:
        root = zarr.open_group(store_at(directory), mode="r")
        if (root.attrs.get("complete") is not True or stale_shards(root, manifest)
                or not filtered_alike(root, manifest, directory)):
            return None
        return root
    except (OSError, ValueError, KeyError, IndexError):
        return None
