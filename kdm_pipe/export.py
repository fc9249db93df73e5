"""A trained student as files other tools load: a diffusers pipeline folder, or safetensors weights + config.json.

    --format diffusers                       --format safetensors
    OUT/model_index.json                     OUT/model.safetensors
    OUT/pipeline.py    KDMPipeline           OUT/config.json
    OUT/sampling.py    (kdm_pipe/sampling.py)
    OUT/README.md      the model card
    OUT/student/config.json, diffusion_pytorch_model.safetensors
    OUT/student/student.py  KDMStudent (kdm_pipe/exported/student.py)
    OUT/student/layers.py, unets.py, mlp.py, koopman.py   (kdm-pipe's own network modules, copied)

The exported modules import torch, numpy, PIL and diffusers only: the folder runs without kdm-pipe. Both formats
hold the same weights and the same KDMStudent arguments (docs/FORMATS.md).
"""
from __future__ import annotations

import importlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdm_pipe.errors import ConfigError
from kdm_pipe.manifest import Manifest
from kdm_pipe.normalization import Standardized
from kdm_pipe.student.image import ImageStudent
from kdm_pipe.student.kdm import KDM

PACKAGE = Path(__file__).resolve().parent
# Files of the exported folder copied from kdm-pipe: the one source of the networks and of the per-seed noise.
COPIED = {"sampling.py": PACKAGE / "sampling.py", "pipeline.py": PACKAGE / "exported" / "pipeline.py",
          "student/student.py": PACKAGE / "exported" / "student.py",
          "student/layers.py": PACKAGE / "networks" / "layers.py",
          "student/unets.py": PACKAGE / "networks" / "unets.py",
          "student/mlp.py": PACKAGE / "networks" / "mlp.py",
          "student/koopman.py": PACKAGE / "student" / "koopman.py"}
WEIGHTS = "diffusion_pytorch_model.safetensors"
NORM_BUFFERS = ("mean_0", "std_0", "mean_T", "std_T")


def requirement(module: str) -> Any:
    """An optional dependency of export, or ConfigError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"export needs {module.split('.')[0]}: pip install 'kdm-pipe[diffusers]'") from None


def describe(model: nn.Module, manifest: Manifest) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The KDMStudent arguments of a trained student and the weights its one-step sampler reads (under the
    student's own names: E_T, C [+ B], D and the projections, or the KD network; not E_0 nor the loss's networks)."""
    student = model.student if isinstance(model, Standardized) else model
    image, kdm = isinstance(student, ImageStudent), isinstance(student, KDM)
    nets = ["enc_T", "dec"] if kdm else ["net"]
    args: dict[str, Any] = {"kind": "kdm" if kdm else "kd", "family": "image" if image else "vector",
                            "shape": list(manifest.shape), "label_dim": manifest.label_dim,
                            "sigma_max": manifest.sigma_max, "networks": {n: student.specs[n] for n in nets},
                            "standardize": {"x_T": model.x_T} if isinstance(model, Standardized) else None}
    keep = {*nets, "x_T_scale", *NORM_BUFFERS}
    if kdm:
        k = student.koopman
        args["operator"] = {"dim": k.dim, "kind": k.kind, "label_dim": k.label_dim, "intervals": k.intervals}
        keep |= {"koopman.op", "koopman.control"}
        if image:
            args |= {"latent_channels": student.cfg.latent_channels, "projection": student.cfg.projection or 0}
            keep |= {"proj_T", "unproj"}
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("student.") if isinstance(model, Standardized) else name
        parts = name.split(".")
        if parts[0] in keep or ".".join(parts[:2]) in keep:
            state[name] = tensor.detach().cpu().contiguous().clone()      # safetensors: no shared storage
    return args, state


def write_student(folder: Path, weights: str, args: dict[str, Any], state: dict[str, torch.Tensor],
                  extra: dict[str, Any]) -> None:
    """folder/`weights` (safetensors) + folder/config.json: the KDMStudent arguments, after `extra` (keys with a
    leading underscore, which diffusers does not pass to the constructor)."""
    save_file = requirement("safetensors.torch").save_file
    folder.mkdir(parents=True)
    save_file(state, str(folder / weights), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"_class_name": "KDMStudent", **extra, **args}, indent=1) + "\n")


def write_safetensors(out: Path, args: dict[str, Any], state: dict[str, torch.Tensor], provenance: dict,
                      card: str) -> None:
    """OUT/model.safetensors + OUT/config.json (`_kdm_pipe`: where the weights came from); no model card."""
    write_student(out, "model.safetensors", args, state, {"_kdm_pipe": provenance})


