"""The 2-D checkerboard: which points lie on its black squares (the analytic 2-D teacher declares the board)."""

from __future__ import annotations

import numpy as np

from kdm_pipe.teachers.analytic import board_mask


def checkerboard_mask(x: np.ndarray, size: int = 4, extent: float = 2.0) -> np.ndarray:
    """True where a point of x (N, 2) lies on a black square of the size×size board on [−extent, extent)²
    (see `kdm_pipe.teachers.analytic.board_mask`)."""
    return board_mask(x, size, extent)


def off_support_fraction(x: np.ndarray, **kw: float) -> float:
    """Fraction of points not on a black square (kw go to checkerboard_mask)."""
    return float(1.0 - checkerboard_mask(x, **kw).mean())
