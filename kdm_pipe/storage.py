"""Where pair sets and runs live: a local path or an `s3://` URL (any S3-compatible store), one vocabulary for both.

`location(value)` turns what a user typed into a `pathlib.Path` (local) or a `upath.UPath` over fsspec + s3fs
(remote); both join with `/` and answer `exists`, `is_file`, `glob`, `open`, `read_text`, `unlink`. What differs is
how a finished file becomes visible, and that is said once here:

    commit_file(tmp, dest)    local: os.replace (a rename); remote: one upload of the finished local file (a PUT,
                              or a multipart upload completed in one call: S3 shows no object until it is whole),
                              then its size and sha256 are read back and compared before anyone is told of it
    write_text(dest, text)    the same for small files (manifests, configs, logs): a temp file + rename, or one PUT

Credentials and the endpoint come from the standard places (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles,
AWS_ENDPOINT_URL); `--storage-option KEY=VALUE` adds anything else (handed to s3fs.S3FileSystem). The options travel
with each remote location (a UPath pickles them), so Ray and loader workers reach the same store as the driver; they
are never written into a config or log, since they may hold secrets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Iterator

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from kdm_pipe.errors import ConfigError, DataError, one_line

SCHEMES = ("s3",)
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(?:/+(.*))?")  # typer's Path folds s3://b to s3:/b, and s3:// to s3:
# Listings must show what other processes (Ray workers, a killed earlier run) wrote: no cached directory listings.
_DEFAULTS: dict[str, Any] = {"use_listings_cache": False}
_options: dict[str, Any] = {}
READ_BLOCK = 8 << 20                                        # remote reads fetch ahead in 8 MiB blocks


def set_options(pairs: list[str] | None) -> None:
    """`--storage-option KEY=VALUE` (repeatable); a VALUE that parses as JSON (true, 3, {"a": 1}) is taken as such."""
    _options.clear()
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--storage-option {pair!r}: expected KEY=VALUE, e.g. --storage-option "
                              f"endpoint_url=http://minio:9000")
        try:
            _options[key.strip()] = json.loads(value)
        except ValueError:
            _options[key.strip()] = value



def is_remote(loc: Any) -> bool:
    return type(loc).__module__.startswith("upath")


def location(value: Any) -> Any:
    """A local `Path` or a remote `UPath` for what the user typed; ValueError naming what is supported otherwise."""
    if is_remote(value):
        return value
    m = _URL.fullmatch(str(value))
    if m is None:
        return Path(value)
    scheme, rest = m[1].lower(), (m[2] or "").strip("/")
    value = f"{scheme}://{rest}"
    if scheme not in SCHEMES:
        raise ValueError(f"{value!r}: {scheme}:// is not supported; kdm-pipe reads and writes local paths and "
                         f"s3:// URLs (any S3-compatible store: set AWS_ENDPOINT_URL for MinIO, Ceph, R2, …)")
    if not rest or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", rest.split("/")[0]):
        raise ValueError(f"{value!r} is not an s3:// URL of a bucket (s3://BUCKET/PREFIX, the bucket 3–63 "
                         f"lower-case letters, digits, '.' or '-')")
    try:
        import s3fs  # noqa: F401  (fail here, with the fix, rather than deep inside fsspec)
        from upath import UPath
    except ImportError:
        raise ValueError(f"{value!r}: s3:// needs s3fs and universal-pathlib: pip install "
                         f"'kdm-pipe[s3]'") from None
    return UPath(f"s3://{rest}", **{**_DEFAULTS, **_options})


# A config field holding a location: a local Path, or a UPath for an s3:// URL; written out as text.
Location = Annotated[Any, BeforeValidator(location), PlainSerializer(str, return_type=str),
                     WithJsonSchema({"type": "string", "description": "a local path or an s3:// URL"})]


def bucket(loc: Any) -> str:
    return loc.path.split("/")[0]


def check_bucket(loc: Any, what: str) -> None:
    """Refuse (ConfigError, nothing written) a remote location whose bucket is missing or not ours to use: the
    endpoint unreachable, no credentials, credentials refused. Local locations pass; each bucket is asked once."""
    if not is_remote(loc) or (key := (bucket(loc), repr(sorted(loc.storage_options.items())))) in _checked:
        return
    opts = loc.storage_options
    if not (opts.get("anon") or opts.get("key") or _default_credentials(opts.get("profile"))):
        # s3fs would quietly go on anonymously, and the store would refuse the first write much later
        raise ConfigError(f"{what} {loc}: {explain(NoCredentials(), loc)}")
    with remote_errors(loc, what, ConfigError):
        loc.fs.ls(bucket(loc), refresh=True)
    _checked.add(key)


_checked: set[tuple[str, str]] = set()


class NoCredentials(Exception):
    """No credentials anywhere botocore looks (and no --storage-option key=… / anon=true)."""


def _default_credentials(profile: str | None) -> bool:
    import botocore.exceptions
    import botocore.session
    try:
        return botocore.session.Session(profile=profile).get_credentials() is not None
    except botocore.exceptions.ProfileNotFound:
        return False


@contextmanager
def remote_errors(loc: Any, what: str, kind: type[Exception] = DataError) -> Iterator[None]:
    """Failures of the object store as one line naming the location and the fix: `kind` (ConfigError before a
    stage has written anything, DataError afterwards)."""
    try:
        yield
    except (ConfigError, DataError):
        raise
    except Exception as e:  # noqa: BLE001  (botocore, aiohttp and s3fs raise many kinds)
        if not is_remote(loc):
            raise
        raise kind(f"{what} {loc}: {explain(e, loc)}") from None


def explain(e: BaseException, loc: Any) -> str:
    name, text = type(e).__name__, one_line(str(e))
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return ("no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), pass "
                "--storage-option key=… --storage-option secret=…, or --storage-option anon=true for a public bucket")
    if isinstance(e, PermissionError) or re.search(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden",
                                                   f"{name} {text}"):
        return f"access denied ({text}); check the credentials and that they may use bucket {bucket(loc)}"
    if isinstance(e, FileNotFoundError) and "bucket" in text.lower():
        return f"bucket {bucket(loc)} does not exist; create it (e.g. `aws s3 mb s3://{bucket(loc)}`) or fix the URL"
    if re.search(r"Connect|Endpoint|Timeout|Name or service", f"{name} {text}"):
        return (f"cannot reach the object store ({text}); check AWS_ENDPOINT_URL or --storage-option "
                f"endpoint_url=…")
    return f"{name}: {text}"


# ---- reading ---------------------------------------------------------------------------------------------------

def open_read(loc: Any) -> BinaryIO:
    """A seekable binary reader; remote objects stream in READ_BLOCK blocks (no download of the whole object)."""
    if is_remote(loc):
        return loc.fs.open(loc.path, "rb", block_size=READ_BLOCK, cache_type="readahead")
    return open(loc, "rb")


def size_of(f: BinaryIO) -> int:
    if hasattr(f, "size") and not callable(f.size):        # an fsspec file knows its object's size
        return int(f.size)
    return os.fstat(f.fileno()).st_size


def sha256(loc: Any) -> str:
    h = hashlib.sha256()
    with open_read(loc) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp(loc: Any) -> list | None:
    """What changes whenever the file's bytes may have: local (size, mtime, ctime, inode: ctime cannot be set by
    users, so a same-size rewrite with its mtime restored still shows); remote (size, ETag, last modified). None if
    missing."""
    try:
        if is_remote(loc):
            info = loc.fs.info(loc.path)
            return [info["size"], info.get("ETag"), str(info.get("LastModified"))]
        st = Path(loc).stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    except FileNotFoundError:
        return None


# ---- committing ------------------------------------------------------------------------------------------------

def upload_dir(parent: Any) -> Path:
    """The local directory where files bound for the remote directory `parent` are finished before their upload:
    one per destination, so a run holding `parent`'s lock may clear what killed attempts left there."""
    import tempfile
    return Path(tempfile.gettempdir()) / "kdm-pipe-uploads" / hashlib.sha256(str(parent).encode()).hexdigest()[:16]


