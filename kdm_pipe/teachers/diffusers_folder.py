"""Local diffusers models as teachers: a `UNet2DModel` with its scheduler config, or a `DiffusionPipeline` folder.

This module checks a folder (its config is kdm_pipe.config.DiffusersTeacherConfig) without torch or diffusers;
kdm_pipe/teachers/diffusers.py imports the denoisers (diffusers_model.py), and so diffusers, only when the
teacher is built. Weights are read from safetensors only (a pickled `.bin` is refused, never unpickled), from the
folder only (no download), and no code from the folder is run: the model class must be diffusers' own
`UNet2DModel`, the scheduler one of the classes below, the VAE of a latent teacher diffusers' `AutoencoderKL`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdm_pipe.config import DiffusersTeacherConfig
from kdm_pipe.errors import ConfigError

WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED = "diffusion_pytorch_model.bin"
INSTALL = "pip install 'kdm-pipe[diffusers]'"

# Schedulers over a discrete variance-preserving (DDPM) noise schedule: they share its betas → ᾱ_t.
VP_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                 "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                 "DEISMultistepScheduler", "KDPM2DiscreteScheduler"}
# Rectified-flow schedulers: x_t = (1 − t)·x_0 + t·ε, the model predicts v = ε − x_0 at timestep t·T.
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VAE_CLASS = "AutoencoderKL"
# The denoising networks: a UNet, or a class-conditional DiT (older folders name it Transformer2DModel; diffusers
# loads those as DiTTransformer2DModel when norm_type is ada_norm_zero, which check_dit requires).
NETS = {"UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel"}


@dataclass(frozen=True)
class VAEFolder:
    """A checked AutoencoderKL folder: its path and config."""

    path: Path
    config: dict[str, Any]

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel a side: each encoder block but the last halves the resolution."""
        return 2 ** (len(self.config.get("block_out_channels", [64])) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.get("latent_channels", 4)

    @property
    def scaling_factor(self) -> Any:
        return self.config.get("scaling_factor", 0.18215)          # AutoencoderKL's default

    @property
    def shift_factor(self) -> Any:
        return self.config.get("shift_factor") or 0.0

    def image_shape(self, latent_size: tuple[int, int]) -> list[int]:
        return [self.config.get("out_channels", 3), *(s * self.factor for s in latent_size)]


@dataclass(frozen=True)
class ModelFolder:
    """What a checked folder holds: the denoising network's folder and config (`unet`: a UNet2DModel or a DiT), the
    scheduler's config and, for a latent teacher, its VAE."""

    unet_dir: Path
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    vae: VAEFolder | None = None

    @property
    def dit(self) -> bool:
        return self.unet["_class_name"] != "UNet2DModel"

    @property
    def channels(self) -> int:
        return self.unet.get("in_channels", 4 if self.dit else 3)

    @property
    def classes(self) -> int:
        """Class labels the network takes (0: unconditional); a DiT's label table has one more row, the null class
        of classifier-free guidance."""
        return (self.unet.get("num_embeds_ada_norm") if self.dit else self.unet.get("num_class_embeds")) or 0

    @property
    def kind(self) -> Literal["vp", "flow"]:
        return "flow" if self.scheduler["_class_name"] in FLOW_SCHEDULERS else "vp"

    @property
    def size(self) -> tuple[int, int]:
        s = self.unet["sample_size"]
        return (s, s) if isinstance(s, int) else (s[0], s[1])

    @property
    def prediction(self) -> str:
        return "flow_velocity" if self.kind == "flow" else self.scheduler.get("prediction_type", "epsilon")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"diffusers model: {path} is missing; {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"diffusers model: {path} is not a readable JSON object; replace it with the file "
                          f"save_pretrained wrote")
    return data


