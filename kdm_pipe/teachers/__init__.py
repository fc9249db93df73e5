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

TeacherConfig = Annotated[Union[CheckerboardTeacherConfig, GMMTeacherConfig], Field(discriminator="name")]

_BUILDERS = {"checkerboard": build_checkerboard, "gmm": build_gmm}
TEACHERS = {"checkerboard": CheckerboardTeacherConfig, "gmm": GMMTeacherConfig}


def build_teacher(cfg) -> Teacher:
    return _BUILDERS[cfg.name](cfg)


__all__ = ["Teacher", "TeacherConfig", "TEACHERS", "build_teacher"]
