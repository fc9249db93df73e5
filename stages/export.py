"""export: a trained student (kdm_pipe/export.py) or a pair set (kdm_pipe/interop.py) as files other tools load.

`--format diffusers` → OUT is a pipeline folder: `DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`
runs it without kdm-pipe, and its samples from seed s equal `kdm-pipe sample RUN --seed s` bit for bit on CPU
(same weights: the run's recorded choice unless --weights says otherwise). `--format safetensors` → OUT holds
model.safetensors + config.json. A pair directory DIR exports as rectified-flow (z0.npy, z1.npy), kdm-npz (one
.npz per pair), get (latent/ and image/ files) — each of which `kdm-pipe import` reads back — or fastgen
(WebDataset, one pair per sample). OUT is built in a
temporary directory beside it and renamed into place at the end: an export that fails leaves no OUT behind. RUN and
DIR may be s3:// URLs; OUT is local.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from kdm_pipe import export, interop, storage
from kdm_pipe.config import STUDENT_FORMATS, ConfigError, ExportConfig
from kdm_pipe.evaluation import chosen_weights
from kdm_pipe.integrity import checked_manifest
from kdm_pipe.manifest import MANIFEST
from kdm_pipe.run import EVAL, working
from kdm_pipe.runtime import pick_device
from kdm_pipe.trained import load_students


def run(cfg: ExportConfig) -> Path:
    out = Path(cfg.out)
    storage.check_new_dir(out, "--out")
    if cfg.format in STUDENT_FORMATS:
        return student(cfg, out)
    directory = storage.location(cfg.src)
    with storage.remote_errors(directory, "pair directory", ConfigError):
        if not (directory / MANIFEST).is_file():
            raise ConfigError(f"--format {cfg.format} exports a pair set, and {directory} is not a pair directory "
                              f"(no {MANIFEST}); pass the --out directory of generate or import")
    manifest = checked_manifest(directory)
    with storage.staged_dir(out) as tmp:
        n = interop.WRITERS[cfg.format](tmp, directory, manifest)
    print(f"{out}: {n} pairs of {directory} in {cfg.format} format")
    return out


def student(cfg: ExportConfig, out: Path) -> Path:
    with working(cfg.src) as r:
        latent = r.require().manifest().latent
        if latent is not None and cfg.format == "diffusers":       # before the weights choice is recorded
            raise ConfigError(f"{r} was trained on VAE latents and the exported pipeline does not decode them "
                              f"(its samples would be latents shown as images); export --format safetensors "
                              f"(config.json records the VAE) and decode as docs/TEACHERS.md says")
        device = pick_device(cfg.device)                             # where the weights choice is computed
        models, _, manifest, step, ckpt = load_students(r.path, device=device)
        which = chosen_weights(r.path, cfg.weights, device, models, ckpt)
        model = models[which].cpu()                                  # the exported weights
        args, state = export.describe(model, manifest)
        provenance = {"run": str(r), "step": step, "weights": which, "kdm_pipe_version": version("kdm-pipe"),
                      "teacher": manifest.teacher, "pairs": manifest.num_pairs,
                      "x_T": "sigma_max * z, z ~ N(0, I) from torch.Generator().manual_seed(seed % 2**32), "
                             "then the class label from the same generator"}
        if latent is not None:
            provenance["latent"] = latent.model_dump()
        evaluation = json.loads((r.path / EVAL).read_text()) if (r.path / EVAL).is_file() else None
        card = export.model_card(args, manifest, provenance, evaluation)
    with storage.staged_dir(out) as tmp:
        export.WRITERS[cfg.format](tmp, args, state, provenance, card)
    print(f"{out}: {cfg.format} export of {r} step {step} ({which} weights, {sum(t.numel() for t in state.values())} "
          f"parameters and buffers)")
    return out
