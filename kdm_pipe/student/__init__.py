"""Students: MLPs for vector pairs, U-Nets for image pairs; `build_student` picks by the data's shape."""
from __future__ import annotations

import math

from torch import nn

from kdm_pipe.config import StudentConfig
from kdm_pipe.student.image import build_image_student
from kdm_pipe.student.vector import build_vector_student


def is_image(shape: tuple[int, ...] | list[int]) -> bool:
    return len(shape) == 3


def build_student(cfg: StudentConfig, shape: tuple[int, ...] | list[int], label_dim: int,
                  sigma_max: float) -> nn.Module:
    """The student for data of `shape`. Image students take x_T unscaled (as KDM does); vector ones scale it by
    1/σ_max (the official 2-D setup draws x_T ~ N(0, I))."""
    if is_image(shape):
        return build_image_student(cfg, tuple(shape), label_dim)
    return build_vector_student(cfg, math.prod(shape), label_dim, sigma_max)
