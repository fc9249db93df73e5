"""Pair sets made elsewhere, read as aligned (x_T, x_0, label) blocks: the official KDM per-pair `.npz` folders,
GET's torch-saved files, and plain `.npy` arrays (two files, or one (T, N, ...) stack such as the official
checkerboard).

Every source gives random access to pairs [start, stop) in a stable order (natural sort of file names) as raw
ends (a, b, label) and never holds more than one file (GET) or one block in memory. When both ends come from one
array (kdm-npz, the stack), a is index 0 and b index −1 and `orient` decides from the data which one is x_T;
when the arrays are named (GET's latent/ and image/, --x-T and --x-0), a is x_T and `orient` only checks it.

The check: x_T must look like N(0, σ_max²) noise (std within `tolerance` of σ_max, mean near 0, Gaussian
kurtosis) on the first ≥ 65,536 values, and x_0 must not. x_T is stored as the source has it (GET's unit z
times σ_max), so σ_max is part of the data's convention: 80 (EDM) by default, 1 for a (T, N, ...) stack (the
official flow-matching checkerboard draws x_T ~ N(0, I)); pass `sigma_max` for anything else. Students read
σ_max from the manifest and scale x_T by 1/σ_max.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from kdm_pipe.config import ConfigError, ImportConfig
from kdm_pipe.shards import sha256_file

Ends = tuple[np.ndarray, np.ndarray, np.ndarray | None]
CHECK_VALUES = 1 << 16      # std to ±0.3%, kurtosis to ±0.02 (one standard error)
MAX_EXCESS_KURTOSIS = 0.5   # Gaussian noise: 0; images and the checkerboard: about −1 or far from 0


def natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def listing(folder: Path, pattern: str = "*") -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a directory")
    files = sorted((p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")), key=natural_key)
    if not files:
        raise ConfigError(f"{folder} holds no {pattern} files")
    return files


def one_hot(y: np.ndarray, label_dim: int | None, where: str) -> np.ndarray:
    """(B,) int classes or (B, label_dim) one-hot rows → float32 one-hot."""
    if y.ndim == 2:
        if label_dim is not None and y.shape[1] != label_dim:
            raise ConfigError(f"{where}: one-hot labels of width {y.shape[1]}, expected {label_dim}")
        if not (np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all()):
            raise ConfigError(f"{where}: label rows are not one-hot")
        return y.astype(np.float32)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{where}: labels must be (N,) int classes or (N, label_dim) one-hot, "
                          f"got {y.dtype} {y.shape}")
    if label_dim is None:
        raise ConfigError(f"{where}: int class labels need --label-dim")
    if y.size and (y.min() < 0 or y.max() >= label_dim):
        raise ConfigError(f"{where}: class labels outside 0..{label_dim - 1}")
    return np.eye(label_dim, dtype=np.float32)[y]


def files_digest(files: list[Path], root: Path | None, contents: bool) -> str:
    """sha256 of the file list (names under `root` and sizes) or, with `contents`, of every file's bytes."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root) if root else p.name}\t".encode())
        h.update((sha256_file(p) if contents else str(p.stat().st_size)).encode() + b"\n")
    return h.hexdigest()


class Source:
    """Random access to a pair set; subclasses set `n`, `shape`, `label_dim`, `two_ended`, `digest`."""

    n: int
    shape: tuple[int, ...]
    label_dim: int = 0
    two_ended: bool
    digest: str
    x_T_convention: str = "x_T as stored in the source (std ≈ sigma_max, checked on import); no generator seed"
    x_T_scale: float = 1.0      # x_T = x_T_scale · the stored array; x_0 must not look like the stored array either

    def ends(self, start: int, stop: int) -> Ends:
        raise NotImplementedError


class KdmNpz(Source):
    """Official KDM folders: one `.npz` per pair, `arr_0` (K, ...) or `endpoints` (2, ...) [+ `label` one-hot]."""

    two_ended = True

    def __init__(self, folder: Path, label_dim: int | None):
        self.files = listing(folder, "*.npz")
        self.n, self.digest = len(self.files), files_digest(self.files, folder, contents=False)
        a, _, y = self._read(self.files[0], label_dim)
        self.shape = a.shape
        self.label_dim = 0 if y is None else len(y)

    def _read(self, path: Path, label_dim: int | None) -> Ends:
        try:
            with np.load(path, allow_pickle=False) as z:
                key = next((k for k in ("endpoints", "arr_0") if k in z.files), None)
                if key is None:
                    raise ConfigError(f"{path}: no 'arr_0' or 'endpoints' array (has {', '.join(z.files)})")
                arr, y = z[key], (z["label"] if "label" in z.files else None)
        except (OSError, ValueError, EOFError) as e:
            raise ConfigError(f"{path}: not a readable .npz ({e})") from None
        if arr.ndim < 2 or len(arr) < 2:
            raise ConfigError(f"{path}: '{key}' has shape {arr.shape}; expected (K ≥ 2, ...) holding both ends")
        if y is not None:
            y = one_hot(y.reshape(1) if y.ndim == 0 else y.reshape(1, -1), label_dim, str(path))[0]
        return arr[0], arr[-1], y

    def ends(self, start: int, stop: int) -> Ends:
        rows = []
        for path in self.files[start:stop]:
            a, b, y = self._read(path, self.label_dim or None)
            if a.shape != self.shape or (y is None) != (self.label_dim == 0):
                raise ConfigError(f"{path}: pair of shape {a.shape}{' with' if y is not None else ' without'} "
                                  f"labels, unlike {self.files[0].name} {self.shape}")
            rows.append((a, b, y))
        a, b, y = zip(*rows)
        return np.stack(a), np.stack(b), np.stack(y) if self.label_dim else None


