"""demo: a preset's whole pipeline into one directory — generate → verify → filter (when the preset has a `filter`
section) → stats → train the KDM student and the KD baseline on the same pairs, steps and batch → evaluate both →
reports.

This is the composition of the stages (what a cluster scheduler would chain), not a stage of its own. Its settings
come from the preset's validated sections (`Preset`), scaled by `DemoConfig.scale`. Generate, filter and stats share
one Ray session (started once, closed before training, which does not use Ray). Reruns resume: finished shards are
kept, finished runs are re-evaluated only.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from pydantic import BaseModel

from kdm_pipe.config import (
    DemoConfig,
    EvaluateConfig,
    FilterConfig,
    GenerateConfig,
    Preset,
    StatsConfig,
    TrainConfig,
    VerifyConfig,
    build,
    load_preset,
)
from kdm_pipe.interrupts import Terminated
from kdm_pipe.raypool import ray_session
from kdm_pipe.report import write_comparison
from stages import evaluate, generate, stats, train, verify
from stages import filter_pairs as memorisation_filter

STUDENTS = ("kdm", "kd")


def validated(model: type[BaseModel], section: BaseModel | None, where: str, **values) -> BaseModel:
    """`section` (a preset section as validated) with `values` set, validated again as `model`."""
    base = section.model_dump(exclude_unset=True) if section is not None else {}
    return build(model, base, values, where=where)


def scaled(train_cfg: TrainConfig, scale: float) -> dict:
    """The training settings a `scale` < 1 shrinks: steps, and the checkpoint / probe / log intervals with them (a
    scaled run still checkpoints, probes and logs a few times)."""
    if scale == 1:
        return {}
    shrink = lambda n, least: max(least, int(n * scale))  # noqa: E731
    return {"steps": shrink(train_cfg.steps, 2), "ckpt_every": shrink(train_cfg.ckpt_every, 1),
            "probe_every": shrink(train_cfg.probe_every, 1), "log_every": shrink(train_cfg.log_every, 1)}


def run(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the preset's pipeline; `scale` < 1 shrinks pairs and steps (for tests and quick looks)."""
    preset = Preset.model_validate(load_preset(cfg.preset))
    out, scale = Path(cfg.out), cfg.scale
    pairs = out / "pairs"
    # Scaled down, a shard must still hold a whole training batch (the loader's smallest unit).
    per_shard = {} if scale == 1 else {
        "pairs_per_shard": max(preset.train.batch, int(preset.generate.pairs_per_shard * scale))}
    gcfg = validated(GenerateConfig, preset.generate, "generate", out=pairs, **per_shard)
    start = time.perf_counter()
    if gcfg.address is None:
        print("== starting a local Ray session (generate, filter and stats share it)", flush=True)
    with ray_session(gcfg.address, gcfg.workers * gcfg.cpus_per_worker, gcfg.workers * gcfg.gpus_per_worker):
        print(f"== generate ({gcfg.shards} shards × {gcfg.pairs_per_shard} pairs, teacher {gcfg.teacher.name})")
        generate.run(gcfg, progress=progress)
        print("== verify")
        verify.run(VerifyConfig(data=pairs))
        if preset.filter is not None:
            fcfg = validated(FilterConfig, preset.filter, "filter", data=pairs, workers=gcfg.workers)
            print(f"== filter (teacher samples that copy {fcfg.ref}: {fcfg.rule} rule)")
            memorisation_filter.run(fcfg, progress=progress)
        print("== stats")
        stats.run(StatsConfig(data=pairs, workers=gcfg.workers), progress=progress)
    results = {}
    for kind in STUDENTS:
        run_dir = out / kind
        tcfg = validated(TrainConfig, preset.train, "train", data=pairs, out=run_dir, student={"kind": kind},
                         **scaled(preset.train, scale))
        ecfg = validated(EvaluateConfig, preset.evaluate, "evaluate", run=run_dir, data=pairs)
        print(f"== train {kind} ({tcfg.steps} steps, batch {tcfg.batch})")
        done = (run_dir / "config.json").exists()
        again = "rerun the same demo command to continue (it resumes)"
        if train.run(tcfg, resume=cfg.resume and done, progress=progress, again=again)["status"] == "preempted":
            raise Terminated(signal.SIGTERM)
        print(f"== evaluate {kind}")
        results[kind] = evaluate.run(ecfg)
    title = f"KDM vs KD on {pairs} ({gcfg.teacher.name} teacher, {tcfg.steps} steps × batch {tcfg.batch} each)"
    report = write_comparison({k.upper(): out / k for k in STUDENTS}, out / "report.html", title)
    print(f"== {cfg.preset} done in {time.perf_counter() - start:.0f} s")
    print(evaluate.comparison({k.upper(): r for k, r in results.items()}))
    print(f"report: {report}" + "".join(f"\nrun report: {out / k / 'report.html'}" for k in STUDENTS))
    return results
