"""Figures. Matplotlib with the Agg backend: runs headless on any node."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kdm_pipe.image_files import image_grid  # noqa: E402


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


def _square_limits(ax, extent: float | None) -> None:
    ax.set_aspect("equal")
    if extent:
        ax.set_xlim(-1.2 * extent, 1.2 * extent)
        ax.set_ylim(-1.2 * extent, 1.2 * extent)


def spectrum(path: Path, eigenvalues: np.ndarray, title: str, history: tuple[np.ndarray, np.ndarray] | None = None,
             extra: dict[str, np.ndarray] | None = None) -> Path:
    """Complex eigenvalues against the unit circle; with `history` = (steps (n,), eigenvalues (n, d)) a second
    panel draws every probe coloured by its training step. `extra` adds other labelled spectra to the first panel."""
    panels = 2 if history is not None and len(history[0]) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + (1 if panels == 2 else 0), 5), squeeze=False)
    circle = np.exp(1j * np.linspace(0, 2 * np.pi, 400))
    for ax in axes[0]:
        ax.plot(circle.real, circle.imag, color="0.6", lw=1)
        ax.axhline(0, color="0.85", lw=0.5)
        ax.axvline(0, color="0.85", lw=0.5)
        ax.set_aspect("equal")
        ax.set_xlabel("Re λ")
        ax.set_ylabel("Im λ")
    ax = axes[0, 0]
    for (label, lam), color in zip({"λ": eigenvalues, **(extra or {})}.items(), ("C0", "C3", "C2")):
        ax.scatter(lam.real, lam.imag, s=8, color=color, label=label, alpha=0.8, linewidths=0)
    ax.set_title(title)
    if extra:
        ax.legend(loc="upper right", fontsize=8)
    if panels == 2:
        steps, lams = history
        ax = axes[0, 1]
        colours = np.broadcast_to(steps[:, None], lams.shape).ravel()
        sc = ax.scatter(lams.real.ravel(), lams.imag.ravel(), c=colours, cmap="viridis", s=5, alpha=0.7, linewidths=0)
        fig.colorbar(sc, ax=ax, label="training step")
        ax.set_title(f"over training ({len(steps)} probes, EMA)")
    lim = max(1.1, 1.05 * max(np.abs(eigenvalues).max(), np.abs(history[1]).max() if panels == 2 else 0))
    for ax in axes[0]:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def latent_spectra(path: Path, eigenvalues: dict[str, np.ndarray], operator: np.ndarray, ranks: dict[str, float],
                   title: str) -> Path:
    """Covariance spectra of the latents side by side (eigenvalues, descending, log scale, the effective rank
    marked), and the moduli of the operator's eigenvalues in the same order of size."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for (name, lam), color in zip(eigenvalues.items(), ("C0", "C1", "C2")):
        lam = np.clip(lam, 1e-12, None)
        ax.semilogy(np.arange(1, len(lam) + 1), lam, color=color, label=f"{name} (effective rank {ranks[name]:.1f})")
        ax.axvline(ranks[name], color=color, lw=0.8, ls=":")
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("covariance eigenvalue")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax = axes[1]
    mod = np.sort(np.abs(operator))[::-1]
    ax.plot(np.arange(1, len(mod) + 1), mod, color="C3")
    ax.axhline(1, color="0.6", lw=0.8)
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("|λ| of the Koopman operator")
    ax.set_title("operator spectrum")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def noise_structure(path: Path, rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                    extent: float | None = None) -> Path:
    """The paper's outlier figure: per row (x_0, x_T, modes, outlier mask), x_0 coloured by its KMeans mode and the
    same colours on the x_T each point came from; outliers (DBSCAN noise or |z| > 3) as red crosses on both."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 4.5 * len(rows)), squeeze=False)
    for (name, (x_0, x_T, modes, out)), (ax0, axT) in zip(rows.items(), axes):
        for ax, pts, what in ((ax0, x_0, "x_0"), (axT, x_T, "x_T")):
            ax.scatter(pts[~out, 0], pts[~out, 1], c=modes[~out], cmap="tab10", vmin=0, vmax=9, s=3, alpha=0.5,
                       linewidths=0, rasterized=True)
            ax.scatter(pts[out, 0], pts[out, 1], c="red", marker="x", s=14, linewidths=0.8)
            ax.set_title(f"{what}: {name} ({int(out.sum())} outliers of {len(out)})")
        _square_limits(ax0, extent)
        axT.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def interpolation_paths(path: Path, background: np.ndarray, paths: dict[str, np.ndarray],
                        extent: float | None = None) -> Path:
    """2-D one-step outputs along interpolations: `paths[title]` is (n_paths, n_alpha, 2), drawn over the teacher's
    samples; circles mark α = 0, squares α = 1."""
    fig, axes = plt.subplots(1, len(paths), figsize=(5 * len(paths), 5), squeeze=False)
    for ax, (title, lines) in zip(axes[0], paths.items()):
        ax.scatter(background[:, 0], background[:, 1], s=2, color="0.8", linewidths=0, rasterized=True)
        for k, line in enumerate(lines):
            color = f"C{k % 10}"
            ax.plot(line[:, 0], line[:, 1], "-", color=color, lw=1.2)
            ax.plot(*line[0], "o", color=color)
            ax.plot(*line[-1], "s", color=color)
        ax.set_title(title)
        _square_limits(ax, extent)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def image_rows(path: Path, rows: dict[str, np.ndarray], scale: int = 1, dpi: int = 110) -> Path:
    """One strip per row of images (N, C, H, W) in [−1, 1], each under its title (which row is which stays on the
    figure wherever it is shown). Strips are drawn pixel for pixel (each image pixel `scale` × `scale` screen
    pixels, no resampling, tiles `scale` pixels apart so that enlarged ones stay apart), left-aligned on a figure
    at least 480 pixels wide so that titles fit."""
    strips = {k: image_grid(np.asarray(v).repeat(scale, 2).repeat(scale, 3), ncol=len(v), gap=max(2, scale))
              for k, v in rows.items()}
    h, w = max(s.shape[0] for s in strips.values()), max(s.shape[1] for s in strips.values())
    title, pad = 20, 4                                 # pixels above each strip for its title, and around
    width, height = max(w, 480) + 2 * pad, len(strips) * (h + title) + pad
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    for i, (name, strip) in enumerate(strips.items()):
        top = i * (h + title) + title
        ax = fig.add_axes((pad / width, 1 - (top + strip.shape[0]) / height, strip.shape[1] / width,
                           strip.shape[0] / height))
        ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.axis("off")
        fig.text(pad / width, 1 - (top - 4) / height, name, fontsize=9, ha="left", va="bottom")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def curves(path: Path, series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str = "step") -> Path:
    """Lines (x, y) per name on one axis; log-y when every value is positive."""
    fig, ax = plt.subplots(figsize=(7, 4))
    few = max((len(x) for x, _ in series.values()), default=0) < 20      # a short run: show every point
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, lw=1.2, marker="o" if few else None, ms=4)
    values = np.concatenate([np.asarray(y, float) for _, y in series.values()]) if series else np.ones(1)
    if (values[np.isfinite(values)] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def filter_histograms(path: Path, d1: np.ndarray, ratio: np.ndarray, flagged: np.ndarray, rule: str,
                      threshold: float) -> Path:
    """The memorisation filter's two statistics over all scored samples, flagged ones in red, and the threshold of
    the rule in use: d₁ (absolute rule) and d₁ / mean(d₂…d_k) (relative rule)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, values, name, active in ((axes[0], d1, "d₁: RMS distance to the nearest reference image", "absolute"),
                                     (axes[1], ratio, "d₁ / mean(d₂…d_k)", "relative")):
        bins = np.histogram_bin_edges(values[np.isfinite(values)], bins=60)
        ax.hist(values[~flagged], bins=bins, color="tab:blue", label=f"kept ({int((~flagged).sum()):,})")
        ax.hist(values[flagged], bins=bins, color="tab:red", label=f"flagged ({int(flagged.sum()):,})")
        if rule == active:
            ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.set_xlabel(name)
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
