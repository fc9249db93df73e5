"""Pair sets made elsewhere, read as aligned (x_T, x_0, label) blocks: the official KDM per-pair `.npz` folders,
GET's torch-saved files, rectified flow's z0.npy / z1.npy, FastGen's KD WebDataset shards, and plain `.npy` arrays
(two files, or one (T, N, ...) stack such as the official checkerboard). `kdm-pipe export DIR` writes the first
four (kdm_pipe/interop.py).

Every source gives random access to pairs [start, stop) in a stable order (natural sort of file names) as raw
ends (a, b, label) and never holds more than one file (GET, FastGen) or one block in memory. When both ends come
from one array (kdm-npz, the stack), a is index 0 and b index −1 and `orient` decides from the data which one is
x_T; when the arrays are named (GET's latent/ and image/, FastGen's noise and real, rectified flow's z0 and z1,
--x-T and --x-0), a is x_T and `orient` only checks it.

The check: x_T must look like N(0, σ_max²) noise (std within `tolerance` of σ_max, mean near 0, Gaussian
kurtosis) on the first ≥ 65,536 values, and x_0 must not. x_T is stored as the source has it (GET's unit z
times σ_max), so σ_max is part of the data's convention: 80 (EDM) by default, 1 for a (T, N, ...) stack (the
official flow-matching checkerboard draws x_T ~ N(0, I)); pass `sigma_max` for anything else. Students read
σ_max from the manifest and scale x_T by 1/σ_max.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from kdm_pipe import storage, tensorfile
from kdm_pipe.config import ConfigError, ImportConfig
from kdm_pipe.npyfiles import Header, human, load_npy, npz_arrays
from kdm_pipe.shards import npy_from_bytes

# (a, b, labels, states): the two ends, one-hot labels or None, and every stored state (B, T, ...) in source order
# (a = states[:, 0], b = states[:, −1]) when the source keeps a trajectory, else None.
Ends = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]
CHECK_VALUES = 1 << 16      # std to ±0.3%, kurtosis to ±0.02 (one standard error)
MAX_EXCESS_KURTOSIS = 0.5   # Gaussian noise: 0; images and the checkerboard: about −1 or far from 0
MAX_LABEL_DIM = 1 << 16     # classes (ImageNet-21k has 21,841); also ImportConfig.label_dim's bound
MAX_NPZ_MEMBER = 256 << 20  # one official pair file holds two float64 images or a short trajectory: a few MB


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
    """(B,) int classes or (B, label_dim) one-hot rows → float32 one-hot (B × label_dim floats, nothing more)."""
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
        bad = int(np.flatnonzero((y < 0) | (y >= label_dim))[0])
        raise ConfigError(f"{where}: class label {int(y[bad])} (row {bad}) is outside 0..{label_dim - 1}; "
                          f"pass --label-dim with the number of classes, or fix the labels")
    out = np.zeros((len(y), label_dim), dtype=np.float32)
    out[np.arange(len(y)), y] = 1
    return out


def int_label_dim(y: np.ndarray, label_dim: int | None, where: str) -> int:
    """The one-hot width for (N,) int class labels `y`: `label_dim` or max + 1, refused beyond MAX_LABEL_DIM."""
    if not y.size:
        return label_dim or 1
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise ConfigError(f"{where}: negative class label {lo} (row {int(y.argmin())}); labels are 0..classes−1")
    if label_dim is not None and hi >= label_dim:
        raise ConfigError(f"{where}: class label {hi} (row {int(y.argmax())}) is outside 0..{label_dim - 1} "
                          f"(--label-dim {label_dim}); fix the labels or pass the right --label-dim")
    if hi >= MAX_LABEL_DIM:
        raise ConfigError(f"{where}: class label {hi} (row {int(y.argmax())}) would need a {hi + 1:,}-wide one-hot "
                          f"(limit {MAX_LABEL_DIM:,} classes); are these class indices 0..classes−1?")
    return label_dim or hi + 1


def files_digest(files: list[Path], root: Path | None, contents: bool) -> str:
    """sha256 of the file list (names under `root` and sizes) or, with `contents`, of every file's bytes."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root) if root else p.name}\t".encode())
        h.update((storage.sha256(p) if contents else str(p.stat().st_size)).encode() + b"\n")
    return h.hexdigest()


