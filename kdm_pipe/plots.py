"""Figures. Matplotlib with the Agg backend: runs headless on any node."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def pairs_scatter(path: Path, x_T: np.ndarray, teacher: np.ndarray, students: dict[str, np.ndarray],
                  modes: np.ndarray, extent: float | None = None) -> Path:
    """x_T, teacher x_0 and each student's x̂_0 from the same x_T, all coloured by the teacher's mode of that pair."""
    panels = {"noise x_T": x_T, "teacher x_0": teacher, **students}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels.items()):
        ax.scatter(pts[:, 0], pts[:, 1], c=modes, cmap="tab10", s=2, alpha=0.6, linewidths=0)
        ax.set_title(title)
        ax.set_aspect("equal")
        if extent and title != "noise x_T":
            ax.set_xlim(-1.2 * extent, 1.2 * extent)
            ax.set_ylim(-1.2 * extent, 1.2 * extent)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
