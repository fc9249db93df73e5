"""Pydantic models shared by the stages: the single source of truth for configuration.

Presets in `manifests/*.yaml` hold one section per stage (`generate`, `train`, `evaluate`); command-line flags
override preset values; unknown keys are rejected everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError  # noqa: F401  (re-exported: stages raise it via config)

PRESET_DIR = Path(__file__).resolve().parent.parent / "manifests"
Dtype = Literal["float16", "float32", "float64"]
Device = Literal["auto", "cpu", "cuda"]
Weights = Literal["auto", "ema", "raw"]
DEVICE = "where torch runs (auto: cuda if available)"
VAE_OVERRIDE = ("latent pair sets: the VAE folder to decode with, when the one their manifest records (latent.vae) "
                "has moved (its weights must be the recorded ones)")
RAY_ADDRESS = "address of an existing Ray cluster, or auto (default: start a local one)"


# Pair sets and run directories: a local Path, or a UPath for an s3:// URL (kdm_pipe.storage); written out as text.
Location = storage.Location


class Strict(BaseModel):
    # Every number reaches arithmetic: inf or NaN is never a setting (`--lr inf` once segfaulted in a probe).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def cli(*flags: str) -> dict[str, Any]:
    """`Field(json_schema_extra=cli("--x-0-dtype", "--x0-dtype"))`: the field's command-line flags when they are not
    `--field-name` (kdm_pipe.cli makes an option of every field)."""
    return {"flags": list(flags)}


def teacher_name(name: str) -> Any:
    """The `name` field that discriminates the teacher configs (`--teacher NAME`)."""
    return Field(default=name, json_schema_extra=cli("--teacher"),
                 description="the teacher (another teacher than the preset's starts from its own defaults)")


# Teachers: a config (discriminated by `name`) per teacher; kdm_pipe.teachers builds the denoiser from it.

class GMMTeacherConfig(Strict):
    """A general isotropic Gaussian mixture in any dimension."""

    name: Literal["gmm"] = teacher_name("gmm")
    means: list[list[float]] = Field(default=[[-1.0, 0.0], [1.0, 0.0]], min_length=1,
                                     description="gmm: component means")
    stds: list[float] = Field(default=[0.2, 0.2], description="gmm: component standard deviations")
    weights: list[float] | None = Field(default=None, description="gmm: component weights (default: equal)")

    @model_validator(mode="after")
    def _consistent(self) -> "GMMTeacherConfig":
        k, d = len(self.means), len(self.means[0])
        if any(len(m) != d for m in self.means):
            raise ValueError("gmm: every mean must have the same dimension")
        if len(self.stds) != k or any(s <= 0 for s in self.stds):
            raise ValueError(f"gmm: need {k} positive stds (one per mean), got {self.stds}")
        if self.weights is not None and (len(self.weights) != k or any(w <= 0 for w in self.weights)):
            raise ValueError(f"gmm: need {k} positive weights (one per mean), got {self.weights}")
        return self


class CheckerboardTeacherConfig(Strict):
    """A mixture tiling the black squares of a size×size board on [−extent, extent]² with a per_square² grid."""

    name: Literal["checkerboard"] = teacher_name("checkerboard")
    size: int = Field(default=4, ge=2, description="checkerboard: squares per side")
    extent: float = Field(default=2.0, gt=0, description="checkerboard: the board spans [−extent, extent]² (the "
                          "official 2-D data: 4 squares of side 2 on [−4, 4]², i.e. extent 4)")
    per_square: int = Field(default=4, ge=1, description="checkerboard: mixture components per square side")
    std_ratio: float = Field(default=0.25, gt=0, description="checkerboard: component std as a fraction of "
                             "the grid spacing")


class EDMTeacherConfig(Strict):
    """A trained EDM network: an official `.pkl` (network `key`) or a `.pt` / `.safetensors` with its `.json` spec
    beside it (`teacher train` and `teacher convert` write them)."""

    name: Literal["edm"] = teacher_name("edm")
    checkpoint: storage.Location = Field(description="edm: teacher weights, an official .pkl, or a .pt / .safetensors "
                                         "with its .json")
    key: str = Field(default="ema", description="edm: the network in an official .pkl")
    allow_tf32: bool = Field(default=False, description="edm: TF32 matmuls on NVIDIA GPUs")
    use_fp16: bool = Field(default=False, description="edm: the network in float16 (GPUs)")


class DigitsTeacherConfig(Strict):
    """The small EDM teacher shipped with the package, trained on scikit-learn's 8×8 digits (docs/TEACHERS.md)."""

    name: Literal["digits"] = teacher_name("digits")


