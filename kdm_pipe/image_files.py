"""Writing generated images the way EDM's generate.py does, plus an `.npz`, a grid and a JSON record.

Layout of `out/`: `{seed - seed % 1000:06d}/{seed:06d}.png` (grey images as 8-bit L, else RGB), `samples.npz`
(`arr_0` uint8 NHWC as ADM/EDM evaluators read it, `seeds`, and `labels` when conditional), `grid.png`, and
`samples.json` (seeds, labels, settings), written last so its presence means the directory is complete. The grid
separates its tiles by grey gaps and enlarges small images (pixel for pixel) so that each reads as an image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdm_pipe import storage
from kdm_pipe.datasets import to_uint8_nhwc

SAMPLES_JSON = "samples.json"
SAMPLES_NPZ = "samples.npz"
GRID_PNG = "grid.png"
GRID_MAX = 256  # images in grid.png; the rest are in the PNGs and the npz
GRID_TILE = 32  # grid.png draws small images enlarged to at least this many pixels a side (8×8 digits read as such)


def image_grid(images: np.ndarray, ncol: int | None = None, gap: int = 0) -> np.ndarray:
    """(N, C, H, W) in [−1, 1] → one uint8 (rows·H, ncol·W, C) image, row-major, near-square by default, with
    `gap` white pixels between tiles (the page's colour: dark tiles with grey edges, like the digits, stay apart)."""
    pixels = to_uint8_nhwc(images)
    n, h, w, c = pixels.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    rows = -(-n // ncol)
    grid = np.full((rows * (h + gap) - gap, ncol * (w + gap) - gap, c), 255, dtype=np.uint8)
    for i, im in enumerate(pixels):
        r, k = divmod(i, ncol)
        grid[r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = im
    return grid


def save_grid(path: str | Path, images: np.ndarray, ncol: int | None = None, scale: int = 1, gap: int = 2) -> Path:
    """`image_grid` as a PNG, each pixel repeated `scale` times (small images stay visible)."""
    images = np.asarray(images).repeat(scale, axis=2).repeat(scale, axis=3)
    _png(image_grid(images, ncol, gap)).save(path)
    return Path(path)


def _png(pixels: np.ndarray) -> Image.Image:
    """HWC uint8 → a PIL image, grey as mode L (what EDM writes for one channel)."""
    return Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")


def sample_path(out: str | Path, seed: int) -> Path:
    return Path(out) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def class_indices(labels: np.ndarray | None) -> np.ndarray | None:
    """Class indices from one-hot rows (as shards store them) or from indices."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    return (labels.argmax(axis=1) if labels.ndim == 2 else labels).astype(np.int64)


def write_samples(out: str | Path, images: np.ndarray, seeds: np.ndarray, labels: np.ndarray | None = None,
                  settings: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write images (N, C, H, W) in [−1, 1] generated from `seeds` (and `labels`, one-hot or indices) under `out`."""
    images = np.asarray(images)
    seeds = np.asarray(seeds, dtype=np.int64)
    classes = class_indices(labels)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got {images.shape}")
    if len(seeds) != len(images) or (classes is not None and len(classes) != len(images)):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds"
                         + ("" if classes is None else f" and {len(classes)} labels"))
    if (seeds < 0).any():
        raise ValueError("seeds must be non-negative (they name the files)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SAMPLES_JSON).unlink(missing_ok=True)  # the directory is incomplete until it is rewritten

    pixels = to_uint8_nhwc(images)
    for seed, im in zip(seeds.tolist(), pixels):
        path = sample_path(out, seed)
        path.parent.mkdir(exist_ok=True)
        _png(im).save(path)
    arrays = {"arr_0": pixels, "seeds": seeds} | ({} if classes is None else {"labels": classes})
    np.savez(out / SAMPLES_NPZ, **arrays)
    scale = max(1, GRID_TILE // max(images.shape[2:]))
    save_grid(out / GRID_PNG, images[:GRID_MAX], scale=scale, gap=max(2, scale))
    record = {"num": len(images), "shape": list(images.shape[1:]), "seeds": seeds.tolist(),
              "labels": None if classes is None else classes.tolist(), "settings": settings or {}}
    storage.write_text(out / SAMPLES_JSON, json.dumps(record))
    return {"dir": out, "npz": out / SAMPLES_NPZ, "grid": out / GRID_PNG, "json": out / SAMPLES_JSON}