class Source:
    """Random access to a pair set; subclasses set `n`, `shape`, `label_dim`, `two_ended`, `digest` and, when every
    pair holds a trajectory of more than its two ends, `states` (T)."""

    n: int
    shape: tuple[int, ...]
    label_dim: int = 0
    states: int = 0
    two_ended: bool
    digest: str
    x_T_convention: str = "x_T as stored in the source (std ≈ sigma_max, checked on import); no generator seed"
    x_T_scale: float = 1.0      # x_T = x_T_scale · the stored array; x_0 must not look like the stored array either

    def ends(self, start: int, stop: int) -> Ends:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Where pair i lives in the source, for messages."""
        raise NotImplementedError


class KdmNpz(Source):
    """Official KDM folders: one `.npz` per pair, `arr_0` (K, ...) or `endpoints` (2, ...) [+ `label` one-hot]."""

    two_ended = True

    def __init__(self, folder: Path, label_dim: int | None, keep_states: bool):
        self.files = listing(folder, "*.npz")
        self.n, self.digest = len(self.files), files_digest(self.files, folder, contents=False)
        self.shape, self.member_bytes = None, None
        arr, y = self._read(self.files[0], label_dim)
        self.shape = arr.shape[1:]
        self.label_dim = 0 if y is None else len(y)
        self.states = len(arr) if keep_states and len(arr) > 2 else 0

    def _check(self, path: Path, name: str, h: Header) -> None:
        """Before a member is read: the ends' array must hold (K ≥ 2, ...) and, after the first file, pairs of the
        first file's shape in at most twice its bytes (so one crafted file cannot cost more memory than two
        genuine ones); labels at most MAX_LABEL_DIM values."""
        if name == "label":
            if math.prod(h.shape) > MAX_LABEL_DIM:
                raise ConfigError(f"{path}: 'label' has shape {h.shape}; expected one class or one one-hot row")
            return
        if len(h.shape) < 2 or h.shape[0] < 2:
            raise ConfigError(f"{path}: '{name}' has shape {h.shape}; expected (K ≥ 2, ...) holding both ends")
        if self.shape is not None:
            first = self.files[0].name
            if h.shape[1:] != self.shape:
                raise ConfigError(f"{path}: pairs of shape {h.shape[1:]}, unlike {first} {self.shape}; one pair "
                                  f"set holds one shape")
            if self.states and h.shape[0] != self.states:
                raise ConfigError(f"{path}: '{name}' holds {h.shape[0]} states, unlike {first} ({self.states}); "
                                  f"import trajectories of one length, or only their ends with --ends-only")
            if h.nbytes > max(2 * self.member_bytes, 1 << 20):
                raise ConfigError(f"{path}: '{name}' {h.describe()} is more than twice {first}'s "
                                  f"({human(self.member_bytes)}): crafted or from another set; remove it")
        else:
            self.member_bytes = h.nbytes

    def _read(self, path: Path, label_dim: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        arrays, members = npz_arrays(path, ("endpoints", "arr_0", "label"), MAX_NPZ_MEMBER,
                                     "for one official KDM pair file (crafted or corrupt?)",
                                     lambda name, h: self._check(path, name, h))
        key = next((k for k in ("endpoints", "arr_0") if k in arrays), None)
        if key is None:
            raise ConfigError(f"{path}: no 'arr_0' or 'endpoints' array (has {', '.join(members) or 'nothing'}); "
                              f"is this an official KDM pair file?")
        arr, y = arrays[key], arrays.get("label")
        if y is not None:
            y = one_hot(y.reshape(1) if y.ndim == 0 else y.reshape(1, -1), label_dim, str(path))[0]
        return arr, y

    def where(self, i: int) -> str:
        return str(self.files[i])

    def ends(self, start: int, stop: int) -> Ends:
        rows = []
        for path in self.files[start:stop]:
            arr, y = self._read(path, self.label_dim or None)
            if (y is None) != (self.label_dim == 0):
                raise ConfigError(f"{path}: pair of shape {arr.shape[1:]}{' with' if y is not None else ' without'} "
                                  f"labels, unlike {self.files[0].name} {self.shape}")
            rows.append((arr, y))
        arr, y = np.stack([r[0] for r in rows]), [r[1] for r in rows]
        return arr[:, 0], arr[:, -1], np.stack(y) if self.label_dim else None, arr if self.states else None


def torch_file(path: Path) -> object:
    """A torch.save'd file, tensors only (weights_only), memory-mapped when the file format allows it."""
    try:
        try:
            return tensorfile.load(path, mmap=True)
        except tensorfile.UnloadableError:      # legacy (non-zip) files cannot be mapped
            return tensorfile.load(path)
    except tensorfile.UnloadableError as e:
        raise ConfigError(f"{path}: not a file of plain tensors ({e.why}); re-save plain tensors with torch.save"
                          ) from None


