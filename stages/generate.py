"""generate: teacher pairs into tar shards, scheduled by Ray. Rerunning the same command completes or repairs.

Resumable: every shard committed stays. The directory, its lock, manifest, commits, cleanup and signals are
kdm_pipe.pairset's (shared with import); sizes are checked against the free disk before anything is written (for
an s3:// --out, the local temp directory must hold the shards in progress here: each is finished there, then
uploaded by the Ray worker that made it); SIGTERM / SIGINT stop the run with 143 / 130 after Ray is shut down and
the temp files of unfinished shards are removed. A disk that fills up all the same (another writer) ends the run
with one line: where, and about how much the unfinished shards need.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
from tqdm import tqdm

from kdm_pipe import storage
from kdm_pipe.config import ConfigError, GenerateConfig
from kdm_pipe.errors import DiskFull, disk_full
from kdm_pipe.generation import cached_teacher, make_shard, with_teacher_defaults
from kdm_pipe.integrity import check_shard
from kdm_pipe.manifest import MANIFEST, Manifest, ShardInfo, estimated_shard_bytes, pair_bytes
from kdm_pipe.pairset import PairSetWriter, free_bytes
from kdm_pipe.raypool import ray_session, remote, run_bounded, task_failures
from kdm_pipe.sampling import nfe, schedule, trajectory_steps
from kdm_pipe.teachers.vae import Decoder

CONFIG = "generate.config.json"
LOG = "generate.jsonl"
MAX_SHARD_BYTES = 16 << 30      # beyond this a shard is unwieldy to stream, copy or regenerate: use more shards
MAX_RECORD_BYTES = 2 << 30      # one sampler batch is held in memory (in float64) while it is solved


def new_manifest(cfg: GenerateConfig) -> Manifest:
    teacher = cached_teacher(cfg)
    if teacher.latent is not None:          # its VAE must load: evaluate and sample decode through it
        Decoder(teacher.latent)
    s = cfg.sampler
    keep = trajectory_steps(cfg.trajectory, s.steps)
    sigmas = schedule(s).tolist()
    return Manifest(
        teacher=teacher.fingerprint, source={"stage": "generate", "identity": cfg.identity()},
        shape=list(teacher.shape), label_dim=teacher.label_dim, sigma_max=s.sigma_max, nfe=nfe(s.steps, s.solver),
        num_shards=cfg.shards, pairs_per_shard=cfg.pairs_per_shard,
        dtypes={"x_T": cfg.xT_dtype, "x_0": cfg.x0_dtype, "traj": cfg.x0_dtype},
        trajectory_steps=keep, trajectory_sigmas=[sigmas[i] for i in keep] if keep else None, sigmas=sigmas,
        latent=teacher.latent)


def identity_hash(cfg: GenerateConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.identity(), sort_keys=True).encode()).hexdigest()


def same_settings_wrote(out: Path, cfg: GenerateConfig) -> bool:
    """Whether DIR's generate.config.json records these very settings (so its shard files are ours to replace)."""
    try:
        return GenerateConfig.model_validate_json((out / CONFIG).read_text()).identity() == cfg.identity()
    except (OSError, ValueError):
        return False


