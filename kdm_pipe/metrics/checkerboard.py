"""The 2-D checkerboard: which points lie on its black squares (the analytic 2-D teacher declares the board)."""

from __future__ import annotations

import numpy as np


def checkerboard_mask(x: np.ndarray, size: int = 4, extent: float = 2.0) -> np.ndarray:
    """True where a point of x (N, 2) lies on a black square of the size×size board on [−extent, extent)².

    With w = 2·extent/size, square (i, j) = (floor((x+extent)/w), floor((y+extent)/w)) counted from the
    lower-left corner is black iff (i + j) is even. The board is half-open so every square has the same
    shape; points off the board are never on it.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"expected (N, 2) points, got shape {x.shape}")
    w = 2.0 * extent / size
    cells = np.floor((x + extent) / w)
    on_board = np.all((cells >= 0) & (cells < size), axis=1)
    black = (cells.sum(axis=1) % 2) == 0
    return on_board & black


def off_support_fraction(x: np.ndarray, **kw: float) -> float:
    """Fraction of points not on a black square (kw go to checkerboard_mask)."""
    return float(1.0 - checkerboard_mask(x, **kw).mean())
