"""The memorisation filter's decision, applied by every reader of a pair set.

`kdm-pipe filter` records in the manifest which seeds it excluded (`Manifest.filter`); the shards stay as they are.
`Exclusions.read` is the one function that drops those pairs while reading a shard: the training loader, the
held-out probes and evaluation (`read_pairs`), stats and FID references from a pair directory all read through it,
and `kept` gives the pair counts the loader's epoch arithmetic is built on (so exact resume and once-per-epoch hold
over the kept pairs exactly as over all pairs).

A pair set that was filtered and then extended (a generate rerun with more shards, or a repaired shard whose bytes
changed) holds shards the filter never saw: readers refuse it until the filter is rerun, rather than guess.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from kdm_pipe import storage
from kdm_pipe.errors import ConfigError
from kdm_pipe.manifest import Manifest, ShardInfo
from kdm_pipe.shards import read_shard

Record = dict[str, np.ndarray]


class Exclusions:
    """Excluded seeds per shard name (empty for an unfiltered set); picklable, so loader workers get a copy."""

    def __init__(self, seeds: dict[str, np.ndarray]) -> None:
        self.seeds = {name: np.asarray(s, np.int64) for name, s in seeds.items() if len(s)}

    def __bool__(self) -> bool:
        return bool(self.seeds)

    def kept(self, info: ShardInfo) -> int:
        """Pairs of the shard that readers see."""
        return info.pairs - len(self.seeds.get(info.name, ()))

    def read(self, path: Any) -> Iterator[Record]:
        """`read_shard` (of a local path or an s3:// URL) without the excluded pairs (records left empty are
        skipped)."""
        path = storage.location(path)
        drop = self.seeds.get(path.name)
        for rec in read_shard(path):
            if drop is not None:
                keep = ~np.isin(rec["seed"], drop)
                if not keep.all():
                    rec = {k: a[keep] for k, a in rec.items()}
            if len(rec["seed"]):
                yield rec

    def digest(self, names: Iterable[str]) -> str:
        """sha256 of what is excluded from shards `names`: a training run records it for the shards it reads, so
        a resume notices a filter that changed under it."""
        excluded = {n: self.seeds[n].tolist() for n in sorted(set(names)) if n in self.seeds}
        return hashlib.sha256(json.dumps(excluded).encode()).hexdigest()


NO_EXCLUSIONS = Exclusions({}).digest([])      # what a run trained before filtering (no split.json entry) excluded


def uncovered(manifest: Manifest) -> list[str]:
    """Shards of a filtered manifest that its filter did not score (added or rewritten since); [] when unfiltered."""
    if manifest.filter is None:
        return []
    done = manifest.filter.shards
    return [s.name for s in manifest.shards if s.name not in done or done[s.name].sha256 != s.sha256]


def exclusions(manifest: Manifest, directory: Path) -> Exclusions:
    """The filter decision readers of `directory` apply; ConfigError when the filter does not cover every shard."""
    missing = uncovered(manifest)
    if missing:
        raise ConfigError(f"{directory} was filtered for memorised samples, but {len(missing)} of its "
                          f"{len(manifest.shards)} shards (e.g. {missing[0]}) were added or rewritten since; run "
                          f"`{filter_command(directory, manifest.filter.settings)}` to cover them")
    done = manifest.filter.shards if manifest.filter is not None else {}
    return Exclusions({s.name: np.asarray(done[s.name].excluded, np.int64) for s in manifest.shards
                       if s.name in done})


def filter_command(directory: Path, settings: dict) -> str:
    """The `kdm-pipe filter` command line that repeats the recorded settings."""
    flags = [f"--ref {settings['ref']['source']}", f"--metric {settings['metric']}", f"--rule {settings['rule']}",
             f"--threshold {settings['threshold']:g}", f"-k {settings['k']}"]
    if settings.get("detector"):
        flags.insert(2, f"--detector {settings['detector']['path']}")
    return f"kdm-pipe filter {directory} " + " ".join(flags)
