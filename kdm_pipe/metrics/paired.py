"""Per-pair errors between student and teacher outputs for the same x_T."""

from __future__ import annotations

import numpy as np


def paired_errors(student: np.ndarray, teacher: np.ndarray, data_range: float = 2.0) -> dict[str, float]:
    """MSE, RMSE = √MSE, MAE and PSNR of (N, d) arrays; MSE and PSNR are per-sample values averaged over N.

    PSNR_i = 10·log10(range² / MSE_i) with MSE_i clipped at 1e-12 so exact matches stay finite;
    the default range 2 fits images in [−1, 1].
    """
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"expected two (N, d) arrays of one shape, got {student.shape} and {teacher.shape}")
    diff = student - teacher
    mse_i = np.mean(diff**2, axis=1)
    mse = float(mse_i.mean())
    psnr = 10.0 * np.log10(data_range**2 / np.maximum(mse_i, 1e-12))
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.abs(diff).mean()), "psnr": float(psnr.mean())}