def temp_beside(dest: Any) -> Path:
    """A local temporary file for what will become `dest`: beside it locally (so the rename is atomic), in
    upload_dir(dest.parent) for a remote `dest` (uploaded from there)."""
    name = f".{dest.name}.tmp-{uuid.uuid4().hex}"
    if is_remote(dest):
        tmp = upload_dir(dest.parent) / name
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return tmp
    return Path(dest).with_name(name)


def abort_uploads(directory: Any, prefix: str) -> None:
    """Abort unfinished multipart uploads (s3fs uploads large files in parts) of objects `directory/prefix*`
    started by a process that died: never visible as objects, but stored (and billed) until aborted."""
    key = f"{directory.path.partition('/')[2].rstrip('/')}/{prefix}".lstrip("/")
    listed = directory.fs.call_s3("list_multipart_uploads", Bucket=bucket(directory), Prefix=key)
    for up in listed.get("Uploads", []):
        directory.fs.call_s3("abort_multipart_upload", Bucket=bucket(directory), Key=up["Key"],
                             UploadId=up["UploadId"])


def commit_file(tmp: Path, dest: Any, size: int | None = None, digest: str | None = None) -> None:
    """Make the finished local file `tmp` visible as `dest`, all or nothing (see the module docstring); `tmp` is
    gone afterwards. Remote: the uploaded object's size (and sha256, when `digest` is given) must match, else the
    object is removed and DataError raised."""
    if not is_remote(dest):
        os.replace(tmp, dest)
        return
    try:
        with remote_errors(dest, "uploading"):
            dest.fs.put_file(str(tmp), dest.path)
            have = dest.fs.info(dest.path)["size"]
            problem = (f"{have} bytes arrived, {size} were sent" if size is not None and have != size else
                       "sha256 differs from what was sent" if digest is not None and sha256(dest) != digest else None)
        if problem:
            dest.fs.rm_file(dest.path)
            raise DataError(f"uploading {dest}: {problem}; the object was removed, rerun the same command")
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(dest: Any, data: bytes) -> None:
    """Replace `dest` with `data` all or nothing (a temp file, fsync'd so that a crash after the rename never leaves
    an empty file, then renamed; one PUT remotely)."""
    if is_remote(dest):
        with remote_errors(dest, "writing"):
            dest.write_bytes(data)
        return
    tmp = temp_beside(dest)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:                                        # interrupted (SIGTERM, a full disk): leave no temp file
        tmp.unlink(missing_ok=True)


def write_text(dest: Any, text: str) -> None:
    write_bytes(dest, text.encode())


def remove(loc: Any) -> None:
    if is_remote(loc):
        try:
            loc.fs.rm_file(loc.path)
        except FileNotFoundError:
            pass
    else:
        Path(loc).unlink(missing_ok=True)


def check_new_dir(out: Path, flag: str) -> None:
    """A local output directory that must be new or empty (nothing is overwritten), under an existing parent."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConfigError(f"{flag} {out} exists and is not an empty directory; remove it or pick a new path")
    if not out.absolute().parent.is_dir():
        raise ConfigError(f"{flag} {out}: its parent directory does not exist; create it first")


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh directory path beside `out` (new or empty) to write into: renamed to `out` when the block succeeds,
    removed when it fails, so `out` appears whole or not at all."""
    tmp = out.absolute().parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