class DiffusersTeacherConfig(Strict):
    """A local diffusers model: a folder with a UNet2DModel (config.json + diffusion_pytorch_model.safetensors) and
    scheduler_config.json, or a pipeline folder (model_index.json, unet/, scheduler/); docs/TEACHERS.md."""

    name: Literal["diffusers"] = teacher_name("diffusers")
    checkpoint: Path = Field(description="diffusers: the model's local folder (UNet2DModel + scheduler_config.json, "
                             "or a pipeline folder with unet/ and scheduler/), safetensors only")
    vae: Path | None = Field(default=None, description="diffusers: a local AutoencoderKL folder; the teacher then "
                             "runs in its latent space and the pairs are latents (default: the pipeline's vae/ when "
                             "model_index.json names one, else pixel space)")
    guidance: float = Field(default=1.0, ge=0, description="diffusers: classifier-free guidance scale s of a DiT "
                            "teacher, prediction = uncond + s·(cond − uncond) with DiT's null class (1: none)")


TeacherConfig = Annotated[
    Union[CheckerboardTeacherConfig, GMMTeacherConfig, EDMTeacherConfig, DigitsTeacherConfig, DiffusersTeacherConfig],
    Field(discriminator="name"),
]
TEACHERS = {"checkerboard": CheckerboardTeacherConfig, "gmm": GMMTeacherConfig, "edm": EDMTeacherConfig,
            "digits": DigitsTeacherConfig, "diffusers": DiffusersTeacherConfig}


class SamplerConfig(Strict):
    """EDM's deterministic sampler on the σ schedule σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then 0.

    Layers, lowest first: these defaults (EDM's) < the teacher's own (`Teacher.sampler_defaults`: its network's σ
    range, 40 steps above 32 px) < the preset < the flags. Only the fields a preset or flag sets win over the
    teacher's; `generate` resolves them once (`over`) and records the result and its schedule in the manifest."""

    solver: Literal["heun", "euler"] = Field(default="heun", description="ODE solver (default: the teacher's)")
    steps: int = Field(default=18, ge=1, le=10_000, description="sampler steps N (NFE = 2N − 1 for Heun; default: the "
                       "teacher's, 18 up to 32 px, 40 above)")
    sigma_min: float = Field(default=0.002, gt=0, allow_inf_nan=False, description="last noise level of the schedule "
                             "(default: 0.002 clipped to the teacher's range)")
    sigma_max: float = Field(default=80.0, gt=0, allow_inf_nan=False, description="first noise level (std of x_T; "
                             "default: 80 clipped to the teacher's range)")
    rho: float = Field(default=7.0, gt=0, allow_inf_nan=False, description="EDM schedule exponent (1: evenly spaced)")

    @model_validator(mode="after")
    def _schedule(self) -> "SamplerConfig":
        # The ODE runs from sigma_max down to sigma_min: reversed, it writes garbage pairs with exit 0.
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self

    def over(self, defaults: dict[str, Any]) -> "SamplerConfig":
        """The sampler with the fields set by a preset or flag over the teacher's `defaults` (every field set)."""
        explicit = self.model_dump(include=self.model_fields_set)
        try:
            return SamplerConfig.model_validate({**defaults, **explicit})
        except ValidationError as e:
            raise ConfigError(f"sampler: {format_validation(e)} (the teacher's defaults: {defaults}; set by the "
                              f"preset or flags: {explicit})") from None


class GenerateConfig(Strict):
    teacher: TeacherConfig = Field(default_factory=CheckerboardTeacherConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    out: Location = Field(default=Path("runs/pairs"), description="output directory (manifest.json + shards)")
    shards: int = Field(default=8, ge=1, description="number of tar shards")
    pairs_per_shard: int = Field(default=4096, ge=1, description="pairs in each shard")
    seed: int = Field(default=0, ge=0,
                      description="shard k holds seeds seed + k·pairs_per_shard … + pairs_per_shard − 1")
    batch: int = Field(default=1024, ge=1, description="pairs per sampler batch and per tar record")
    trajectory: str = Field(default="none", description="trajectory states stored: none | all | every-K")
    x0_dtype: Dtype = Field(default="float32", description="storage dtype of x_0",
                            json_schema_extra=cli("--x-0-dtype", "--x0-dtype"))
    xT_dtype: Dtype = Field(default="float32", description="storage dtype of x_T",
                            json_schema_extra=cli("--x-T-dtype", "--xT-dtype"))
    workers: int = Field(default=2, ge=1, description="concurrent teacher workers (Ray tasks)")
    threads_per_worker: int = Field(default=1, ge=1, description="torch threads in each worker")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per worker")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs Ray reserves per worker")
    address: str | None = Field(default=None, description=RAY_ADDRESS)
    max_in_flight: int | None = Field(default=None, ge=1, description="tasks queued at once (default: 2 × workers)")
    device: Device = Field(default="auto", description=DEVICE)

    @field_validator("trajectory")
    @classmethod
    def _trajectory(cls, v: str) -> str:
        if v in ("none", "all") or re.fullmatch(r"every-[1-9][0-9]*", v):
            return v
        raise ValueError(f"trajectory must be 'none', 'all' or 'every-K' (K ≥ 1), got {v!r}")

    @model_validator(mode="after")
    def _seeds(self) -> "GenerateConfig":
        # Seeds are stored as int64; sizes that large are refused later anyway (disk), but before any arithmetic.
        if self.seed + self.shards * self.pairs_per_shard >= 2**63:
            raise ValueError(f"seed + shards × pairs_per_shard must stay below 2^63 (int64 seeds); got "
                             f"{self.seed} + {self.shards} × {self.pairs_per_shard}")
        return self

    def identity(self) -> dict[str, Any]:
        """The settings that determine the bytes of every shard (compared on rerun)."""
        return self.model_dump(mode="json", include={"teacher", "sampler", "pairs_per_shard", "seed", "batch",
                                                     "trajectory", "x0_dtype", "xT_dtype"})


