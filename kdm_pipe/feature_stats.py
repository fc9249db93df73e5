"""Teacher-set feature statistics for Fréchet distances, beside the moments in `DIR/stats.zarr`.

One group per feature space — `pixels` (quantised pixels, `PixelFeatures`) or a detector, named by its file and
hash — so that statistics of several detectors live side by side and each is updated on its own:

    features/<key>/per_shard/{count, sum, outer}   row k = shard k: n, Σf, Σffᵀ of x_0's features (float64)
    features/<key>/per_shard/sha256                 the shard bytes the row was computed from (0: not trusted)
    features/<key>/merged/{count, mean, cov}         mean and unbiased covariance over the listed shards

The group's attributes name the detector and the shards (index, sha256) its merged view was computed from, and are
written last with `complete: true` (as the root's are): a reader compares them with the manifest, so statistics of
other shards or another detector are never used for a set they do not describe.

A set of VAE latents (manifest `latent`) is embedded after decoding x_0 through its VAE (kdm_pipe/teachers/vae.py, on
the task's CPU): its space is named after the detector and the VAE's hash (`pixels+vae-…`), which evaluate looks up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zarr

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError
from kdm_pipe.manifest import LatentSpace, Manifest
from kdm_pipe.metrics.detectors import FeatureNet, feature_batches, load_detector, to_uint8
from kdm_pipe.metrics.fid import FeatureStats, FeatureSums
from kdm_pipe.stats import STORE, create_array, filtered_alike, store_at
from kdm_pipe.teachers.vae import Decoder

GROUP = "features"


def key(detector: str) -> str:
    """A group name for a detector name (`inception-2015-12-05.pt:0123abcd4567` → `…pt-0123abcd4567`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", detector)


def space_name(detector: str, latent: LatentSpace | None) -> str:
    """A feature space's name: the detector's, and for VAE latents also the VAE that decodes x_0 before it."""
    return detector if latent is None else f"{detector}+vae-{latent.vae_sha256[:16]}"


@dataclass(frozen=True)
class FeatureSpace:
    """What a statistics task needs to embed x_0: the detector file (None: pixels), the space's name, D, the batch
    and, for latents, the VAE that decodes them first."""

    path: str | None
    name: str
    dim: int
    batch: int = 250
    latent: LatentSpace | None = None
    vae: str | None = None               # the VAE's folder when not the recorded one (--vae)

    @property
    def group(self) -> str:
        return f"{GROUP}/{key(self.name)}"


def feature_space(detector: Path | None, shape: tuple[int, ...], batch: int = 250,
                  latent: LatentSpace | None = None, vae: Path | None = None) -> FeatureSpace:
    """The space of `detector` (loaded here, in the driver, so that a bad file is refused before any work) and its
    feature dimension, from one blank image (of the decoded shape for `latent` pairs, whose VAE — `vae`, else the
    recorded one — is loaded here too)."""
    net = load_detector(detector)
    space = FeatureSpace(None if detector is None else str(detector), space_name(net.name, latent), 0, batch, latent,
                         None if vae is None else str(vae))
    if latent is not None:              # a VAE that is gone or changed is refused here, before any task runs
        _VAES[(latent.vae_sha256, space.vae)] = Decoder(latent, path=vae)
        shape = tuple(latent.image_shape)
    with torch.no_grad():
        dim = net.features(to_uint8(torch.zeros((1, *shape)), rgb=net.rgb)).shape[1]
    return replace(space, dim=int(dim))


_NETS: dict[str | None, FeatureNet] = {}
_VAES: dict[tuple[str, str | None], Decoder] = {}


def worker_detector(space: FeatureSpace) -> FeatureNet:
    """The detector of `space`, loaded once per worker process (Ray reuses workers across tasks)."""
    if space.path not in _NETS:
        _NETS[space.path] = load_detector(space.path)
    return _NETS[space.path]


def worker_decoder(space: FeatureSpace) -> Decoder:
    """The VAE of `space`'s latents, loaded once per worker process."""
    k = (space.latent.vae_sha256, space.vae)
    if k not in _VAES:
        _VAES[k] = Decoder(space.latent, path=None if space.vae is None else Path(space.vae))
    return _VAES[k]


class ShardFeatures:
    """Feature sums of one shard's x_0 (decoded first when they are latents), fed record by record."""

    def __init__(self, space: FeatureSpace):
        self.space, self.net, self.sums = space, worker_detector(space), FeatureSums(space.dim)
        self.decode = None if space.latent is None else worker_decoder(space)

    def add(self, x_0: np.ndarray) -> None:
        x = x_0 if self.decode is None else self.decode(x_0, self.space.batch)
        for f in feature_batches(self.net, [torch.as_tensor(x)], self.space.batch):
            self.sums.add(f)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.int64(self.sums.count), "sum": self.sums.sum, "outer": self.sums.outer}


