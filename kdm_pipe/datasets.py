"""Image datasets for teacher training: float32 NCHW arrays in [−1, 1] plus optional integer labels.

Sources: a folder of images or an EDM-style dataset zip (both may carry EDM's `dataset.json`
{"labels": [[relative/path.png, class], ...]}), an `.npy` array (NHWC uint8 or NCHW float in [−1, 1]),
`sklearn-digits` (scikit-learn's 1,797 8×8 digits, labelled 0–9) and `animal-mnist` (10,000 28×28 animal
silhouettes in 10 classes, MIT; `pip install --no-deps animal-mnist`: its gzip pickles are read with an unpickler
that rebuilds numpy arrays and nothing else, and its TensorFlow-importing loader is never run).

Sizes are checked before anything large is read: an `.npy` header (numeric dtype, sizes ≥ 0, fits the file), zip
members' recorded sizes, PIL's decompression-bomb limit, and the float32 images against the memory available.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from kdm_pipe.errors import ConfigError
from kdm_pipe.npyfiles import human, load_npy, npy_header

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
BUILTIN = ("sklearn-digits", "animal-mnist")
MAX_MEMBER = 64 << 20           # one encoded image (or dataset.json) in a dataset zip
MAX_CLASSES = 1 << 16
NPY_FORMS = "images (N, H, W[, C]) uint8 with C = 1 or 3, or (N, C, H, W) float32 in [−1, 1]"


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


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(where: str, count: int, shape: tuple[int, ...]) -> None:
    """Refuse `count` float32 images of `shape` when they could not fit the memory available."""
    need, have = count * math.prod(shape) * 4, available_memory()
    if have is not None and need > have:
        raise ConfigError(f"{where}: {count:,} images of shape {shape} need {human(need)} as float32 but only "
                          f"{human(have)} of memory are available; use fewer or smaller images")


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "RGB"):
                # Alpha is dropped; palettes and colour modes become RGB, grey ones 8-bit grey.
                im = im.convert("RGB" if im.mode == "P" or len(im.getbands()) >= 3 else "L")
            return np.asarray(im)
    except Image.DecompressionBombError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:     # PIL's UnidentifiedImageError is an OSError
        raise ConfigError(f"{where}: not a readable image ({e}); remove or re-encode it") from None


def _labels(raw: bytes, images: list[str], where: str) -> np.ndarray | None:
    try:
        table = json.loads(raw).get("labels")
        if table is None:
            return None
        by_name = {str(fname).replace("\\", "/"): int(label) for fname, label in table}
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{where}/dataset.json: not EDM's {{\"labels\": [[path, class], ...]}} ({e}); fix or "
                          f"remove it") from None
    missing = [n for n in images if n not in by_name]
    if missing:
        raise ConfigError(f"{where}/dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
    labels = np.array([by_name[n] for n in images], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= MAX_CLASSES:
        bad = int(np.flatnonzero((labels < 0) | (labels >= MAX_CLASSES))[0])
        raise ConfigError(f"{where}/dataset.json: class {labels[bad]} for {images[bad]}; classes are 0..n−1 "
                          f"(at most {MAX_CLASSES:,})")
    return labels


def _read_members(names: list[str], read: Callable[[str], bytes], where: str,
                  size: Callable[[str], int]) -> ImageData:
    """Decode the image members `names` (relative paths) and attach labels from `dataset.json` if present."""
    images = sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise ConfigError(f"{where} holds no images ({', '.join(IMAGE_SUFFIXES)}); point --data at a folder or zip "
                          f"of images, an .npy array, or one of {', '.join(BUILTIN)}")

    def load(n: str) -> bytes:
        if size(n) > MAX_MEMBER:
            raise ConfigError(f"{where}/{n}: {human(size(n))}, over the {human(MAX_MEMBER)} limit for one image "
                              f"(or dataset.json); crafted or not a training image? remove it")
        return read(n)

    first = _decode(load(images[0]), f"{where}/{images[0]}")
    check_memory(where, len(images), first.shape)
    pixels = [first] + [_decode(load(n), f"{where}/{n}") for n in images[1:]]
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise ConfigError(f"{where}: images differ in size/channels {sorted(shapes)[:4]}; resize them to one shape")
    labels = _labels(load("dataset.json"), images, where) if "dataset.json" in names else None
    return ImageData(from_uint8_nhwc(np.stack(pixels)), labels)


def _folder(path: Path) -> ImageData:
    names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    return _read_members(names, lambda n: (path / n).read_bytes(), str(path), lambda n: (path / n).stat().st_size)


def _zip(path: Path) -> ImageData:
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist() if not i.is_dir()}
            return _read_members(list(infos), z.read, str(path), lambda n: infos[n].file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as e:
        raise ConfigError(f"{path}: not a readable zip ({type(e).__name__}: {e}); export the dataset again") from None


def _npy(path: Path) -> ImageData:
    h = npy_header(path, kinds="uf")
    uint8, shape = h.dtype == np.uint8, h.shape
    if len(shape) == 3:                     # one channel: (N, H, W)
        shape = shape + (1,) if uint8 else (shape[0], 1) + shape[1:]
    if len(shape) != 4 or (h.dtype.kind == "u" and not uint8) or (shape[3] if uint8 else shape[1]) not in (1, 3):
        raise ConfigError(f"{path}: {h.describe()}; expected {NPY_FORMS}")
    if not math.prod(shape):
        raise ConfigError(f"{path}: shape {h.shape} holds no images")
    check_memory(str(path), shape[0], (shape[3], shape[1], shape[2]) if uint8 else shape[1:])
    a = load_npy(path, kinds="uf").reshape(shape)
    if uint8:
        return ImageData(from_uint8_nhwc(a), None)
    lo, hi = a.min(), a.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ConfigError(f"{path}: non-finite values (NaN or inf) among the images; fix or drop them")
    if lo < -1.001 or hi > 1.001:
        raise ConfigError(f"{path}: float images must lie in [−1, 1] (got {lo:.3g}..{hi:.3g}); "
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
        raise ConfigError(f"{root}: unexpected animal-mnist arrays {pixels.dtype} {pixels.shape}, "
                          f"labels {labels.shape}")
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