class TrajectoryConfig(Strict):
    """Trajectory supervision of a KDM student (pairs that keep trajectory states): every stored state x_k between
    x_T and x_0 is encoded with its time, and its latent must equal the operator carried from z_T over the fraction
    τ_k of the flow. Weights apply to the mean over those states. `taus`, `sigmas` and `intervals` are filled in from
    the pair set's manifest when training starts (and so recorded with the run)."""

    w_latent: float = Field(default=1.0, ge=0, description="weight of mean_k ‖E(x_k, t_k) − K(τ_k) z_T‖²")
    w_rec: float = Field(default=1.0, ge=0, description="weight of mean_k d(x_k, D(E(x_k, t_k), t_k))")
    w_push: float = Field(default=0.0, ge=0, description="weight of mean_k d(x_k, D(K(τ_k) z_T, t_k))")
    w_onward: float = Field(default=0.0, ge=0, description="weight of mean_k ‖z_0 − K(1 − τ_k) z_k‖²: the latent of "
                            "each state carried on to x_0 (what few-step sampling does after a re-encode)")
    taus: list[float] | None = Field(default=None, description="(filled in) progress τ of each stored state: "
                                     "solver step / last step, x_T = 0 … x_0 = 1")
    sigmas: list[float] | None = Field(default=None, description="(filled in) σ (or t) of each stored state")
    intervals: int | None = Field(default=None, ge=1, description="(filled in) dense operators: the flow in this "
                                  "many equal intervals, K(τ) = C^(τ·intervals)")


class StudentConfig(Strict):
    """The student: MLPs for vector data, EDM DDPM++ U-Nets for images (chosen by the data's shape).

    `w_push`, `w_adv` and `distance` left unset take the official setting for the data's kind — images: 1, 1,
    pseudo-Huber (LPIPS is the official distance but needs local weights); vectors (the checkerboard setup): 0, 0, L2.
    """

    kind: Literal["kdm", "kd"] = Field(default="kdm", description="kdm: Koopman student; kd: direct-regression "
                                       "baseline", json_schema_extra=cli("--student"))
    # Vector students (MLPs)
    hidden: int = Field(description="vector students: MLP width", default=256, ge=1)
    depth: int = Field(default=5, ge=1, description="hidden layers per MLP")
    mlp: Literal["official", "linear-head"] = Field(
        default="official", description="official: the KDM 2-D networks — encoders depth × (Linear + Swish) on "
        "[x, t] (t = 0 for E_0, 1 for E_T: the latent is Swish-activated), decoder (depth − 1) × (Linear + Swish) on "
        "[z, 0] then Linear; linear-head: kdm-pipe's earlier MLPs — depth × (Linear + SiLU) then Linear, no time "
        "input (linear latent)")
    latent_dim: int = Field(description="vector students: latent dimension", default=256, ge=1)
    # Image students (U-Nets); defaults are the official CIFAR-10 ones
    model_channels: int = Field(description="image students: U-Net base channels", default=64, ge=1)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2, 2], min_length=1,
                                    description="image students: channel multiplier per resolution")
    num_blocks: int = Field(description="image students: U-Net blocks per resolution", default=4, ge=1)
    attn_resolutions: list[int] = Field(default_factory=lambda: [16],
                                        description="image students: resolutions with self-attention")
    dropout: float = Field(description="image students: dropout", default=0.10, ge=0, lt=1)
    latent_channels: int = Field(description="image students: latent channels", default=1, ge=1)
    projection: int | None = Field(default=None, ge=1, description="p: Linear(H·W·c → p) after each encoder")
    # The Koopman operator
    operator: Literal["affine", "linear", "decomposed"] = Field(default="affine",
                                                                description="the Koopman operator's form")
    spectrum_prior: Literal["none", "uniform", "gradual", "circle"] = Field(
        default="none", description="eigenvalue prior on the operator (dense: eigvals of its weight; decomposed: its "
        "λ, plus the inverse loss on P⁻¹ as the official code adds them together)")
    prior_seed: int = Field(default=0, description="seed of the spectrum prior's draws")
    koopman_control: bool = Field(default=True, description="add B y to the pushed latent when labels exist")
    sigma_z: float = Field(description="std of the noise added to latents in training", default=0.4, ge=0, le=100)
    trajectory: TrajectoryConfig | None = Field(default=None, description="trajectory supervision (off when unset)")
    # The loss (a negative weight maximises its term: the run diverges)
    w_latent: float = Field(default=1.0, ge=0, description="weight of ‖z_0 − C z_T‖²")
    w_rec: float = Field(default=1.0, ge=0, description="weight of the reconstruction d(x_0, D(E(x_0)))")
    w_push: float | None = Field(default=None, ge=0,
                                 description="weight of d(x_0, D(C z_T)) (default: 1 images, 0 vectors)")
    w_reg: float = Field(default=1.0, ge=0, description="weight of the latent regulariser")
    w_adv: float | None = Field(default=None, ge=0, description="adversarial weight (images; 0 turns the discriminator "
                                "off)")
    distance: Literal["l2", "pseudo_huber", "lpips", "l2+lpips"] | None = Field(
        default=None, description="distance d of the losses (default: pseudo_huber images, l2 vectors)")
    huber_c: float = Field(description="pseudo-Huber constant c", default=0.03, gt=0)
    lpips_vgg: Path | None = Field(default=None, description="torchvision's vgg16-397923af.pth (for LPIPS)")
    lpips_lin: Path | None = Field(default=None, description="lpips' weights/v0.1/vgg.pth (for LPIPS)")

    def for_data(self, image: bool) -> "StudentConfig":
        """This config with the unset loss settings filled in for image or vector data; refuses mismatches."""
        w_push, w_adv, dist = (1.0, 1.0, "pseudo_huber") if image else (0.0, 0.0, "l2")
        out = self.model_copy(update={"w_push": unset_or(self.w_push, w_push), "w_adv": unset_or(self.w_adv, w_adv),
                                      "distance": unset_or(self.distance, dist)})
        if not image and (out.w_adv or "lpips" in out.distance):
            raise ConfigError("the adversarial term and LPIPS need image data (C, H, W); for vector data set "
                              "w_adv: 0 and distance: l2 or pseudo_huber")
        return out