def weights_file(folder: Path, what: str) -> Path:
    """The folder's safetensors weights; pickled ones are refused, never opened."""
    if not (folder / WEIGHTS).is_file():
        hint = (f"it holds only pickled weights ({PICKLED}), which are never unpickled: convert them to safetensors "
                f"(load once where you trust the file, then save_pretrained(..., safe_serialization=True))"
                if (folder / PICKLED).is_file() else "save the model with save_pretrained (safetensors)")
        raise ConfigError(f"{what}: {folder} has no {WEIGHTS}; {hint}")
    return folder / WEIGHTS


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def vae_folder(path: Path, named_by: str) -> VAEFolder:
    """Check a VAE folder without loading it (`named_by`: where the folder was named, for the refusals)."""
    what = f"diffusers VAE ({named_by})"
    if not path.is_dir():
        raise ConfigError(f"{what}: {path} is not a directory; pass an AutoencoderKL folder written by save_pretrained")
    config = read_json(path / "config.json", "an AutoencoderKL folder holds the config.json save_pretrained writes")
    if config.get("_class_name") != VAE_CLASS:
        raise ConfigError(f"{what}: {path / 'config.json'} describes a {config.get('_class_name')!r}; latent "
                          f"teachers take a {VAE_CLASS} (a VQModel or another autoencoder is not supported)")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise ConfigError(f"{what}: {path / 'config.json'} sets {key}: per-channel latent normalisation is not "
                              f"supported (only scaling_factor and shift_factor)")
    folder = VAEFolder(path, config)
    if not (finite(folder.scaling_factor) and folder.scaling_factor > 0):
        raise ConfigError(f"{what}: scaling_factor {folder.scaling_factor!r} in {path / 'config.json'} is not a "
                          f"positive number")
    if not finite(folder.shift_factor):
        raise ConfigError(f"{what}: shift_factor {folder.shift_factor!r} in {path / 'config.json'} is not a number")
    weights_file(path, what)
    return folder


def pipeline_vae(root: Path) -> Path | None:
    """The VAE folder a pipeline's model_index.json names (None: a pixel-space pipeline)."""
    index = read_json(root / "model_index.json", "a pipeline folder holds the model_index.json save_pretrained writes")
    if index.get("vqvae") is not None:
        raise ConfigError(f"diffusers model: {root / 'model_index.json'} names a vqvae ({index['vqvae']}); latent "
                          f"teachers take an {VAE_CLASS} (VQ latents are not supported)")
    entry = index.get("vae")
    if entry is None:
        return None
    if entry != ["diffusers", VAE_CLASS]:
        raise ConfigError(f"diffusers model: {root / 'model_index.json'} names the vae {entry}; latent teachers take "
                          f"diffusers' {VAE_CLASS}")
    return root / "vae"


def model_folder(root: Path, vae: Path | None = None) -> ModelFolder:
    """Check a model folder (and its VAE: `vae`, else a pipeline's vae/) without loading it: every refusal names the
    file and what to do."""
    if not root.is_dir():
        raise ConfigError(f"diffusers model {root} is not a directory; pass --checkpoint with a folder written by "
                          f"save_pretrained (UNet2DModel + scheduler_config.json, or a pipeline folder)")
    pipeline = (root / "model_index.json").is_file()
    transformer = pipeline and (root / "transformer").is_dir() and not (root / "unet").is_dir()
    unet_dir = (root / "transformer" if transformer else root / "unet") if pipeline else root
    sched = root / "scheduler" / "scheduler_config.json" if pipeline else root / "scheduler_config.json"
    unet = read_json(unet_dir / "config.json", "a UNet2DModel or DiT folder holds the config.json save_pretrained "
                     "writes")
    where = unet_dir / "config.json"
    if unet.get("_class_name") not in NETS:
        raise ConfigError(f"diffusers model: {where} describes a {unet.get('_class_name')!r}; the diffusers teacher "
                          f"takes a UNet2DModel (unconditional or class-labelled) or a DiTTransformer2DModel")
    size = unet.get("sample_size")
    if not (isinstance(size, int) and size > 0 or isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)):
        raise ConfigError(f"diffusers model: {where} gives no image size (sample_size: {size!r}); set it to the "
                          f"resolution the model was trained at")
    weights_file(unet_dir, "diffusers model")
    scheduler = read_json(sched, "save the scheduler with save_pretrained beside the model")
    name = scheduler.get("_class_name")
    if name not in VP_SCHEDULERS | FLOW_SCHEDULERS:
        raise ConfigError(f"diffusers model: scheduler {name!r} in {sched} is not supported; use a DDPM-schedule "
                          f"scheduler ({', '.join(sorted(VP_SCHEDULERS))}) or a flow-matching one "
                          f"({', '.join(sorted(FLOW_SCHEDULERS))})")
    named = vae is not None
    vae = vae if named else pipeline_vae(root) if pipeline else None
    latent = None if vae is None else vae_folder(vae, "--vae" if named else f"vae/ of {root}")
    folder = ModelFolder(unet_dir, unet, scheduler, latent)
    if latent is not None and latent.latent_channels != folder.channels:
        raise ConfigError(f"diffusers VAE {vae} makes {latent.latent_channels}-channel latents but the model in "
                          f"{unet_dir} takes {folder.channels} channels; pass the VAE the model was trained with")
    if folder.prediction not in PREDICTIONS + ("flow_velocity",):
        raise ConfigError(f"diffusers model: prediction_type {folder.prediction!r} in {sched} is not one of "
                          f"{', '.join(PREDICTIONS)}")
    (check_dit if folder.dit else check_unet)(unet, where)
    return folder


