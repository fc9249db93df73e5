"""Image datasets for teacher training: float32 NCHW arrays in [−1, 1] plus optional integer labels.

Sources: a folder of images or an EDM-style dataset zip (both may carry EDM's `dataset.json`
{"labels": [[relative/path.png, class], ...]}), an `.npy` array (NHWC uint8 or NCHW float in [−1, 1]),
`sklearn-digits` (scikit-learn's 1,797 8×8 digits, labelled 0–9) and `animal-mnist` (10,000 28×28 animal
silhouettes in 10 classes, MIT; `pip install --no-deps animal-mnist`: its gzip pickles are read with an unpickler
that rebuilds numpy arrays and nothing else, and its TensorFlow-importing loader is never run).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from kdm_pipe.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
BUILTIN = ("sklearn-digits", "animal-mnist")


@dataclass
class ImageData:
    images: np.ndarray            # (N, C, H, W) float32 in [−1, 1]
    labels: np.ndarray | None     # (N,) int64 class indices

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1


def from_uint8_nhwc(pixels: np.ndarray) -> np.ndarray:
    """EDM's mapping of 8-bit pixels to the model's range: x/127.5 − 1, channels first."""
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    return (pixels.astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2).copy()


def to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """The inverse used for PNGs and FID: (x·127.5 + 128) clipped to 0..255."""
    return (np.asarray(images) * 127.5 + 128).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB"):
            # Alpha is dropped; palettes and colour modes become RGB, grey ones 8-bit grey.
            im = im.convert("RGB" if im.mode == "P" or len(im.getbands()) >= 3 else "L")
        return np.asarray(im)


def _read_members(names: list[str], read: Callable[[str], bytes], where: str) -> ImageData:
    """Decode the image members `names` (relative paths) and attach labels from `dataset.json` if present."""
    images = sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise ConfigError(f"{where} holds no images ({', '.join(IMAGE_SUFFIXES)}); point --data at a folder or zip "
                          f"of images, an .npy array, or one of {', '.join(BUILTIN)}")
    pixels = [_decode(read(n)) for n in images]
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise ConfigError(f"{where}: images differ in size/channels {sorted(shapes)[:4]}; resize them to one shape")
    labels = None
    if "dataset.json" in names:
        table = json.loads(read("dataset.json")).get("labels")
        if table is not None:
            by_name = {str(fname).replace("\\", "/"): int(label) for fname, label in table}
            missing = [n for n in images if n not in by_name]
            if missing:
                raise ConfigError(f"{where}/dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
            labels = np.array([by_name[n] for n in images], dtype=np.int64)
    return ImageData(from_uint8_nhwc(np.stack(pixels)), labels)


def _folder(path: Path) -> ImageData:
    names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    return _read_members(names, lambda n: (path / n).read_bytes(), str(path))


def _zip(path: Path) -> ImageData:
    with zipfile.ZipFile(path) as z:
        return _read_members(z.namelist(), z.read, str(path))


def _npy(path: Path) -> ImageData:
    a = np.load(path, allow_pickle=False)
    if a.ndim == 3:
        a = a[..., None] if a.dtype == np.uint8 else a[:, None]
    if a.ndim != 4:
        raise ConfigError(f"{path}: expected images of shape (N, H, W[, C]) uint8 or (N, C, H, W) float, got {a.shape}")
    if a.dtype == np.uint8:
        return ImageData(from_uint8_nhwc(a), None)
    if a.min() < -1.001 or a.max() > 1.001:
        raise ConfigError(f"{path}: float images must lie in [−1, 1] (got {a.min():.3g}..{a.max():.3g}); "
                          f"store uint8 NHWC pixels instead")
    return ImageData(a.astype(np.float32), None)


def sklearn_digits() -> ImageData:
    """The 8×8 digits have 17 grey levels 0..16 (ink is high): mapped linearly onto [−1, 1]."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = (d.images / 8.0 - 1.0).astype(np.float32)[:, None]
    return ImageData(images, d.target.astype(np.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds pickled numpy arrays; any other global (code) is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ConfigError(f"refusing to unpickle {module}.{name}: only numpy arrays are read from data files")
        from numpy._core import multiarray
        return multiarray._reconstruct if name == "_reconstruct" else getattr(np, name)


def read_array_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        a = _ArrayUnpickler(f).load()
    if not isinstance(a, np.ndarray):
        raise ConfigError(f"{path}: expected a pickled numpy array, got {type(a).__name__}")
    return a


def animal_mnist(root: Path | None = None) -> ImageData:
    """The animal-mnist package's bundled arrays: (10000, 28, 28) uint8 silhouettes and their 10 classes."""
    if root is None:
        spec = importlib.util.find_spec("animal_mnist")       # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("animal-mnist is not installed: pip install --no-deps animal-mnist "
                              "(--no-deps: its own loader needs TensorFlow, which kdm-pipe does not use)")
        root = Path(spec.submodule_search_locations[0]) / "data" / "Animal_MNIST"
    pixels = read_array_pickle(root / "animal_data_version_3.gz")
    labels = read_array_pickle(root / "animal_label_version_3.gz")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or len(labels) != len(pixels):
        raise ConfigError(f"{root}: unexpected animal-mnist arrays {pixels.dtype} {pixels.shape}, labels {labels.shape}")
    return ImageData(from_uint8_nhwc(pixels), labels.astype(np.int64))


def load_images(source: str | Path) -> ImageData:
    """Load `source`: 'sklearn-digits', 'animal-mnist', a folder of images, an EDM dataset .zip, or an .npy."""
    name = str(source)
    if name == "sklearn-digits":
        return sklearn_digits()
    if name == "animal-mnist":
        return animal_mnist()
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"--data {path}: no such file or folder (or use one of {', '.join(BUILTIN)})")
    if path.is_dir():
        return _folder(path)
    if path.suffix == ".zip":
        return _zip(path)
    if path.suffix == ".npy":
        return _npy(path)
    raise ConfigError(f"--data {path}: unsupported file type {path.suffix!r}; use a folder, .zip or .npy")