def unset_or(value: Any, default: Any) -> Any:
    return default if value is None else value


Beta = Annotated[float, Field(ge=0, lt=1)]


class TrainConfig(Strict):
    data: Location | None = Field(default=None, description="pair directory; with --resume it may be left out: the "
                                  "run's own pairs (where config.json says, or beside the run as split.json records)")
    out: Location = Field(default=Path("runs/train"), description="run directory (checkpoints, logs)")
    student: StudentConfig = Field(default_factory=StudentConfig)
    steps: int = Field(description="optimiser steps", default=4000, ge=1)
    batch: int = Field(description="pairs per step (at most the training pairs)", default=256, ge=1)
    lr: float = Field(description="Adam learning rate (Adam moves each weight by about lr per step whatever the "
                      "gradient's scale: above 1 every run diverges)", default=3e-4, gt=0, le=1)
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.999), description="Adam betas, each in [0, 1)")
    nonfinite_steps: int = Field(default=20, ge=1, description="stop the run (exit 1, the last finite checkpoint "
                                 "kept) after this many consecutive steps with a NaN or inf loss")
    ema: float = Field(description="EMA decay of the student's weights", default=0.9999, ge=0, lt=1)
    ema_rampup: float = Field(
        default=0.05, ge=0, description="EMA warm-up as in EDM: the EMA half-life is at most this fraction of the "
        "steps taken so far (0: a constant decay `ema` from step 1)")
    update_order: Literal["disc-first", "student-first"] = Field(
        default="disc-first", description="with a discriminator: disc-first (official) steps it on this pass's "
        "samples, then the student against the updated discriminator; student-first steps the student, then the "
        "discriminator on the same samples")
    seed: int = Field(default=0, description="seed of initialisation and shuffling")
    holdout_shards: int = Field(default=1, ge=0, description="last shards kept out of training, for evaluation")
    shuffle_buffer: int = Field(description="pairs in the streaming shuffle buffer", default=8192, ge=1)
    loader_workers: int = Field(description="data-loader worker processes", default=1, ge=0)
    log_every: int = Field(description="steps between log lines", default=100, ge=1)
    ckpt_every: int = Field(description="steps between checkpoints", default=1000, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description=DEVICE)
    threads: int | None = Field(description="torch threads (default: torch's)", default=None, ge=1)
    probe_every: int = Field(default=1000, ge=1, description="steps between latent probes on held-out pairs")
    probe_pairs: int = Field(default=256, ge=1, description="held-out pairs per latent probe")
    amp: Literal["off", "bf16"] = Field(default="off", description="bf16 autocast (GPUs; off by default on CPU)")
    tf32: bool = Field(default=False, description="allow TF32 matmuls/convolutions on NVIDIA GPUs")
    compile: bool = Field(default=False, description="torch.compile the student (slow to start; for long runs)")
    tensorboard: bool = Field(default=True, description="also write TensorBoard logs to RUN/tensorboard")
    normalize: Literal["none", "standard"] | None = Field(
        default=None, description="vector data: standardise x_0 with the training shards' mean/std from stats.zarr "
        "(undone at sampling). Default none (measured: docs/BENCHMARKS.md); images are always none (EDM's [-1, 1])")
    normalize_x_T: bool = Field(default=False, description="with normalize: standard, standardise x_T too")


