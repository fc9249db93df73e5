"""A pair directory's manifest (`DIR/manifest.json`): what the set holds (shape, dtypes, labels, trajectory
states), what made it (teacher fingerprint and settings), its memorisation-filter decision, and every complete
shard (index, seed range, bytes, sha256)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError

MANIFEST = "manifest.json"

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


class LatentSpace(BaseModel):
    """Pairs stored in a VAE's latent space (docs/TEACHERS.md, "Latent teachers"): the VAE that decodes them and its
    convention, image = vae.decode(z / scaling_factor + shift_factor)."""

    model_config = ConfigDict(extra="forbid")
    vae: str = Field(description="the VAE's local folder (AutoencoderKL, as save_pretrained wrote it)")
    vae_sha256: str = Field(description="sha256 of its diffusion_pytorch_model.safetensors")
    scaling_factor: float
    shift_factor: float = 0.0
    image_shape: list[int] = Field(description="(C, H, W) of a decoded image")
    decode: str = "image = vae.decode(z / scaling_factor + shift_factor), in [-1, 1]"


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
    latent: LatentSpace | None = Field(default=None, description="set when x_T and x_0 are VAE latents")

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


def save_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.shards.sort(key=lambda s: s.index)
    storage.write_text(storage.location(directory) / MANIFEST, manifest.model_dump_json(indent=1))


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


def missing_ranges(manifest: Manifest) -> Iterator[tuple[int, int]]:
    """[start, stop) runs of planned shard indices with no complete shard: O(complete shards), whatever num_shards."""
    nxt = 0
    for k in sorted({s.index for s in manifest.shards if s.index < manifest.num_shards}):
        if k > nxt:
            yield nxt, k
        nxt = k + 1
    if nxt < manifest.num_shards:
        yield nxt, manifest.num_shards