def create_group(root: zarr.Group, space: FeatureSpace, num_shards: int) -> zarr.Group:
    """The per-shard arrays of `space` (one row per planned shard), created in the driver; not complete yet."""
    g = root.require_group(space.group)
    g.attrs.update({"detector": space.name, "dim": space.dim, "complete": False})
    rows = g.require_group("per_shard")
    d = space.dim
    for name, shape, dtype in (("count", (), "int64"), ("sum", (d,), "float64"), ("outer", (d, d), "float64"),
                               ("sha256", (32,), "uint8")):
        create_array(rows, name, (num_shards, *shape), dtype, (1, *shape))
    return g


def open_group(root: zarr.Group, space: FeatureSpace, num_shards: int) -> zarr.Group:
    """The group of `space` resized to `num_shards` rows, or a new one (also when its dimension changed)."""
    if space.group in root and root[space.group].attrs.get("dim") == space.dim:
        g = root[space.group]
        for _, a in g["per_shard"].arrays():
            if a.shape[0] != num_shards:
                a.resize((num_shards, *a.shape[1:]))
        return g
    return create_group(root, space, num_shards)


def summed(g: zarr.Group, shards: list) -> FeatureSums:
    """The feature sums of the rows of `shards` (streamed, one row at a time)."""
    rows, sums = g["per_shard"], FeatureSums(g.attrs["dim"])
    for s in shards:
        sums.count += int(rows["count"][s.index])
        sums.sum += rows["sum"][s.index]
        sums.outer += rows["outer"][s.index]
    return sums


def write_merged(g: zarr.Group, manifest: Manifest) -> None:
    """Merge the rows of the manifest's shards and publish them."""
    stats = summed(g, manifest.shards).stats(g.attrs["detector"])
    g.attrs.update({"complete": False})
    merged = g.require_group("merged")
    for name, a in (("count", np.int64(stats.num)), ("mean", stats.mu), ("cov", stats.sigma)):
        create_array(merged, name, a.shape, str(a.dtype), a.shape)[...] = a
    g.attrs.update({"shards": [{"index": s.index, "sha256": s.sha256} for s in manifest.shards], "complete": True})


def stale_rows(g: zarr.Group, manifest: Manifest) -> set[int]:
    index = [s.index for s in manifest.shards]
    done = g["per_shard/sha256"].get_orthogonal_selection((index, slice(None)))
    return {s.index for s, row in zip(manifest.shards, done) if row.tobytes().hex() != s.sha256}


def set_reference(directory: Path, manifest: Manifest, detector: str, flag: str = "") -> FeatureStats | None:
    """The teacher set's feature statistics in `detector`'s space, None when the store has none for it; a store
    computed from other shards, before the memorisation filter changed (its rows would count excluded pairs) or
    never completed is refused: it does not describe this set. `flag`: the stats flags that recompute it (e.g.
    ` --detector PATH`), for the message."""
    path = storage.location(directory) / STORE
    try:
        root = zarr.open_group(store_at(directory), mode="r")
        g = root[f"{GROUP}/{key(detector)}"]
    except (OSError, ValueError, KeyError):
        return None
    hint = f"rerun `kdm-pipe stats {directory}{flag}`"
    if g.attrs.get("complete") is not True or g.attrs.get("detector") != detector:
        raise ConfigError(f"{path}: the {detector} feature statistics are incomplete; {hint}")
    listed = [(s["index"], s["sha256"]) for s in g.attrs["shards"]]
    if listed != [(s.index, s.sha256) for s in manifest.shards]:
        raise ConfigError(f"{path}: the {detector} feature statistics describe other shards ({len(listed)} listed, "
                          f"the manifest has {len(manifest.shards)} or other contents); {hint}")
    if not filtered_alike(root, manifest, directory):
        raise ConfigError(f"{path} was computed before the memorisation filter of {directory} changed (it counts "
                          f"pairs the filter excludes); {hint}")
    m = g["merged"]
    return FeatureStats(m["mean"][...], m["cov"][...], int(m["count"][...]), detector)


def set_halves(directory: Path, manifest: Manifest, detector: str) -> tuple[FeatureStats, FeatureStats] | None:
    """The feature statistics of the first and the second half of the set's shards (the teacher-vs-teacher floor
    of the whole-set FD); None with fewer than 2 shards. Call after `set_reference` accepted the store."""
    if len(manifest.shards) < 2:
        return None
    g = zarr.open_group(store_at(directory), mode="r")[f"{GROUP}/{key(detector)}"]
    h = len(manifest.shards) // 2
    return (summed(g, manifest.shards[:h]).stats(detector), summed(g, manifest.shards[h:]).stats(detector))