class EvaluateConfig(Strict):
    run: Location = Field(default=Path("runs/train"), description="run directory written by train")
    data: Location | None = Field(default=None, description="pair directory (default: the run's)")
    num: int = Field(default=10000, ge=1, description="held-out pairs compared")
    weights: Literal["auto", "ema", "raw"] = Field(
        default="auto", description="auto: the run's recorded choice (RUN/weights.json): whichever of EMA and raw is "
        "closer in distribution to the teacher on the held-out selection split (never the reported split)")
    seed: int = Field(default=0, description="seed of the metrics' random draws")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description=DEVICE)
    detector: Path | None = Field(default=None, description="TorchScript feature net for image metrics, e.g. "
                                  "inception-2015-12-05.pt (default: pixel features)")
    ref: str | None = Field(default=None, description="FID reference: EDM-format .npz (mu, sigma) or images "
                            "(folder, EDM zip, .npy, sklearn-digits) to compute it from")
    fid_num: int = Field(default=50000, ge=2, description="fresh one-step samples compared with --ref")
    fid_seed: int = Field(default=0, ge=0, description="first seed of those samples (EDM: 0…49999); pick seeds the "
                          "teacher's pairs did not use when --ref is the teacher's own samples")
    batch: int = Field(default=250, ge=1, description="images per detector / student batch")
    set_num: int | None = Field(default=None, ge=2, description="fresh one-step samples compared with the whole "
                                "teacher set's statistics (stats.zarr; default: min(set size, 50,000))")
    steps: int = Field(default=1, ge=1, description="student sampling steps (> 1: trajectory-supervised students)")
    vae: Path | None = Field(default=None, description=VAE_OVERRIDE)


class VerifyConfig(Strict):
    """Settings of `kdm-pipe verify DIR`."""

    data: Location = Field(description="pair directory written by generate or import")


class StatsConfig(Strict):
    """Settings of `kdm-pipe stats DIR`: per-shard statistics merged into DIR/stats.zarr."""

    data: Location = Field(description="pair directory written by generate or import")
    workers: int = Field(description="concurrent Ray tasks", default=2, ge=1)
    address: str | None = Field(default=None, description=RAY_ADDRESS)
    cov_max_dim: int = Field(default=1024, ge=0, description="store covariances only up to this flattened dimension")
    detector: Path | None = Field(default=None, description="image sets: TorchScript feature net whose x_0 feature "
                                  "statistics are stored (default: pixel features)")
    batch: int = Field(default=250, ge=1, description="images per detector batch")
    run: Location | None = Field(default=None, description="a trained run: statistics of its latents over the "
                                  "pairs, into RUN/latents.zarr (instead of the pairs' own statistics)")
    vae: Path | None = Field(default=None, description=VAE_OVERRIDE)


class RefStatsConfig(Strict):
    """Settings of `kdm-pipe stats ref SOURCE --out REF.npz` (FID reference statistics, EDM format) and of
    `kdm-pipe stats ref --from DIR --out REF.npz` (a pair directory's teacher-set statistics from its store)."""

    source: str | None = Field(default=None, description="images: folder, EDM zip, .npy, sklearn-digits, a pair "
                               "directory or a `sample` output")
    data: Location | None = Field(default=None, description="a pair directory whose stats.zarr is exported (the "
                                  "whole teacher set)", json_schema_extra=cli("--from"))
    out: Location = Field(description="the reference .npz to write (mu, sigma)")
    detector: Path | None = Field(default=None, description="TorchScript feature net (default: pixel features)")
    num: int | None = Field(default=None, ge=1, description="images used (default: all)")
    device: Device = Field(default="auto", description=DEVICE)

    @field_validator("out")
    @classmethod
    def _file(cls, v: Any) -> Any:
        if not storage.is_remote(v) and Path(v).is_dir():
            raise ValueError(f"{v} is a directory; pass the path of the .npz file to write")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> RefStatsConfig:
        if (self.source is None) == (self.data is None):
            raise ValueError("give either SOURCE (images) or --from DIR (a pair directory's statistics), not both")
        if self.data is not None and self.num is not None:
            raise ValueError("--num applies to SOURCE images; --from DIR exports the whole teacher set")
        return self