def torch_file(path: Path) -> object:
    """A torch.save'd file, tensors only (weights_only), memory-mapped when the file format allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:    # legacy (non-zip) files cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise ConfigError(f"{path}: not a tensor file loadable with torch.load(weights_only=True) ({e})") from None


class GetFiles(Source):
    """GET's folders: `latent/` files hold unit z (or [z, one-hot labels]), `image/` files the matching x_0."""

    two_ended = False

    def __init__(self, root: Path, sigma_max: float):
        self.latent, self.image = listing(root / "latent"), listing(root / "image")
        if [p.name for p in self.latent] != [p.name for p in self.image]:
            raise ConfigError(f"{root}: latent/ and image/ hold different file names")
        self.x_T_scale = sigma_max
        self.digest = files_digest(self.latent + self.image, root, contents=False)
        self.x_T_convention = "x_T = sigma_max * z, z from GET's latent/ files; no generator seed"
        self._cached: tuple[int, tuple] | None = None
        counts = [len(self._file(i)[0]) for i in range(len(self.latent))]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.n = self.starts[-1]
        z, y, _ = self._file(0)
        self.shape, self.label_dim = tuple(z.shape[1:]), 0 if y is None else y.shape[1]

    def _file(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        if self._cached is None or self._cached[0] != i:
            lat, x = torch_file(self.latent[i]), torch_file(self.image[i])
            z, y = lat if isinstance(lat, (list, tuple)) and len(lat) == 2 else (lat, None)
            if not (isinstance(z, torch.Tensor) and isinstance(x, torch.Tensor)) or len(z) != len(x) \
                    or (y is not None and (not isinstance(y, torch.Tensor) or y.ndim != 2 or len(y) != len(z))):
                raise ConfigError(f"{self.latent[i]} / {self.image[i].name}: expected tensors z (or [z, labels]) and "
                                  f"x_0 with the same number of pairs")
            self._cached = (i, (z, y, x))
        return self._cached[1]

    def ends(self, start: int, stop: int) -> Ends:
        parts = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            z, y, x = self._file(i)
            lo, hi = start - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            if tuple(z.shape[1:]) != self.shape or tuple(x.shape[1:]) != self.shape:
                raise ConfigError(f"{self.latent[i]}: pairs of shape {tuple(z.shape[1:])}, unlike {self.shape}")
            parts.append((self.x_T_scale * z[lo:hi].double().numpy(), x[lo:hi].numpy(),
                          None if y is None else one_hot(y[lo:hi].numpy(), self.label_dim, str(self.latent[i]))))
            start, i = self.starts[i] + hi, i + 1
        a, b, y = zip(*parts)
        return np.concatenate(a), np.concatenate(b), np.concatenate(y) if self.label_dim else None


def npy_file(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable .npy array ({e})") from None


class NpyArrays(Source):
    """Plain arrays: a (T, N, ...) stack (x_T at index 0, x_0 at −1) or two (N, ...) files; optional labels."""

    def __init__(self, cfg: ImportConfig):
        paths = [cfg.src] if cfg.stack else [cfg.x_T, cfg.x_0]
        arrays = [npy_file(p) for p in paths]
        if cfg.stack:
            (s,) = arrays
            if s.ndim < 3 or len(s) < 2:
                raise ConfigError(f"{cfg.src}: shape {s.shape}; a stack is (T ≥ 2, N, ...), x_T at 0, x_0 at −1")
            self.a, self.b = s[0], s[-1]
        else:
            self.a, self.b = arrays
            if self.a.shape != self.b.shape or self.a.ndim < 2:
                raise ConfigError(f"x_T {self.a.shape} and x_0 {self.b.shape} must both be (N, ...) of one shape")
        self.two_ended = cfg.stack
        self.n, self.shape = len(self.a), tuple(self.a.shape[1:])
        self.y = None
        if cfg.labels is not None:
            y = npy_file(cfg.labels)
            if len(y) != self.n:
                raise ConfigError(f"{cfg.labels}: {len(y)} labels for {self.n} pairs")
            dim = cfg.label_dim or (y.shape[1] if y.ndim == 2 else int(y.max()) + 1)
            self.y, self.label_dim = y, dim
            paths.append(cfg.labels)
        self.digest = files_digest(paths, None, contents=True)

    def ends(self, start: int, stop: int) -> Ends:
        y = None if self.y is None else one_hot(np.asarray(self.y[start:stop]), self.label_dim, "labels")
        return np.array(self.a[start:stop]), np.array(self.b[start:stop]), y


def open_source(cfg: ImportConfig) -> Source:
    if cfg.src is not None and not cfg.src.exists():
        raise ConfigError(f"{cfg.src} does not exist")
    if cfg.format == "kdm-npz":
        return KdmNpz(cfg.src, cfg.label_dim)
    if cfg.format == "get":
        return GetFiles(cfg.src, cfg.sigma)
    return NpyArrays(cfg)


def noise_misfit(x: np.ndarray, sigma: float, tolerance: float) -> str | None:
    """Why `x` does not look like N(0, σ²) noise, or None when it does.

    Each bound widens by 4 standard errors of its statistic, so small sets are not refused for sampling noise.
    """
    x = x.astype(np.float64).ravel()
    mean, std, se = x.mean(), x.std(), 1 / math.sqrt(x.size)
    if abs(std / sigma - 1) > tolerance + 4 * se / math.sqrt(2):
        return f"std {std:.3g}"
    if abs(mean) > (tolerance + 4 * se) * sigma:
        return f"mean {mean:.3g}"
    excess = ((x - mean) ** 4).mean() / std**4 - 3
    if abs(excess) > MAX_EXCESS_KURTOSIS + 4 * se * math.sqrt(24):
        return f"excess kurtosis {excess:.2f} (Gaussian: 0)"
    return None


def orient(src: Source, order: str, sigma_max: float, tolerance: float) -> tuple[bool, dict[str, float | int]]:
    """(swap, check): whether b is x_T, decided on the first pairs; ConfigError saying what was found when unsure."""
    k = min(src.n, max(1, math.ceil(CHECK_VALUES / max(1, math.prod(src.shape)))))
    a, b, _ = src.ends(0, k)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError(f"non-finite values among source pairs 0..{k - 1}")
    bad_a, bad_b = noise_misfit(a, sigma_max, tolerance), noise_misfit(b, sigma_max / src.x_T_scale, tolerance)
    guess = order == "auto" and src.two_ended
    swap = order == "x0-first" or (guess and bad_a is not None and bad_b is None)
    (x_T, bad_T), (x_0, bad_0) = ((b, bad_b), (a, bad_a)) if swap else ((a, bad_a), (b, bad_b))
    if bad_T is None and bad_0 is not None:
        return swap, {"std_x_T": float(x_T.std()), "std_x_0": float(x_0.std()), "checked_pairs": k}
    names = ("first end", "last end") if guess else ("x_T", "x_0")
    found = (f"std({names[0]})={x_T.std():.3g}, std({names[1]})={x_0.std():.3g} on the first {k} pairs, "
             f"sigma_max={sigma_max:g}")
    if bad_T is None:
        raise ConfigError(f"{found}: {'both ends look' if guess else 'x_0 looks'} like N(0, sigma_max²) noise; "
                          f"is this a pair set?")
    if bad_0 is None:       # only reachable with named ends or an explicit --order
        fix = (f"pass --order {'xT-first' if swap else 'x0-first'}" if src.two_ended
               else "swap the --x-T and --x-0 files" if isinstance(src, NpyArrays)
               else "latent/ and image/ seem exchanged")
        raise ConfigError(f"{found}: x_T and x_0 look swapped; {fix}")
    what = "neither end looks" if guess else "x_T does not look"
    raise ConfigError(f"{found}: {what} like N(0, sigma_max²) noise ({bad_T}); pass --sigma-max if the teacher's "
                      f"sigma_max is not {sigma_max:g}")


def pairs(src: Source, swap: bool, start: int, stop: int) -> dict[str, np.ndarray]:
    """Pairs [start, stop) as x_T, x_0 (source dtype) and one-hot labels; ConfigError on non-finite values."""
    a, b, y = src.ends(start, stop)
    x_T, x_0 = (b, a) if swap else (a, b)
    for name, v in (("x_T", x_T), ("x_0", x_0)):
        if not np.isfinite(v).all():
            raise ConfigError(f"non-finite {name} among source pairs {start}..{stop - 1}")
    return {"x_T": x_T, "x_0": x_0} | ({} if y is None else {"label": y})