class ChunkedSource(Source):
    """Files of many pairs each (GET's chunks, FastGen's shards), read one file at a time (the last one cached).
    Subclasses list `files`, call `_index` with each file's pair count, and `_load` a file as
    (x_T, x_0, one-hot labels or None) arrays."""

    two_ended = False

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _index(self, counts: list[int]) -> None:
        self._cached: tuple[int, tuple] | None = None
        self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.n = self.starts[-1]
        a, _, y = self._file(0)
        self.shape, self.label_dim = tuple(a.shape[1:]), 0 if y is None else y.shape[1]

    def _file(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self._cached is None or self._cached[0] != i:
            self._cached = (i, self._load(i))
        return self._cached[1]

    def where(self, i: int) -> str:
        f = bisect.bisect_right(self.starts, i) - 1
        return f"{self.files[f]} (pair {i - self.starts[f]} of that file)"

    def ends(self, start: int, stop: int) -> Ends:
        parts = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            a, b, y = self._file(i)
            lo, hi = start - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            if a.shape[1:] != self.shape or b.shape[1:] != self.shape:
                raise ConfigError(f"{self.files[i]}: pairs of shape {a.shape[1:]}, unlike {self.shape}")
            if (y is None) != (self.label_dim == 0):
                raise ConfigError(f"{self.files[i]}: labels {'missing' if y is None else 'present'}, unlike in "
                                  f"{self.files[0].name}")
            parts.append((a[lo:hi], b[lo:hi], None if y is None else y[lo:hi]))
            start, i = self.starts[i] + hi, i + 1
        a, b, y = zip(*parts)
        return np.concatenate(a), np.concatenate(b), np.concatenate(y) if self.label_dim else None, None


class GetFiles(ChunkedSource):
    """GET's folders: `latent/` files hold unit z (or [z, one-hot labels]), `image/` files the matching x_0."""

    def __init__(self, root: Path, sigma_max: float):
        self.files, self.image = listing(root / "latent"), listing(root / "image")
        if [p.name for p in self.files] != [p.name for p in self.image]:
            raise ConfigError(f"{root}: latent/ and image/ hold different file names")
        self.x_T_scale = sigma_max
        self.digest = files_digest(self.files + self.image, root, contents=False)
        self.x_T_convention = "x_T = sigma_max * z, z from GET's latent/ files; no generator seed"
        self._index([len(torch_file(p)) for p in self.image])

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        lat, x = torch_file(self.files[i]), torch_file(self.image[i])
        z, y = lat if isinstance(lat, (list, tuple)) and len(lat) == 2 else (lat, None)
        if not (isinstance(z, torch.Tensor) and isinstance(x, torch.Tensor)) or z.ndim < 2 or len(z) != len(x) \
                or (y is not None and (not isinstance(y, torch.Tensor) or y.ndim != 2 or len(y) != len(z))):
            raise ConfigError(f"{self.files[i]} / {self.image[i].name}: expected (N, ...) tensors z (or [z, "
                              f"labels]) and x_0 with the same number of pairs N")
        return (self.x_T_scale * z.double().numpy(), x.numpy(),
                None if y is None else one_hot(y.numpy(), self.label_dim or None, str(self.files[i])))


class FastGenShards(ChunkedSource):
    """FastGen's KD WebDataset shards, one pair per sample: `<key>.real.npy` (x_0), `<key>.noise.npy` (x_T)
    [, `<key>.condition.npy` one-hot or int class]; other members (a `path`, text) are not imported."""

    def __init__(self, folder: Path, label_dim: int | None):
        self.files, self.label_dim_arg = listing(folder, "*.tar"), label_dim
        self.digest = files_digest(self.files, folder, contents=False)
        self.x_T_convention = "x_T as FastGen's noise.npy holds it (std checked against sigma_max); no generator seed"
        counts = []
        for path in self.files:
            try:
                with tarfile.open(path) as tar:
                    counts.append(sum(m.name.endswith(".real.npy") for m in tar))
            except (tarfile.TarError, OSError) as e:
                raise ConfigError(f"{path}: not a readable tar ({e})") from None
        self._index(counts)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        path, samples = self.files[i], {}
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, name = m.name.partition(".")
                if m.isfile() and name in ("real.npy", "noise.npy", "condition.npy"):
                    samples.setdefault(key, {})[name] = npy_from_bytes(tar.extractfile(m).read())
        rows = [v for v in samples.values() if "real.npy" in v]
        if any("noise.npy" not in v or v["noise.npy"].shape != v["real.npy"].shape for v in rows):
            raise ConfigError(f"{path}: a sample without noise.npy, or of a shape unlike its real.npy; FastGen "
                              f"KD pairs hold both")
        shapes = {v["real.npy"].shape for v in rows}
        if len(shapes) != 1:
            raise ConfigError(f"{path}: samples of shapes {sorted(shapes)}; one pair set holds one shape")
        conds = [v.get("condition.npy") for v in rows]
        if any((c is None) != (conds[0] is None) for c in conds):
            raise ConfigError(f"{path}: some samples have condition.npy and some do not")
        y = None
        if conds[0] is not None:
            c = np.stack(conds)
            y = one_hot(c.reshape(len(c), -1) if c[0].size > 1 else c.reshape(-1).astype(np.int64),
                        self.label_dim_arg or self.label_dim or None, str(path))
        return np.stack([v["noise.npy"] for v in rows]), np.stack([v["real.npy"] for v in rows]), y


def npy_file(path: Path, what: str) -> np.ndarray:
    """A `.npy` array, memory-mapped once its header has been checked (numeric, sizes ≥ 0, fits the file)."""
    if Path(path).suffix == ".npz":
        raise ConfigError(f"{what} {path} is an .npz archive; --x-T/--x-0/--labels and a stack take .npy arrays "
                          f"(numpy.save); a folder of official KDM .npz pairs is imported with --format kdm-npz")
    return load_npy(path)


class NpyArrays(Source):
    """Plain arrays: a (T, N, ...) stack (x_T at index 0, x_0 at −1) or two (N, ...) files; optional labels."""

    def __init__(self, cfg: ImportConfig):
        paths = [cfg.src] if cfg.stack else [cfg.x_T, cfg.x_0]
        if cfg.stack:
            s = npy_file(cfg.src, "SRC")
            if s.ndim < 3 or len(s) < 2:
                raise ConfigError(f"{cfg.src}: shape {s.shape}; a stack is (T ≥ 2, N, ...), x_T at 0, x_0 at −1 "
                                  f"(two (N, ...) arrays go to --x-T and --x-0)")
            self.a, self.b, self.stack = s[0], s[-1], s
            self.states = len(s) if cfg.trajectory and len(s) > 2 else 0
        else:
            self.a, self.b = npy_file(cfg.x_T, "--x-T"), npy_file(cfg.x_0, "--x-0")
            if self.a.ndim < 2 or self.b.ndim < 2:
                raise ConfigError(f"--x-T {cfg.x_T} {self.a.shape} and --x-0 {cfg.x_0} {self.b.shape} must both be "
                                  f"(N, ...) arrays with one pair per row")
            if self.a.shape != self.b.shape:
                what = "numbers of pairs" if self.a.shape[1:] == self.b.shape[1:] else "pair shapes"
                raise ConfigError(f"--x-T {cfg.x_T} {self.a.shape} and --x-0 {cfg.x_0} {self.b.shape} differ in "
                                  f"{what}; pass the two ends of the same pairs, row i of each being pair i")
        self.paths = [str(p) for p in paths]
        self.two_ended = cfg.stack
        self.n, self.shape = len(self.a), tuple(self.a.shape[1:])
        self.y = None
        if cfg.labels is not None:
            y = npy_file(cfg.labels, "--labels")
            if y.ndim not in (1, 2) or len(y) != self.n:
                raise ConfigError(f"--labels {cfg.labels}: shape {y.shape}; expected ({self.n},) int classes or "
                                  f"({self.n}, label_dim) one-hot rows, one per pair")
            if y.ndim == 1:
                if y.dtype.kind not in "iu":
                    raise ConfigError(f"--labels {cfg.labels}: (N,) labels of dtype {y.dtype}; class labels are "
                                      f"integers (or pass (N, label_dim) one-hot rows)")
                dim = int_label_dim(y, cfg.label_dim, f"--labels {cfg.labels}")
            else:
                dim = y.shape[1]
                if cfg.label_dim is not None and dim != cfg.label_dim:
                    raise ConfigError(f"--labels {cfg.labels}: one-hot rows of width {dim}, but --label-dim "
                                      f"{cfg.label_dim}")
                if dim > MAX_LABEL_DIM:
                    raise ConfigError(f"--labels {cfg.labels}: one-hot rows of width {dim:,}, over the limit of "
                                      f"{MAX_LABEL_DIM:,} classes")
            self.y, self.label_dim = y, dim
            paths.append(cfg.labels)
        self.digest_paths = paths

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of every byte: computed when first needed, i.e. after the cheap checks (free disk space)."""
        return files_digest(self.digest_paths, None, contents=True)

    def ends(self, start: int, stop: int) -> Ends:
        y = None if self.y is None else one_hot(np.asarray(self.y[start:stop]), self.label_dim, "labels")
        states = np.moveaxis(np.array(self.stack[:, start:stop]), 0, 1) if self.states else None
        return np.array(self.a[start:stop]), np.array(self.b[start:stop]), y, states

    def where(self, i: int) -> str:
        return " / ".join(self.paths) + f" (row {i})"


FOLDERS = {"kdm-npz": "of .npz pair files", "get": "holding latent/ and image/",
           "rectified-flow": "holding z0.npy and z1.npy", "fastgen": "of WebDataset .tar shards"}


def rectified_flow_arrays(cfg: ImportConfig) -> ImportConfig:
    """Rectified flow's pair files as npy arrays: z0.npy the noise (x_T, unit std by default), z1.npy the data
    (x_0), labels.npy (int classes) when present."""
    missing = [n for n in ("z0.npy", "z1.npy") if not (cfg.src / n).is_file()]
    if missing:
        raise ConfigError(f"{cfg.src} has no {' or '.join(missing)}; a rectified-flow pair folder holds z0.npy "
                          f"(noise) and z1.npy (data)")
    labels = cfg.src / "labels.npy"
    return cfg.model_copy(update={"x_T": cfg.src / "z0.npy", "x_0": cfg.src / "z1.npy", "src": None,
                                  "labels": labels if labels.is_file() else None})


def open_source(cfg: ImportConfig) -> Source:
    if cfg.src is not None and not cfg.src.exists():
        raise ConfigError(f"SRC {cfg.src} does not exist")
    if cfg.format in FOLDERS and not cfg.src.is_dir():
        raise ConfigError(f"SRC {cfg.src} is a file; --format {cfg.format} takes a folder ({FOLDERS[cfg.format]})"
                          f"{'; a single .npy array is --format npy' if cfg.src.suffix == '.npy' else ''}")
    if cfg.format == "kdm-npz":
        src: Source = KdmNpz(cfg.src, cfg.label_dim, cfg.trajectory)
    elif cfg.format == "get":
        src = GetFiles(cfg.src, cfg.sigma)
    elif cfg.format == "rectified-flow":
        src = NpyArrays(rectified_flow_arrays(cfg))
    elif cfg.format == "fastgen":
        src = FastGenShards(cfg.src, cfg.label_dim)
    else:
        src = NpyArrays(cfg)
    if src.n == 0 or math.prod(src.shape) == 0:
        raise ConfigError(f"{cfg.src or cfg.x_T}: {src.n} pairs of shape {src.shape}: nothing to import")
    return src


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
    a, b, _, _ = src.ends(0, k)
    finite = np.isfinite(a.reshape(k, -1)).all(1) & np.isfinite(b.reshape(k, -1)).all(1)
    if not finite.all():
        first = src.where(int(np.argmin(finite)))
        raise ConfigError(f"non-finite values among source pairs 0..{k - 1}, first at {first}; fix or drop those pairs "
                          f"and rerun (nothing was imported)")
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
    """Pairs [start, stop) as x_T, x_0 (source dtype), one-hot labels and the trajectory states (B, T, ...) ordered
    from x_T to x_0; ConfigError on non-finite values."""
    a, b, y, states = src.ends(start, stop)
    x_T, x_0 = (b, a) if swap else (a, b)
    traj = None if states is None else states[:, ::-1] if swap else states
    for name, v in (("x_T", x_T), ("x_0", x_0)) + ((("traj", traj),) if traj is not None else ()):
        finite = np.isfinite(v.reshape(len(v), -1)).all(1)
        if not finite.all():
            i = start + int(np.argmin(finite))
            raise ConfigError(f"{src.where(i)}: non-finite {name} (NaN or inf) in pair {i} of the source; fix or "
                              f"drop that pair and rerun (nothing was imported)")
    return {"x_T": x_T, "x_0": x_0} | ({} if y is None else {"label": y}) | ({} if traj is None else {"traj": traj})


def state_times(cfg: ImportConfig, src: Source, swap: bool) -> list[float] | None:
    """The time (σ) of each kept state, ordered from x_T to x_0: `--times` as given in the source's order, or by
    default evenly spaced from sigma_max to 0 (a flow-matching stack's t = 1 → 0 when sigma_max is 1)."""
    if not src.states:
        if cfg.times is not None:
            raise ConfigError(f"--times: {cfg.src or cfg.x_T} keeps no intermediate states (a (T > 2, N, ...) stack "
                              f"or kdm-npz trajectory files do, unless --ends-only)")
        return None
    times = cfg.times if cfg.times is not None else np.linspace(cfg.sigma, 0, src.states).tolist()
    if len(times) != src.states:
        raise ConfigError(f"--times lists {len(times)} values but {cfg.src} holds {src.states} states per pair; "
                          f"give one time per state, in the source's order")
    times = times[::-1] if swap and cfg.times is not None else times
    if not all(a > b for a, b in zip(times[:-1], times[1:])) or times[-1] < 0:
        raise ConfigError(f"--times {cfg.times}: the times must fall strictly from x_T's to x_0's (≥ 0), "
                          f"e.g. EDM σ_max … 0 or flow-matching 1 … 0")
    return [float(t) for t in times]