class FilterConfig(Strict):
    """Settings of `kdm-pipe filter DIR --ref SOURCE`: flag and exclude teacher samples that copy a reference image."""

    data: Location = Field(default=Path("runs/pairs"), description="pair directory written by generate or import")
    ref: str = Field(description="the teacher's training images: folder, EDM zip, .npy, sklearn-digits")
    metric: Literal["l2", "features"] = Field(default="l2", description="l2: pixels; features: --detector's space")
    detector: Path | None = Field(default=None, description="TorchScript feature net (with --metric features)")
    rule: Literal["relative", "absolute"] = Field(
        default="relative", description="relative: d1 < threshold · mean(d2..dk) (Carlini et al.); absolute: d1 < "
                                        "threshold (RMS distance per coordinate)")
    threshold: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                    description="default: 0.5 (relative, Carlini et al.'s α), 0.1 (absolute)")
    k: int = Field(default=50, ge=2, description="neighbours searched (the relative rule averages d2..dk)",
                   json_schema_extra=cli("-k", "--k"))
    chunk: int = Field(default=2048, ge=1, description="queries × reference rows per distance block (memory bound)")
    workers: int = Field(description="concurrent Ray tasks", default=2, ge=1)
    gpus_per_worker: float = Field(description="GPUs Ray reserves per task", default=0.0, ge=0)
    address: str | None = Field(default=None, description=RAY_ADDRESS)
    device: Device = Field(default="auto", description=DEVICE)
    replace: bool = Field(default=False, description="replace a filter recorded with other settings")

    @model_validator(mode="after")
    def _detector(self) -> "FilterConfig":
        if (self.metric == "features") != (self.detector is not None):
            raise ValueError("--metric features needs --detector PATH, and --detector is used only with "
                             "--metric features")
        return self


class SampleConfig(Strict):
    """Settings of `kdm-pipe sample RUN --out OUT`."""

    run: Location = Field(description="run directory written by train")
    out: Location = Field(description="output directory (PNGs per seed, samples.npz, grid.png, samples.json)")
    num: int = Field(default=64, ge=1, description="samples, from seeds seed … seed + num − 1")
    seed: int = Field(default=0, ge=0, description="first seed")
    weights: Weights = Field(default="auto", description="auto: the run's recorded choice (RUN/weights.json)")
    class_label: int | None = Field(default=None, description="class for every sample (conditional runs)",
                                    json_schema_extra=cli("--class"))
    batch: int = Field(description="samples per batch", default=250, ge=1)
    steps: int = Field(default=1, ge=1, description="sampling steps (> 1: trajectory-supervised students)")
    device: Device = Field(default="auto", description=DEVICE)
    vae: Path | None = Field(default=None, description=VAE_OVERRIDE)


ExportFormat = Literal["diffusers", "safetensors", "rectified-flow", "kdm-npz", "get", "fastgen"]
STUDENT_FORMATS = ("diffusers", "safetensors")          # of a RUN; the others are of a pair directory


class ExportConfig(Strict):
    """Settings of `kdm-pipe export RUN|DIR --out OUT`."""

    src: Location = Field(description="run directory written by train (diffusers, safetensors) or pair directory "
                          "(rectified-flow, kdm-npz, get, fastgen)")
    out: Path = Field(description="new (or empty) local directory for the exported files")
    format: ExportFormat = Field(default="diffusers", description="a run: diffusers (a pipeline folder diffusers "
                                 "loads: weights, config, pipeline code, model card) or safetensors (weights + "
                                 "config.json); a pair set: rectified-flow (z0.npy, z1.npy), kdm-npz (one .npz per "
                                 "pair), get (latent/ and image/ files), fastgen (WebDataset, one pair per sample)")
    weights: Weights = Field(default="auto", description="a run's weights; auto: its recorded choice "
                             "(RUN/weights.json), as `kdm-pipe sample` uses it")
    device: Device = Field(default="auto", description="device for choosing the weights when the run has not yet")


class TeacherConvertConfig(Strict):
    """Settings of `kdm-pipe teacher convert CHECKPOINT --out OUT`."""

    checkpoint: Path = Field(description="official EDM network pickle (.pkl), read without running its code")
    out: Path = Field(description="new (or empty) directory for model.safetensors + model.json")
    key: str = Field(default="ema", description="the pickle's network to convert")


class AnalyzeConfig(Strict):
    """Settings of `kdm-pipe analyze RUN`."""

    run: Location = Field(description="run directory written by train")
    num: int = Field(default=2000, ge=2, description="held-out pairs analysed")
    seed: int = Field(default=0, description="seed of the clusterings, the noise baseline and the interpolation "
                      "endpoints")
    device: Device = Field(default="auto", description=DEVICE)
    vae: Path | None = Field(default=None, description=VAE_OVERRIDE)


