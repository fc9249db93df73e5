"""filter: find the teacher samples of a pair directory that copy the teacher's training data, and exclude them.

Every x_0 is scored against the reference set (its k nearest reference images, `kdm_pipe.memorisation`) in Ray
workers that each hold the reference once; the decision is recorded in DIR/manifest.json (`filter`: settings,
reference sha256, counts and the excluded seeds per shard), which every reader honours (`kdm_pipe.exclusions`).
The shards are not rewritten. Beside it: DIR/filter.npz (every scored pair's d₁, mean(d₂…d_k) and nearest
reference index), DIR/filter.html with DIR/filter-distances.png and DIR/filter-flagged.png.

Rerunning with the same settings scores only shards the filter does not cover yet (none: a no-op); other settings
are refused unless --replace. Bad input (reference, detector, shapes) is refused before anything is written; the
manifest is written last, so an interrupted run leaves the set as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import ray
from ray.util import ActorPool
from tqdm import tqdm

from kdm_pipe import storage
from kdm_pipe.config import ConfigError, FilterConfig
from kdm_pipe.datasets import BUILTIN, load_images
from kdm_pipe.exclusions import uncovered
from kdm_pipe.filter_report import write_filter_report
from kdm_pipe.integrity import checked_manifest, open_pairs
from kdm_pipe.interrupts import stop_on_signals
from kdm_pipe.locks import directory_lock
from kdm_pipe.manifest import FilteredShard, FilterRecord, Manifest, save_manifest
from kdm_pipe.memorisation import ALPHA, TAU, Scores, ShardScorer, embedding, flags
from kdm_pipe.metrics.detectors import load_detector
from kdm_pipe.pairset import atomic_write_bytes
from kdm_pipe.raypool import in_process, ray_session, task_failures
from kdm_pipe.runtime import pick_device

SCORES = "filter.npz"


def pair_manifest(directory: Path) -> Manifest:
    manifest = checked_manifest(directory)
    if manifest.latent is not None:
        raise ConfigError(f"{directory} holds VAE latents {manifest.shape}; the memorisation filter compares images "
                          f"with the teacher's training images, and decoding the set for it is not supported")
    if len(manifest.shape) != 3:
        raise ConfigError(f"{directory} holds pairs of shape {manifest.shape}; the memorisation filter compares "
                          f"images (C, H, W) with the teacher's training images")
    return manifest


def reference(cfg: FilterConfig, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, dict]:
    """The reference images, their embedding (N, D) float32 and the settings that identify the filter; ConfigError
    on bad input."""
    if cfg.ref not in BUILTIN and not Path(cfg.ref).exists():
        raise ConfigError(f"--ref {cfg.ref}: no such file or folder; pass the teacher's training images (a folder of "
                          f"PNGs, an EDM dataset zip, an .npy, or one of {', '.join(BUILTIN)})")
    images = load_images(cfg.ref).images
    if list(images.shape[1:]) != manifest.shape:
        raise ConfigError(f"--ref {cfg.ref}: images of shape {list(images.shape[1:])}, but {cfg.data} holds samples "
                          f"of shape {manifest.shape}; pass the images the teacher was trained on")
    if cfg.k > len(images):
        raise ConfigError(f"-k {cfg.k}: the reference holds only {len(images)} images; lower -k")
    detector = None
    if cfg.detector is not None:
        dev = pick_device(cfg.device)
        net = load_detector(cfg.detector, dev)
        try:
            ref = embedding(net, images, cfg.chunk, dev).cpu().numpy()
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"--detector {cfg.detector} cannot embed images of shape {manifest.shape} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a detector "
                              f"for these images") from None
        if ref.ndim != 2 or len(ref) != len(images) or not np.isfinite(ref).all():
            raise ConfigError(f"--detector {cfg.detector} returned {ref.shape} for {len(images)} images; a "
                              f"detector must map images to finite (N, D) features")
        detector = {"path": str(cfg.detector), "sha256": storage.sha256(cfg.detector)}
    else:
        ref = images.reshape(len(images), -1)
    settings = {"ref": {"source": str(cfg.ref), "sha256": hashlib.sha256(images.tobytes()).hexdigest(),
                        "count": len(images)},
                "metric": cfg.metric, "detector": detector, "rule": cfg.rule, "k": cfg.k,
                "threshold": cfg.threshold or (ALPHA if cfg.rule == "relative" else TAU)}
    return images, np.ascontiguousarray(ref, np.float32), settings


def fingerprint(settings: dict, leave_out: tuple[str, ...] = ()) -> str:
    """What decides the flags: the reference's contents (not where it lies), the detector's bytes and the rule.
    Without the rule (`leave_out`), what decides the distances: scores are reused across rules and thresholds."""
    same = {**settings, "ref": {k: v for k, v in settings["ref"].items() if k != "source"},
            "detector": settings["detector"] and settings["detector"]["sha256"]}
    return hashlib.sha256(json.dumps({k: v for k, v in same.items() if k not in leave_out},
                                     sort_keys=True).encode()).hexdigest()


def search_fingerprint(settings: dict) -> str:
    return fingerprint(settings, leave_out=("rule", "threshold"))


def run(cfg: FilterConfig, progress: bool = True) -> FilterRecord:
    if storage.is_remote(cfg.data):
        raise ConfigError(f"filter {cfg.data}: pair sets on s3:// are not filtered yet (its scores and report are "
                          f"local files); filter a mount of the bucket (mountpoint-s3, s3fs-fuse) or a local copy")
    directory = Path(cfg.data)
    manifest = pair_manifest(directory)
    images, ref, settings = reference(cfg, manifest)                     # every refusal before anything is written
    fp = fingerprint(settings)
    with ExitStack() as stack:
        stack.enter_context(stop_on_signals(lambda name: f"filter stopped by {name}; nothing recorded in {directory}"))
        try:
            stack.enter_context(directory_lock(directory, f"filter {directory}"))
        except OSError as e:
            raise ConfigError(f"cannot record the filter in {directory}: {e.strerror or e}") from None
        manifest = pair_manifest(directory)
        old = manifest.filter
        if old is not None and old.fingerprint != fp and not cfg.replace:
            diff = sorted(k for k in settings if json.dumps(settings[k]) != json.dumps(old.settings.get(k)))
            raise ConfigError(f"{directory} was already filtered with other settings ({', '.join(diff)}); pass "
                              f"--replace to filter it again with these")
        same = old is not None and old.fingerprint == fp
        if same and not uncovered(manifest):
            print(f"{directory}: already filtered with these settings ({old.flagged} of {old.scored} pairs "
                  f"excluded); nothing to do")
            return old
        scores = previous_scores(directory, search_fingerprint(settings), manifest)
        todo = [s for s in manifest.shards if s.name not in scores]
        open_pairs(directory, [s.name for s in todo])
        if todo:                                                  # none: only the rule changed, distances kept
            scores.update(score(directory, todo, ref, settings, cfg, progress))
        record = decide(manifest, scores, settings, fp)
        save_scores(directory, search_fingerprint(settings), manifest, scores)
        manifest.filter = record                                  # the commit: readers honour it from now on
        save_manifest(directory, manifest)
    html = write_filter_report(directory, manifest, images, scores)
    print(f"{directory}: flagged {record.flagged} of {record.scored} pairs as copies of {cfg.ref} "
          f"({settings['rule']} rule, threshold {settings['threshold']:g}, {cfg.metric}); excluded from training, "
          f"stats and evaluation; report {html}")
    return record


def decide(manifest: Manifest, scores: dict[str, Scores], settings: dict, fp: str) -> FilterRecord:
    shards, flagged = {}, 0
    for s in manifest.shards:
        sc = scores[s.name]
        hit = flags(sc.d1, sc.d_rest, settings["rule"], settings["threshold"])
        shards[s.name] = FilteredShard(sha256=s.sha256, excluded=sorted(sc.seed[hit].tolist()))
        flagged += int(hit.sum())
    return FilterRecord(settings=settings, fingerprint=fp, scored=manifest.num_pairs, flagged=flagged, shards=shards)


# Below this many sample-to-reference distances (pixel space) the search runs in this process: a Ray start-up takes
# 5–15 s, 10^8 distances about a second.
IN_PROCESS_DISTANCES = 10**8


def score(directory: Path, todo: list, ref: np.ndarray, settings: dict, cfg: FilterConfig,
          progress: bool) -> dict[str, Scores]:
    """Scores of the shards `todo`: in this process for a small pixel-space search, else one Ray actor per worker
    (the reference put once into the object store)."""
    out = {}
    pairs = sum(s.pairs for s in todo)
    detector = str(cfg.detector) if cfg.detector else None
    local = detector is None and in_process(cfg.address, pairs * len(ref), IN_PROCESS_DISTANCES)
    with ExitStack() as stack:
        if local:
            scorers = [ShardScorer(ref, None, settings["k"], cfg.chunk, cfg.device, None)]   # our threads
            results = (scorers[0].score(str(directory), info) for info in todo)
        else:
            stack.enter_context(ray_session(cfg.address, cfg.workers, cfg.gpus_per_worker * cfg.workers))
            actor = ray.remote(num_cpus=1, num_gpus=cfg.gpus_per_worker)(ShardScorer)
            ref_id = ray.put(ref)
            scorers = [actor.remote(ref_id, detector, settings["k"], cfg.chunk, cfg.device, 1)
                       for _ in range(min(cfg.workers, len(todo)))]
            ray.get([a.ready.remote() for a in scorers])  # pairs/s of the search, not of starting workers
            results = ActorPool(scorers).map_unordered(lambda a, info: a.score.remote(str(directory), info), todo)
        bar = tqdm(total=pairs, unit="pair", disable=not progress, desc="filter", dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            with task_failures("a filter task"):
                for name, sc in results:
                    out[name] = sc
                    bar.update(len(sc.seed))
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
    where = "in this process" if local else f"{len(scorers)} workers"
    print(f"{directory}: scored {len(todo)} shards ({pairs} pairs in {seconds:.1f} s, {pairs / seconds:,.0f} pairs/s, "
          f"{where})")
    return out


def save_scores(directory: Path, search: str, manifest: Manifest, scores: dict[str, Scores]) -> None:
    """DIR/filter.npz: every scored pair's distances, per shard with the sha256 of the bytes scored."""
    names = [s.name for s in manifest.shards]
    cols = {f: np.concatenate([getattr(scores[n], f) for n in names]) for f in ("seed", "d1", "d_rest", "nearest")}
    buf = io.BytesIO()
    np.savez(buf, search=np.array(search), names=np.array(names), sha256=np.array([s.sha256 for s in manifest.shards]),
             counts=np.array([len(scores[n].seed) for n in names]), **cols)
    atomic_write_bytes(directory / SCORES, buf.getvalue())


def previous_scores(directory: Path, search: str, manifest: Manifest) -> dict[str, Scores]:
    """Scores of the manifest's shards from DIR/filter.npz when they were searched alike (same reference, metric,
    detector and k; any rule) from the same bytes; a shard missing there (or the file lost) is scored again."""
    try:
        with np.load(directory / SCORES, allow_pickle=False) as f:
            if str(f["search"]) != search:
                return {}
            cols = {k: f[k] for k in ("names", "sha256", "counts", "seed", "d1", "d_rest", "nearest")}
    except (OSError, ValueError, KeyError):
        return {}
    ends = np.cumsum(cols["counts"])
    rows = {str(n): (str(h), slice(e - c, e))
            for n, h, c, e in zip(cols["names"], cols["sha256"], cols["counts"], ends)}
    out = {}
    for s in manifest.shards:
        sha, sl = rows.get(s.name, (None, None))
        if sha == s.sha256 and sl.stop - sl.start == s.pairs:
            out[s.name] = Scores(cols["seed"][sl], cols["d1"][sl], cols["d_rest"][sl], cols["nearest"][sl])
    return out
