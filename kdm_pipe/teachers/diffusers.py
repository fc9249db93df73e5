"""The diffusers teacher: a local folder checked (kdm_pipe.teachers.diffusers_folder, no torch), then loaded as a
denoiser (kdm_pipe.teachers.diffusers_model, which needs the optional diffusers install)."""

from __future__ import annotations

from kdm_pipe.config import DiffusersTeacherConfig
from kdm_pipe.errors import ConfigError
from kdm_pipe.teachers.diffusers_folder import INSTALL, model_folder


def build_diffusers(cfg: DiffusersTeacherConfig):
    folder = model_folder(cfg.checkpoint, cfg.vae)
    try:
        from kdm_pipe.teachers.diffusers_model import load_teacher
    except ImportError as e:
        raise ConfigError(f"the diffusers teacher needs diffusers and safetensors ({e}); {INSTALL}") from None
    if cfg.guidance != 1 and not folder.dit:
        raise ConfigError(f"--guidance {cfg.guidance}: classifier-free guidance needs a null class, which only DiT "
                          f"teachers have ({folder.unet_dir} holds a {folder.unet['_class_name']}); drop --guidance")
    return load_teacher(folder, cfg.guidance)