class DemoConfig(Strict):
    """Settings of `kdm-pipe demo`: a preset's whole pipeline into one directory."""

    preset: str = Field(default="digits", description="preset run end to end (digits: real 8×8 images; "
                        "checkerboard-quick: a reduced 2-D setup; checkerboard: the official one, hours on a CPU)",
                        json_schema_extra=cli("--preset", "-p"))
    out: Location = Field(default=Path("runs/demo"), description="directory for pairs/, kdm/, kd/ and report.html")
    scale: float = Field(default=1.0, ge=0.01, le=1.0, description="shrink pairs per shard and training steps (with "
                         "their checkpoint, probe and log intervals); 0.1 is the quick look at every stage and page")
    resume: bool = Field(default=True, description="keep finished shards and runs (re-evaluate only)")


ImportFormat = Literal["kdm-npz", "get", "npy", "rectified-flow", "fastgen"]


class ImportConfig(Strict):
    """Settings of `kdm-pipe import`."""

    format: ImportFormat = Field(description="the source's format")
    src: Path | None = Field(default=None, description="kdm-npz / get / rectified-flow / fastgen: the folder; npy: a "
                             "(T, N, ...) stack")
    out: Location = Field(default=Path("runs/pairs"), description="output directory (manifest.json + shards)")
    x_T: Path | None = Field(default=None, description="npy: the (N, ...) x_T array (with x_0, instead of src)")
    x_0: Path | None = Field(default=None, description="npy: the (N, ...) x_0 array")
    labels: Path | None = Field(default=None, description="npy: (N,) int classes or (N, label_dim) one-hot")
    label_dim: int | None = Field(default=None, ge=1, le=1 << 16,
                                  description="classes, for int labels (default: max + 1; at most 65,536)")
    order: Literal["auto", "xT-first", "x0-first"] = Field(
        default="auto", description="kdm-npz / npy stack: which end of each array is x_T (auto: the noisy one)")
    sigma_max: float | None = Field(default=None, gt=0,
                                    description="std of x_T (default 80; 1 for a (T, N, ...) stack and "
                                    "rectified-flow z0)")
    tolerance: float = Field(default=0.1, gt=0, lt=1, description="relative tolerance of std(x_T) ≈ sigma_max")
    pairs_per_shard: int = Field(default=4096, ge=1, description="at most this many pairs per shard")
    batch: int = Field(default=1024, ge=1, description="pairs per tar record")
    x0_dtype: Dtype = Field(default="float32", description="storage dtype of x_0",
                            json_schema_extra=cli("--x-0-dtype", "--x0-dtype"))
    xT_dtype: Dtype = Field(default="float32", description="storage dtype of x_T",
                            json_schema_extra=cli("--x-T-dtype", "--xT-dtype"))
    trajectory: bool = Field(default=True, description="keep every state of a (T > 2, N, ...) stack or of kdm-npz "
                             "trajectory files (--ends-only: only x_T and x_0)",
                             json_schema_extra=cli("--trajectory/--ends-only"))
    times: list[float] | None = Field(default=None, description="the time (σ or flow-matching t) of each stored state, "
                                      "in the source's order (default: evenly spaced from sigma_max to 0)")

    @model_validator(mode="after")
    def _inputs(self) -> "ImportConfig":
        pair_files = self.x_T is not None or self.x_0 is not None
        if self.format != "npy" and (pair_files or self.labels is not None):
            raise ValueError("--x-T, --x-0 and --labels belong to --format npy")
        if self.format == "npy" and pair_files:
            if self.x_T is None or self.x_0 is None or self.src is not None:
                raise ValueError("npy pairs need both --x-T and --x-0 and no SRC (or SRC alone: a (T, N, ...) stack)")
            if self.order != "auto":
                raise ValueError("--order applies to kdm-npz and (T, N, ...) stacks; --x-T/--x-0 already name the ends")
        elif self.src is None:
            raise ValueError(f"--format {self.format} needs SRC")
        if self.format in ("get", "rectified-flow", "fastgen") and self.order != "auto":
            raise ValueError(f"--order does not apply to --format {self.format} (latent/, z0 and noise are x_T; "
                             f"image/, z1 and real are x_0)")
        return self

    @property
    def stack(self) -> bool:
        return self.format == "npy" and self.src is not None

    @property
    def sigma(self) -> float:
        unit = self.stack or self.format == "rectified-flow"       # these store x_T ~ N(0, I)
        return self.sigma_max if self.sigma_max is not None else (1.0 if unit else 80.0)

    def identity(self) -> dict[str, Any]:
        """The settings that determine the bytes of every shard (compared on rerun)."""
        return self.model_dump(mode="json", exclude={"out", "tolerance"}) | {"sigma_max": self.sigma} | {
            k: str(p.resolve()) for k in ("src", "x_T", "x_0", "labels") if (p := getattr(self, k)) is not None}


