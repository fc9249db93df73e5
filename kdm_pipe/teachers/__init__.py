"""Teacher registry: a config from kdm_pipe.config (discriminated by `name`) builds a Teacher.

The builders import torch and the networks, so they are imported when a teacher is built, not when the registry is
(the command line imports the configs only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdm_pipe.config import TEACHERS, TeacherConfig

if TYPE_CHECKING:
    from kdm_pipe.teachers.base import Teacher


def build_teacher(cfg) -> Teacher:
    from kdm_pipe.teachers import analytic, diffusers, edm
    builders = {"checkerboard": analytic.build_checkerboard, "gmm": analytic.build_gmm, "edm": edm.build_edm,
                "digits": edm.build_digits, "diffusers": diffusers.build_diffusers}
    return builders[cfg.name](cfg)


__all__ = ["TeacherConfig", "TEACHERS", "build_teacher"]
