"""A training run directory, and the one place that reads and writes its files.

    RUN/config.json            the resolved TrainConfig
    RUN/split.json             training and held-out shard names, and the pairs they came from: the pair set's
                               path relative to RUN and each shard's sha256 (so a moved run finds its pairs, and
                               a resume refuses different pairs under the same path), and the digest of the pairs
                               the memorisation filter excluded from them (a resume refuses a changed filter)
    RUN/checkpoints/ckpt-STEP.pt (+ .sha256)   state dicts; the checksum file is written before the checkpoint
                               appears, so every visible checkpoint can be checked; a damaged one is passed over
                               for the newest intact one, with a warning; weights with a non-finite value are never
                               saved (a diverged run keeps its last finite checkpoint as the newest)
    RUN/.kdm-pipe.lock         held by the one `train` writing the run (kdm_pipe.locks; a lease on s3://)
    RUN/train.jsonl, eval.json, latents.zarr, tensorboard/, report.html

RUN may be an s3:// URL: the run is then worked on in a local mirror (kdm_pipe.mirror; `path` is the mirror,
`location` the URL). Checkpoints are listed in the bucket and downloaded when first read; a saved checkpoint is
pushed after the run's other changed files and its checksum file, so the bucket never shows a checkpoint without
its checksum, nor one whose config.json and split.json are missing.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
from pydantic import ValidationError

from kdm_pipe import mirror, storage, tensorfile
from kdm_pipe.config import TrainConfig, format_validation
from kdm_pipe.errors import ConfigError, DiskFull, disk_full
from kdm_pipe.integrity import checked_manifest
from kdm_pipe.locks import Lock, directory_lock
from kdm_pipe.manifest import MANIFEST, Manifest

CONFIG, SPLIT, EVAL, LOG, CKPT_DIR = "config.json", "split.json", "eval.json", "train.jsonl", "checkpoints"
ANALYSIS = "analysis"                   # analyze's figures and analysis.json
LOGS = (LOG, "latents.zarr", "tensorboard")        # what a resumed run appends to
# What evaluate, sample, analyze and the report read besides the checkpoint (pulled first for a run on s3://).
READ = (CONFIG, SPLIT, "weights.json", EVAL, LOG, "latents.zarr", f"{ANALYSIS}/analysis.json", "report.html")
_warned: set[Path] = set()              # damaged checkpoints already reported by this process


class Run:
    def __init__(self, where: Any) -> None:
        loc = storage.location(where)
        self.mirror = mirror.of(loc) if storage.is_remote(loc) else mirror.at(Path(loc))
        self.path: Path = self.mirror.local if self.mirror else Path(loc)       # where its files are read and written
        self.location: Any = self.mirror.remote if self.mirror else self.path   # what the user named

    def __str__(self) -> str:
        return str(self.location)

    def fetch(self, name: str) -> Path:
        """RUN/name, downloaded first for a run on an object store (when it is there and not here yet)."""
        if self.mirror is not None:
            self.mirror.pull(name)
        return self.path / name

    def exists(self) -> bool:
        return self.fetch(CONFIG).is_file()

    def require(self) -> "Run":
        if not self.exists():
            raise ConfigError(f"{self.location} is not a training run (no {CONFIG}); pass the --out directory of "
                              f"`kdm-pipe train`")
        return self

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self.fetch(name).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.location}/{name} is missing; the run is incomplete (rerun `kdm-pipe train "
                              f"--out {self.location} --resume`)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.location}/{name} is not valid JSON ({e}); restore it or retrain") from None

    @cached_property
    def config(self) -> TrainConfig:
        self.require()
        try:
            return TrainConfig.model_validate(self.read_json(CONFIG))
        except ValidationError as e:
            raise ConfigError(f"{self.location}/{CONFIG} is not a kdm-pipe run config: {format_validation(e)}"
                              ) from None

    @cached_property
    def split(self) -> dict[str, Any]:
        return self.require().read_json(SPLIT)

    def write_split(self, data: Any, manifest: Manifest, train: list[str], holdout: list[str],
                    excluded: str) -> None:
        sha = {s.name: s.sha256 for s in manifest.shards}
        relative = self._relative(storage.location(data))
        storage.write_text(self.path / SPLIT, json.dumps({
            "train": train, "holdout": holdout,
            **({} if relative is None else {"data_from_run": relative}),
            "sha256": {n: sha[n] for n in train + holdout},
            "excluded_sha256": excluded}, indent=1))
        self.__dict__.pop("split", None)

    def _relative(self, data: Any) -> str | None:
        """The pairs' place relative to the run, when both are local or both in one bucket (else None)."""
        if storage.is_remote(data) != storage.is_remote(self.location):
            return None
        if not storage.is_remote(data):
            return os.path.relpath(Path(data).resolve(), self.path.resolve())
        if storage.bucket(data) != storage.bucket(self.location):
            return None
        return posixpath.relpath(data.path, self.location.path)

    def same_pairs(self, manifest: Manifest) -> bool:
        """Whether `manifest` lists exactly the shards (by sha256) this run was split on."""
        recorded = self.split.get("sha256")
        have = {s.name: s.sha256 for s in manifest.shards}
        return recorded is None or all(have.get(n) == h for n, h in recorded.items())

    def data_dir(self, override: Any = None) -> Any:
        """Where the run's pairs are: --data if given, else the recorded path, else the same place relative to
        RUN (a run moved together with its pairs)."""
        if override is not None:
            return storage.location(override)
        candidates = [storage.location(self.config.data)]
        if "data_from_run" in (split := self.split if self.fetch(SPLIT).is_file() else {}):
            rel = split["data_from_run"]
            candidates.append(storage.location(f"s3://{posixpath.normpath(f'{self.location.path}/{rel}')}")
                              if storage.is_remote(self.location) else self.path / rel)
        for c in candidates:
            with storage.remote_errors(c, "reading", ConfigError):
                if (c / MANIFEST).is_file():
                    return c
        raise ConfigError(f"the pairs of run {self.location} are not at {' nor '.join(map(str, candidates))}; "
                          f"pass --data DIR")

    def manifest(self, data: Path | None = None) -> Manifest:
        """The manifest of the run's pairs (or of --data, which must be pairs of the same kind)."""
        directory = self.data_dir(data)
        manifest = checked_manifest(directory, "--data" if data is not None else "")
        if data is not None:
            trained = self.manifest()
            if (manifest.shape, manifest.label_dim) != (trained.shape, trained.label_dim):
                raise ConfigError(f"--data {data}: pairs of shape {manifest.shape} ({manifest.label_dim} classes), but "
                                  f"the run trained on shape {trained.shape} ({trained.label_dim} classes)")
        return manifest

    # Checkpoints

    @property
    def ckpt_dir(self) -> Path:
        return self.path / CKPT_DIR

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first (intact or not); on an object store those in the bucket (local paths in
        the mirror, downloaded when read)."""
        if self.mirror is not None:
            return [self.ckpt_dir / n for n in self.mirror.listing(CKPT_DIR, "ckpt-*.pt")]
        return sorted(self.ckpt_dir.glob("ckpt-*.pt"))

    def lock(self, command: str) -> ContextManager[Lock]:
        """One writer per run: RUN's lock (created first when local), held by `train` while it writes; a second
        writer gets a ConfigError naming the holder. Readers (evaluate, sample) take no lock: they only read
        committed checkpoints (renamed into place complete, with their checksum)."""
        if self.mirror is None:
            self.path.mkdir(parents=True, exist_ok=True)
        return directory_lock(self.location, command)

    def save_checkpoint(self, step: int, state: dict) -> Path | None:
        """Write RUN/checkpoints/ckpt-STEP.pt all or nothing: temp file, fsync, checksum file, then rename (then,
        on an object store, `push`). Weights (the state's "model" and "ema") with a NaN or inf are not written
        (None): a diverged run's newest checkpoint stays its last finite one, what a resume or evaluate reads."""
        if not all(bool(torch.isfinite(t).all()) for part in ("model", "ema") for t in state.get(part, {}).values()
                   if t.is_floating_point()):
            return None
        path = self.ckpt_dir / f"ckpt-{step:08d}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save({"step": step, **state}, f)
                f.flush()
                os.fsync(f.fileno())
            digest = storage.sha256(tmp)
            storage.write_text(path.with_name(path.name + ".sha256"), digest + "\n")
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:       # torch may report a full disk as its own RuntimeError
            if not disk_full(e):
                raise
            tmp.unlink(missing_ok=True)            # (its space counts as free in the message)
            raise DiskFull(self.ckpt_dir, _bytes(state)) from None
        finally:
            tmp.unlink(missing_ok=True)
        if self.mirror is not None:
            self.push(path, digest)
        return path

    def push(self, checkpoint: Path | None = None, digest: str | None = None) -> None:
        """A run on an object store: upload the files that changed (config, split, logs, probes, TensorBoard as
        flushed so far, evaluation outputs), then `checkpoint`'s checksum file, then the checkpoint itself; the
        mirror keeps only the newest checkpoint (the bucket keeps them all). Local runs: nothing to do."""
        if self.mirror is None:
            return
        self.mirror.push_changed(skip=lambda rel: rel.startswith(CKPT_DIR + "/"))
        if checkpoint is not None:
            rel = self.mirror.rel(checkpoint)
            self.mirror.push(rel + ".sha256")
            self.mirror.push(rel, digest)
            for old in self.ckpt_dir.glob("ckpt-*.pt*"):
                if old.name not in (checkpoint.name, checkpoint.name + ".sha256"):
                    old.unlink()

    def damage(self, path: Path, map_location: Any = "cpu") -> str | None:
        """What is wrong with checkpoint `path`, or None: its checksum file must match (when there is one) and it
        must load as tensors — a checksum written beside a hostile or unreadable file proves nothing. The state
        loaded is kept for `load_checkpoint`."""
        sidecar = path.with_name(path.name + ".sha256")
        if self.mirror is not None:
            self.mirror.pull(self.mirror.rel(sidecar))
            self.mirror.pull(self.mirror.rel(path))
        if sidecar.is_file() and sidecar.read_bytes().strip() != storage.sha256(path).encode():
            return "sha256 mismatch"
        try:
            self._loaded = (path, tensorfile.load(path, map_location))
        except tensorfile.UnloadableError as e:
            return f"unreadable: {e.why}"
        return None

    def intact_checkpoint(self, set_aside: bool = False, map_location: Any = "cpu") -> Path | None:
        """The newest intact checkpoint; None when there are none. Damaged newer ones are passed over with a warning
        (and, for a resumed run, renamed *.damaged so that they stay out of the way, not lost)."""
        found = self.checkpoints()
        self._loaded = None
        for path in reversed(found):
            problem = self.damage(path, map_location)
            if problem is None:
                return path
            if path not in _warned:
                shown = self.mirror.url(self.mirror.rel(path)) if self.mirror is not None else path
                print(f"warning: checkpoint {shown} is damaged ({problem}); falling back to the one before it",
                      file=sys.stderr)
                _warned.add(path)
            if set_aside and self.mirror is not None:
                rel = self.mirror.rel(path)
                self.mirror.rename(rel, rel + ".damaged")
                self.mirror.remove(rel + ".sha256")
            elif set_aside:
                os.replace(path, path.with_name(path.name + ".damaged"))
                path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        if found:
            raise ConfigError(f"{self.location} has {len(found)} checkpoint(s) and none is intact; retrain, or "
                              f"restore {self.location}/{CKPT_DIR} from a copy")
        return None

    def load_checkpoint(self, map_location: Any = "cpu", set_aside: bool = False) -> tuple[dict, Path] | None:
        """The newest intact checkpoint's state and path (see `intact_checkpoint`); None when there are none."""
        path = self.intact_checkpoint(set_aside, map_location)
        state, self._loaded = (self._loaded[1] if path else None), None
        return (state, path) if path else None

    def latest_checkpoint(self) -> Path | None:
        path, self._loaded = self.intact_checkpoint(), None
        return path

    def trim_log(self, step: int) -> None:
        """Drop train.jsonl rows past `step` (a resume from an earlier checkpoint repeats those steps)."""
        log = self.path / LOG
        if log.is_file():
            rows = [ln for ln in log.read_text().splitlines() if _step(ln) is not None and _step(ln) <= step]
            storage.write_text(log, "".join(r + "\n" for r in rows))


def _bytes(state: Any) -> int:
    """The tensor bytes of a (nested) state dict: about what its checkpoint takes on disk."""
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_bytes(v) for v in state)
    return 0


def per_steps(name: str, steps: int) -> str:
    """The file of a `steps`-step evaluation: eval.json / report.html for one step, eval-2steps.json … beside."""
    stem, dot, ext = name.rpartition(".")
    return name if steps == 1 else f"{stem}-{steps}steps{dot}{ext}"


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):      # a row cut short by a kill
        return None


@contextmanager
def working(where: Any) -> Iterator[Run]:
    """The run `where` for a stage that reads it and writes beside it (evaluate, sample, analyze, stats --run): on
    an object store, the bucket is checked, `READ` is pulled first, and what the stage wrote is pushed when it
    succeeds (a failed stage leaves the bucket as it was)."""
    loc = storage.location(where)
    storage.check_bucket(loc, "run")
    run = Run(loc).require()
    for name in READ if run.mirror is not None else ():
        run.fetch(name)
    yield run
    run.push()