def write_diffusers(out: Path, args: dict[str, Any], state: dict[str, torch.Tensor], provenance: dict,
                    card: str) -> None:
    """The diffusers pipeline folder (module docstring); load it with
    `DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`."""
    requirement("diffusers")
    extra = {"_diffusers_version": version("diffusers"), "_kdm_pipe": provenance}
    write_student(out / "student", WEIGHTS, args, state, extra)
    for name, source in COPIED.items():
        shutil.copyfile(source, out / name)
    index = {"_class_name": ["pipeline", "KDMPipeline"], "_diffusers_version": extra["_diffusers_version"],
             "student": ["student", "KDMStudent"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
    (out / "README.md").write_text(card)


WRITERS = {"diffusers": write_diffusers, "safetensors": write_safetensors}


def model_card(args: dict[str, Any], manifest: Manifest, provenance: dict[str, Any],
               evaluation: dict[str, Any] | None) -> str:
    """README.md of a diffusers folder: what the student is, what it was distilled from, how it was evaluated."""
    teacher, identity = manifest.teacher, manifest.source.get("identity") or {}
    sampler = identity.get("sampler") or {}
    solver = (f"{sampler.get('solver', '?')}, {sampler.get('steps', '?')} steps, NFE {manifest.nfe}" if sampler
              else f"not recorded (pairs imported from {identity.get('format', 'another tool')})")
    kind = ("KDM (Koopman distillation): x̂_0 = D(C(E_T(x_T)) [+ B y])" if args["kind"] == "kdm"
            else "KD baseline: x̂_0 = G(x_T)")
    operator = args.get("operator")
    rows = [("student", f"{kind}; {args['family']} networks"
             + (f"; operator {operator['kind']} on {operator['dim']} latents" if operator else "")),
            ("teacher", f"{teacher.get('name', '?')} (fingerprint sha256 {str(teacher.get('sha256', '?'))[:16]}…)"),
            ("teacher solver", solver),
            ("pairs", f"{manifest.num_pairs} (x_T, x_0) pairs in {len(manifest.shards)} shards"),
            ("data", f"shape {args['shape']}, {args['label_dim'] or 'no'} classes, x_T = σ_max·z with σ_max = "
                     f"{args['sigma_max']:g}, z from one generator per seed"),
            ("weights", f"{provenance['weights']} weights of run `{provenance['run']}` at step {provenance['step']}"),
            ("sampling", "one step: 2 network passes (E_T and D) per sample" if args["kind"] == "kdm"
             else "one step: 1 network pass per sample")]
    lines = ["---", "library_name: diffusers", "tags: [kdm-pipe, koopman-distillation, one-step-generation]", "---",
             "", f"# One-step student of {teacher.get('name', 'a diffusion teacher')}", "",
             "Exported by `kdm-pipe export`. Samples from seed s equal `kdm-pipe sample RUN --seed s` bit for bit "
             "on CPU (same batch size). The folder runs without kdm-pipe: its networks are plain torch modules "
             "in `student/`.", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "## Evaluation", "", *evaluation_lines(evaluation), "", "## Use", "", "```python",
             "from diffusers import DiffusionPipeline", "",
             'pipe = DiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER", trust_remote_code=True)',
             "out = pipe(seeds=range(16))    # out.samples: uint8 NHWC images (or float vectors), out.seeds, "
             "out.labels", "```", ""]
    return "\n".join(lines)


def evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    """The FID protocol and result of RUN/eval.json, as far as it recorded them."""
    if evaluation is None:
        return ["Not evaluated (the run has no eval.json): `kdm-pipe evaluate RUN --ref REF` measures FID."]
    out = []
    fid = evaluation.get("fid")
    if fid:
        name, value = ("FID", fid["fid"]) if "fid" in fid else ("Fréchet distance", fid.get("frechet_distance"))
        out.append(f"- {name} {value:.3f}: {fid.get('num_samples')} one-step samples (seeds "
                   f"{fid.get('seeds', '?')}) against the reference `{fid.get('reference', 'not recorded')}`, "
                   f"features of {fid.get('detector')}")
    fd_set = evaluation.get("fd_set") or {}
    if "fd" in fd_set:
        out.append(f"- Fréchet distance to the teacher's pair set {fd_set['fd']:.3f}: {fd_set['num_samples']} "
                   f"samples against {fd_set['num_reference']} teacher samples, features of {fd_set['detector']}")
    student = evaluation.get("student") or {}
    if "fd_teacher" in student:
        out.append(f"- Fréchet distance to held-out teacher samples {student['fd_teacher']:.3f} "
                   f"({evaluation.get('detector', '?')}; {evaluation.get('num_pairs')} held-out pairs)")
    return out or ["eval.json records no distance of this student's samples."]