def check_unet(unet: dict[str, Any], where: Path) -> None:
    if unet.get("out_channels", 3) != unet.get("in_channels", 3):
        raise ConfigError(f"diffusers model: {where} has {unet.get('out_channels')} output channels for "
                          f"{unet.get('in_channels')} input channels; a learned-variance UNet is not supported (the "
                          f"teacher needs the mean prediction only)")
    if unet.get("time_embedding_type", "positional") not in ("positional", "learned"):
        raise ConfigError(f"diffusers model: time_embedding_type {unet['time_embedding_type']!r} in {where} is not "
                          f"supported (positional or learned)")
    if unet.get("class_embed_type") is not None:
        raise ConfigError(f"diffusers model: class_embed_type {unet['class_embed_type']!r} in {where} is not "
                          f"supported; class labels go through num_class_embeds")


def check_dit(dit: dict[str, Any], where: Path) -> None:
    c, out, patch = dit.get("in_channels", 4), dit.get("out_channels"), dit.get("patch_size", 2)
    if out not in (None, c, 2 * c):
        raise ConfigError(f"diffusers model: {where} has {out} output channels for {c} input channels; a DiT predicts "
                          f"C channels, or 2C with a learned variance (whose first C are the prediction)")
    if dit.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not dit.get("num_embeds_ada_norm"):
        raise ConfigError(f"diffusers model: {where} is not a class-conditional DiT (norm_type ada_norm_zero with "
                          f"num_embeds_ada_norm classes)")
    size = dit["sample_size"]
    if not isinstance(patch, int) or patch < 1 or any(s % patch for s in ([size] if isinstance(size, int) else size)):
        raise ConfigError(f"diffusers model: {where}: sample_size {size} is not a multiple of patch_size {patch}")


def summary(cfg: DiffusersTeacherConfig) -> str:
    """What the folder makes, from its configs alone (`generate --dry-run`): the network, the space it samples in and,
    for a latent teacher, the VAE and the decoded images."""
    folder = model_folder(cfg.checkpoint, cfg.vae)
    dims = lambda shape: "×".join(map(str, shape))  # noqa: E731
    shape = dims((folder.channels, *folder.size))
    labels = f", {folder.classes} classes" if folder.classes else ""
    net = f"diffusers teacher: {folder.unet['_class_name']} ({folder.kind}, {folder.prediction}{labels})"
    if folder.vae is None:
        return f"{net} on {shape} images"
    vae = folder.vae
    return (f"{net} on {shape} latents of the VAE {vae.path} (scaling_factor {vae.scaling_factor}, shift_factor "
            f"{vae.shift_factor}); decoded images {dims(vae.image_shape(folder.size))}")