class TeacherTrainConfig(Strict):
    data: str = Field(default="sklearn-digits",
                      description="a folder of images, an EDM dataset .zip, an .npy array, or sklearn-digits")
    out: Path = Field(default=Path("runs/teacher"),
                      description="run directory (config.json, train.jsonl, teacher.pt + .json)")
    arch: Literal["ddpmpp", "ncsnpp", "adm"] = Field(default="ddpmpp", description="U-Net preset")
    # Explicit U-Net settings override the arch preset's.
    model_channels: int | None = Field(default=None, ge=1,
                                       description="U-Net base channels (default: the arch preset's)")
    channel_mult: list[int] | None = Field(default=None, min_length=1,
                                           description="channel multiplier per resolution (default: the arch preset's)")
    num_blocks: int | None = Field(description="blocks per resolution (default: the arch preset's)", default=None, ge=1)
    attn_resolutions: list[int] | None = Field(
        default=None, description="resolutions with self-attention (default: the arch preset's)")
    dropout: float = Field(description="dropout", default=0.1, ge=0, lt=1)
    precond: Literal["edm", "vp", "ve"] = Field(default="edm",
                                                description="preconditioning, each with EDM's matching loss")
    cond: bool = Field(default=False, description="condition on the dataset's class labels",
                       json_schema_extra=cli("--cond/--uncond"))
    steps: int = Field(description="optimiser steps", default=4000, ge=1)
    batch: int = Field(description="images per step", default=64, ge=1)
    lr: float = Field(description="Adam learning rate", default=1e-3, gt=0)
    lr_warmup: int = Field(default=200, ge=0, description="steps of linear learning-rate warm-up")
    ema_halflife_kimg: float = Field(description="EMA half-life in thousands of images", default=10.0, gt=0)
    ema_rampup: float | None = Field(default=0.05, gt=0, description="half-life ≤ this × images seen (EDM)")
    ema_beta: float | None = Field(default=None, ge=0, lt=1,
                                   description="fixed EMA decay per step (overrides the half-life)")
    P_mean: float = Field(default=-1.2, description="mean of ln σ in training (edm)")
    P_std: float = Field(default=1.2, description="std of ln σ in training (edm)")
    sigma_data: float = Field(description="σ_data of the data (edm)", default=0.5, gt=0)
    seed: int = Field(default=0, description="seed of initialisation, batches and noise")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description=DEVICE)
    threads: int | None = Field(description="torch threads (default: torch's)", default=None, ge=1)
    log_every: int = Field(description="steps between log lines", default=50, ge=1)
    ckpt_every: int = Field(description="steps between checkpoints", default=1000, ge=1)
    grid: int = Field(default=64, ge=0, description="samples in the final grid (seeds 0 … grid − 1)")


class Preset(Strict):
    """A whole pipeline: what `kdm-pipe demo --preset NAME` runs."""

    description: str = ""
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    filter: FilterConfig | None = Field(default=None, description="the memorisation filter, run after verify")


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    p = PRESET_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(f"unknown preset {name_or_path!r}; known presets: {known} (or pass a path to a .yaml file)")
    return p


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Raw preset sections (validated when a stage config is built from them)."""
    path = preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the preset as UTF-8 YAML") from None
    if data is None or data == {}:       # an empty file would otherwise run the built-in defaults silently
        raise ConfigError(f"{path}: the preset is empty; give at least one of the sections generate/train/evaluate")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections generate/train/evaluate, "
                          f"got {type(data).__name__}")
    try:
        Preset.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation(e)}") from None
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(model: type[BaseModel], *layers: dict[str, Any], where: str = "configuration"):
    """Validate the merge of config layers (preset section, then CLI flags) into `model`; ConfigError if invalid."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, {k: v for k, v in layer.items() if v is not None})
    try:
        return model.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation(e)}") from None


def resolve(model: type[BaseModel], section: str, preset: str | None, flags: dict[str, Any]) -> Any:
    """`model` from the preset's `section` (if a preset is named), then the flags."""
    base = load_preset(preset).get(section, {}) if preset else {}
    return build(model, base, flags, where=f"{section} config" + (f" (preset {preset})" if preset else ""))


def generate_config(preset: str | None, flags: dict[str, Any]) -> GenerateConfig:
    """generate's config: the preset's section, then the flags; a teacher named by the flags that is not the preset's
    starts from its own defaults, not from the preset's teacher settings."""
    base = load_preset(preset).get("generate", {}) if preset else {}
    name = flags.get("teacher", {}).get("name")
    if name is not None:
        if name not in TEACHERS:
            raise ConfigError(f"unknown teacher {name!r}; choose one of: {', '.join(TEACHERS)}")
        if base.get("teacher", {}).get("name") != name:
            base = {**base, "teacher": {}}
    return build(GenerateConfig, base, flags, where="generate config" + (f" (preset {preset})" if preset else ""))


def format_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key (not allowed)" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