def open_manifest(w: PairSetWriter, cfg: GenerateConfig) -> Manifest:
    """The directory's manifest if its settings match `cfg` (more shards allowed), else a refusal."""
    out = cfg.out

    def accept(old: Manifest) -> Manifest:
        was = old.source.get("identity")
        if was != cfg.identity():
            diff = sorted(k for k in cfg.identity() if (was or {}).get(k) != cfg.identity()[k])
            raise ConfigError(f"{out} was generated with different settings ({', '.join(diff) or 'source'}); "
                              f"rerun with the original settings or choose another --out")
        if cfg.shards < old.num_shards:
            raise ConfigError(f"{out} already plans {old.num_shards} shards; --shards {cfg.shards} would drop some "
                              f"(use --shards {old.num_shards} or more)")
        old.num_shards = cfg.shards
        return old

    def unreadable(path: Path, e: ValueError) -> str:
        return (f"{path} is not a valid kdm-pipe manifest ({type(e).__name__}); move it aside (`mv {path} "
                f"{path}.bad`) and rerun the same generate command: it rebuilds the manifest, keeping the "
                f"complete shards that {LOG} records and regenerating the rest")

    strays = None if same_settings_wrote(out, cfg) else (
        f"{out} holds shard files but no {MANIFEST} (and no {CONFIG} with these settings); choose an empty --out "
        f"directory, or delete the shard files to regenerate them here")
    return w.open_manifest(lambda: new_manifest(cfg), accept, unreadable, strays)


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_limits(cfg: GenerateConfig, manifest: Manifest) -> None:
    """Refuse, before anything is written, a shard or batch too large to handle or a plan the disk cannot hold."""
    per_pair = pair_bytes(manifest)
    shard = estimated_shard_bytes(manifest, cfg.pairs_per_shard, cfg.batch)
    if shard > MAX_SHARD_BYTES:
        fit = max(1, MAX_SHARD_BYTES // per_pair)
        raise ConfigError(f"one shard of {cfg.pairs_per_shard} pairs would take ~{gib(shard)} (limit "
                          f"{gib(MAX_SHARD_BYTES)}); use more shards with --pairs-per-shard {fit} or fewer")
    record = min(cfg.batch, cfg.pairs_per_shard) * per_pair * 4      # float64 while solving, then the stored copy
    if record > MAX_RECORD_BYTES:
        raise ConfigError(f"a batch of {cfg.batch} pairs would hold ~{gib(record)} in memory (limit "
                          f"{gib(MAX_RECORD_BYTES)}); lower --batch to {max(1, MAX_RECORD_BYTES // (4 * per_pair))}")
    todo = manifest.num_shards - len(manifest.shards)
    free = free_bytes(cfg.out)
    if storage.is_remote(cfg.out):
        # Each shard in progress on this machine is a local file until it is uploaded; the bucket has no limit.
        busy = min(todo, cfg.workers if cfg.address is None else 1)
        if busy * shard > free:
            raise ConfigError(f"{busy} shard(s) in progress need ~{gib(busy * shard)} in the local temp directory "
                              f"{tempfile.gettempdir()} (each is finished there before its upload) but it has "
                              f"{gib(free)} free; point TMPDIR at a larger disk or lower --pairs-per-shard")
        return
    need = todo * shard
    if need > free:
        raise ConfigError(f"{todo} shards × {cfg.pairs_per_shard} pairs need ~{gib(need)} ({need:,} bytes) but "
                          f"{cfg.out} has {gib(free)} ({free:,} bytes) free; lower --shards / --pairs-per-shard "
                          f"or choose another --out")


def adopt_logged(out: Path, cfg: GenerateConfig, manifest: Manifest) -> None:
    """A manifest rebuilt after it was lost keeps the shards generate.jsonl recorded for these settings, when their
    files still match (size, sha256, seeds)."""
    if manifest.shards or not (out / LOG).is_file():
        return
    mine, found = identity_hash(cfg), {}
    with (out / LOG).open() as f:
        for line in f:
            try:
                entry = json.loads(line)
                if entry.get("identity") == mine:
                    info = ShardInfo.model_validate(entry["info"])
                    found[info.index] = info
            except (ValueError, KeyError, TypeError, AttributeError):
                continue                     # a line cut short by a crash, or an older log format
    kept = [i for k, i in sorted(found.items()) if k < manifest.num_shards and not check_shard(out / i.name, i)]
    if kept:
        print(f"{out}: rebuilt the manifest with {len(kept)} complete shards recorded in {LOG}", file=sys.stderr)
    manifest.shards = kept


def bytes_per_pair(manifest: Manifest) -> str:
    """Bytes per pair as stored, and without the trajectory states when they are kept."""
    per_pair = pair_bytes(manifest)
    if not manifest.trajectory_steps:
        return f"{per_pair:,} bytes per pair"
    ends = pair_bytes(manifest.model_copy(update={"trajectory_steps": None}))
    return (f"{per_pair:,} bytes per pair with {len(manifest.trajectory_steps)} trajectory states, {ends:,} without "
            f"({per_pair / ends:.1f}×)")


def run(cfg: GenerateConfig, progress: bool = True) -> Manifest:
    out = cfg.out
    w = PairSetWriter(out, "generate", f"generate --out {out}", all_or_nothing=False)
    with w.stopping():
        w.refuse_file()
        cfg = with_teacher_defaults(cfg)          # the sampler the workers run, the manifest and the rerun check see
        manifest = open_manifest(w, cfg)
        check_limits(cfg, manifest)
        try:
            with w.writing():
                if (out / MANIFEST).exists():     # again, under the lock: a run that held it may have added shards
                    manifest = open_manifest(w, cfg)   # (a new plan is not rebuilt: building a teacher takes a while)
                return generate(cfg, w, progress)
        except OSError as e:                      # the disk filled up after check_limits (another writer, quotas)
            if not disk_full(e):
                raise
            manifest = w.manifest or manifest
            todo = manifest.num_shards - len(manifest.shards)
            raise DiskFull(Path(e.filename).parent if e.filename else out,
                           todo * estimated_shard_bytes(manifest, cfg.pairs_per_shard, cfg.batch)) from None


def generate(cfg: GenerateConfig, w: PairSetWriter, progress: bool) -> Manifest:
    out, manifest = cfg.out, w.manifest
    adopt_logged(out, cfg, manifest)
    todo = w.reconcile()
    w.save()
    w.record_config(cfg.model_dump_json(indent=1))
    if not todo:
        print(f"{out}: all {cfg.shards} shards complete ({manifest.num_pairs} pairs)")
        return manifest
    task = remote(make_shard, num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)
    t0, mine = time.perf_counter(), identity_hash(cfg)
    if progress and not (cfg.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        print(f"generate: starting a local Ray session ({cfg.workers} workers)…", flush=True)
    with ray_session(cfg.address, cfg.workers * cfg.cpus_per_worker, cfg.workers * cfg.gpus_per_worker):
        if progress:             # the bar moves by whole shards: say what happens until the first one is done
            print(f"generate: {len(todo)} shards of {cfg.pairs_per_shard} pairs on {cfg.workers} workers (each "
                  f"builds the {cfg.teacher.name} teacher, then runs {cfg.sampler.solver} with {cfg.sampler.steps} "
                  f"steps); the bar advances as shards finish", flush=True)
        bar = tqdm(total=len(todo) * cfg.pairs_per_shard, unit="pair", disable=not progress, desc="generate",
                   dynamic_ncols=True)
        calls = ((cfg, k) for k in todo)
        with task_failures("a generate task"):
            for info, stats in run_bounded(task, calls, cfg.max_in_flight or 2 * cfg.workers):
                w.commit(info, log={**stats, "identity": mine, "info": info.model_dump()})
                bar.update(info.pairs)
    bar.close()
    seconds = time.perf_counter() - t0
    pairs = len(todo) * cfg.pairs_per_shard
    print(f"{out}: wrote {len(todo)} shards, {pairs} pairs in {seconds:.1f}s ({pairs / seconds:,.0f} pairs/s); "
          f"{manifest.num_pairs} pairs in all; {bytes_per_pair(manifest)}")
    return manifest
