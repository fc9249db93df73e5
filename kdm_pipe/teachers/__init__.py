"""Teacher registry: a config (discriminated by `name`) builds a Teacher."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from kdm_pipe.teachers.analytic import (
    CheckerboardTeacherConfig,
    GMMTeacherConfig,
    build_checkerboard,
    build_gmm,
)
from kdm_pipe.teachers.base import Teacher
from kdm_pipe.teachers.diffusers import DiffusersTeacherConfig, build_diffusers
from kdm_pipe.teachers.edm import DigitsTeacherConfig, EDMTeacherConfig, build_digits, build_edm

TeacherConfig = Annotated[
    Union[CheckerboardTeacherConfig, GMMTeacherConfig, EDMTeacherConfig, DigitsTeacherConfig, DiffusersTeacherConfig],
    Field(discriminator="name"),
]

_BUILDERS = {"checkerboard": build_checkerboard, "gmm": build_gmm, "edm": build_edm, "digits": build_digits,
             "diffusers": build_diffusers}
TEACHERS = {"checkerboard": CheckerboardTeacherConfig, "gmm": GMMTeacherConfig, "edm": EDMTeacherConfig,
            "digits": DigitsTeacherConfig, "diffusers": DiffusersTeacherConfig}


def build_teacher(cfg) -> Teacher:
    return _BUILDERS[cfg.name](cfg)


__all__ = ["Teacher", "TeacherConfig", "TEACHERS", "build_teacher"]
