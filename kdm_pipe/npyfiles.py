"""Arrays from files that users hand to kdm-pipe (`import` sources, `teacher train` / `stats ref` data), read header
first: plain `.npy` files and the `.npy` members of `.npz` zips.

Nothing is allocated or inflated before the header has been checked: the magic string (a zip, a pickle or text is
named as such), a plain numeric dtype (object arrays would need pickle: never), every dimension ≥ 0, a declared
size that fits the bytes actually there (the file, or the uncompressed size a zip's directory records for the
member) and the caller's cap. zipfile never returns more than the recorded size of a member, so a crafted member
cannot inflate past the size checked here. Every refusal is a ConfigError of one line naming the file, what was
found and how to fix it.
"""

from __future__ import annotations

import ast
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np

from kdm_pipe.errors import ConfigError

MAGIC = b"\x93NUMPY"
MAX_HEADER = 10_000             # numpy's own default limit on a header's length
NUMERIC = "biuf"                # bool, int, unsigned, float


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError


@dataclass(frozen=True)
class Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int                 # bytes before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize      # Python ints: no overflow for crafted shapes

    def describe(self) -> str:
        return f"shape {self.shape} {self.dtype} ({human(self.nbytes)})"


def _what(prefix: bytes) -> str:
    if prefix.startswith(b"PK\x03\x04") or prefix.startswith(b"PK\x05\x06"):
        return "a zip archive (.npz?)"
    if prefix[:1] == b"\x80" or prefix.startswith(b"(dp") or prefix.startswith(b"(lp"):
        return "a Python pickle"
    if not prefix:
        return "an empty file"
    if prefix.startswith(b"\x1f\x8b"):
        return "a gzip file"
    return f"it starts with {prefix[:6]!r}"


def read_header(f: IO[bytes], where: str, kinds: str = NUMERIC, error: type[Exception] = ConfigError) -> Header:
    """The checked header of the `.npy` stream `f` positioned at its start; leaves `f` at the first data byte.

    The one `.npy` header parser. A refusal is `error`: ConfigError (a file a user handed over) names `where`, what
    is wrong and how to fix it; any other kind (a shard member, whose reader names the shard and its repair) says
    only what is wrong."""
    def refuse(what: str, fix: str) -> Exception:
        return ConfigError(f"{where}: {what}; {fix}") if error is ConfigError else error(what)

    prefix = f.read(8)
    if prefix[:6] != MAGIC:
        raise refuse(f"not an .npy array ({_what(prefix)})", "save the array with numpy.save")
    version = (prefix[6], prefix[7]) if len(prefix) == 8 else None
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise refuse(f"unsupported .npy format version {version}", "save it again with numpy.save")
    width = 2 if version == (1, 0) else 4
    raw = f.read(width)
    length = int.from_bytes(raw, "little")
    if len(raw) != width or length > MAX_HEADER:
        raise refuse(f".npy header of {length} bytes (limit {MAX_HEADER}): corrupt or crafted file",
                     "save the array again with numpy.save")
    text = f.read(length)
    try:
        d = ast.literal_eval(text.decode("utf8" if version == (3, 0) else "latin1"))
        shape, fortran = d["shape"], d["fortran_order"]
        dtype = np.lib.format.descr_to_dtype(d["descr"])
        if not (isinstance(shape, tuple) and all(type(s) is int for s in shape) and isinstance(fortran, bool)):
            raise ValueError("shape is not a tuple of ints")
    except (ValueError, SyntaxError, TypeError, KeyError, UnicodeDecodeError, MemoryError, RecursionError) as e:
        raise refuse(f"unreadable .npy header ({type(e).__name__}: {e})", "save the array again with numpy.save"
                     ) from None
    if dtype.hasobject:
        raise refuse(f"holds Python objects (dtype {dtype}), which could only be read by unpickling",
                     "kdm-pipe never unpickles data: save a numeric array, e.g. numpy.save(path, a.astype("
                     "numpy.float32))")
    if dtype.kind not in kinds or dtype.names is not None or dtype.subdtype is not None:
        raise refuse(f"dtype {dtype} is not a plain numeric array ({'/'.join(kinds)})",
                     "save it as float32 (or integer labels)")
    if any(s < 0 for s in shape):
        raise refuse(f"header declares shape {shape} with a negative size: corrupt or crafted file",
                     "save the array again with numpy.save")
    return Header(tuple(shape), dtype, fortran, len(prefix) + width + length)


def _fits(h: Header, available: int, where: str, max_bytes: int | None, why: str) -> None:
    if h.nbytes > available:
        raise ConfigError(f"{where}: header declares {h.describe()} but only {human(available)} follow it: "
                          f"truncated, corrupt or crafted; copy or export it again")
    if max_bytes is not None and h.nbytes > max_bytes:
        raise ConfigError(f"{where}: {h.describe()} is over the {human(max_bytes)} limit {why}")


def npy_header(path: Path, kinds: str = NUMERIC) -> Header:
    """The checked header of the `.npy` file `path`, its declared data shown to fit the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not an .npy file")
    try:
        with open(path, "rb") as f:
            h = read_header(f, str(path), kinds)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    _fits(h, path.stat().st_size - h.offset, str(path), None, "")
    return h


def load_npy(path: Path, kinds: str = NUMERIC, max_bytes: int | None = None, why: str = "",
             mmap: bool = True) -> np.ndarray:
    """`path` as an array once its header passed `npy_header` (and `max_bytes`); memory-mapped read-only unless
    `mmap` is False (an empty array is never mapped)."""
    h = npy_header(path, kinds)
    _fits(h, h.nbytes, str(path), max_bytes, why)
    try:
        return np.load(path, mmap_mode="r" if mmap and h.nbytes else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable .npy array ({e})") from None


def npz_arrays(path: Path, names: tuple[str, ...], max_bytes: int, why: str,
               check: Callable[[str, Header], None] = lambda name, h: None
               ) -> tuple[dict[str, np.ndarray], list[str]]:
    """({name: array} of the members `names` (without `.npy`) that the `.npz` file `path` holds, all its member
    names): each member read only after its recorded uncompressed size and its header have been checked (sizes
    against `max_bytes`, then `check`), and read to its end so that zipfile verifies its CRC."""
    where = str(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename.removesuffix(".npy"): i for i in z.infolist()}
            out = {}
            for name in names:
                info = infos.get(name)
                if info is None:
                    continue
                member = f"{where} member {info.filename}"
                if info.file_size > max_bytes + MAX_HEADER + 64:
                    raise ConfigError(f"{member}: {human(info.file_size)} once inflated (from "
                                      f"{human(info.compress_size)}), over the {human(max_bytes)} limit {why}")
                with z.open(info) as f:
                    h = read_header(f, member)
                    _fits(h, info.file_size - h.offset, member, max_bytes, why)
                    check(name, h)
                    data = f.read(h.nbytes)
                    while f.read(1 << 20):      # the rest (bounded by the checked size): zipfile checks the CRC
                        pass
                if len(data) != h.nbytes:
                    raise ConfigError(f"{member}: ends after {len(data)} of {h.nbytes} data bytes; export it again")
                out[name] = np.frombuffer(data, h.dtype).reshape(h.shape, order="F" if h.fortran else "C")
            return out, sorted(infos)
    except ConfigError:
        raise
    except zipfile.BadZipFile as e:
        raise ConfigError(f"{where}: not a readable .npz (zip) file ({e}); export it again") from None
    except (zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"{where}: not a readable .npz ({type(e).__name__}: {e}); export it again") from None
