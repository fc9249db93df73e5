"""demo: a preset's whole pipeline into one directory — generate → verify → filter (when the preset has a `filter`
section) → stats → train the KDM student and the KD baseline on the same pairs, steps and batch → evaluate both →
reports.

This is the composition of the stages (what a cluster scheduler would chain), not a stage of its own. Its settings
come from the preset's validated sections (`Preset`), scaled by `DemoConfig.scale`. Generate, filter and stats share
one Ray session (started once, closed before training, which does not use Ray). When each student has a core for
its threads, KD trains and is evaluated in a second process beside KDM (its output goes to OUT/kd.log and is printed
after KDM's): the same results as one after the other, in the time of the longer run. Reruns resume: finished shards
are kept, finished runs are re-evaluated only.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import BaseModel

from kdm_pipe.background import Background
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
from kdm_pipe.interrupts import Terminated, stop_on_signals
from kdm_pipe.raypool import ray_session
from kdm_pipe.report import write_comparison
from stages import evaluate, generate, stats, train, verify
from stages import filter_pairs as memorisation_filter

STUDENTS = ("kdm", "kd")
AGAIN = "rerun the same demo command to continue (it resumes)"


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


def student_configs(preset: Preset, kind: str, pairs: Path, run_dir: Path,
                    scale: float) -> tuple[TrainConfig, EvaluateConfig]:
    tcfg = validated(TrainConfig, preset.train, "train", data=pairs, out=run_dir, student={"kind": kind},
                     **scaled(preset.train, scale))
    return tcfg, validated(EvaluateConfig, preset.evaluate, "evaluate", run=run_dir, data=pairs)


def side_by_side(tcfg: TrainConfig) -> bool:
    """Whether the two students train at once: when each has its own cores for its threads (one thread each, the
    digits budget, takes the demo's training from the sum of the two runs to the longer one)."""
    return tcfg.threads is not None and 2 * tcfg.threads <= len(os.sched_getaffinity(0))


def student(kind: str, tcfg: TrainConfig, ecfg: EvaluateConfig, resume: bool, progress: bool) -> dict:
    """Train one student (resuming a run the demo started before) and evaluate it."""
    resume = resume and (Path(tcfg.out) / "config.json").exists()
    print(f"== train {kind} ({tcfg.steps} steps, batch {tcfg.batch}{'; resuming its run' if resume else ''})",
          flush=True)
    if train.run(tcfg, resume=resume, progress=progress, again=AGAIN)["status"] == "preempted":
        raise Terminated(signal.SIGTERM)
    print(f"== evaluate {kind}", flush=True)
    return evaluate.run(ecfg)


def run(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the preset's pipeline; `scale` < 1 shrinks pairs and steps (for tests and quick looks)."""
    preset = Preset.model_validate(load_preset(cfg.preset))
    out, scale = Path(cfg.out), cfg.scale
    pairs = out / "pairs"
    # Scaled down, a shard must still hold a whole training batch (the loader's smallest unit).
    per_shard = {} if scale == 1 else {
        "pairs_per_shard": max(preset.train.batch, int(preset.generate.pairs_per_shard * scale))}
    gcfg = validated(GenerateConfig, preset.generate, "generate", out=pairs, **per_shard)
    students = {kind: student_configs(preset, kind, pairs, out / kind, scale) for kind in STUDENTS}
    tcfg = students["kdm"][0]
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
    results, beside = {}, None
    with stop_on_signals(said=lambda name: f"demo stopped by {name}; the students checkpointed: {AGAIN}"):
        try:
            if side_by_side(tcfg):
                log = out / "kd.log"
                print(f"== train and evaluate kd in a second process, beside kdm (a core each; its output: {log})")
                beside = Background(student, ("kd", *students["kd"], cfg.resume, False), log)
            for kind in STUDENTS[:1] if beside else STUDENTS:
                results[kind] = student(kind, *students[kind], cfg.resume, progress)
            if beside is not None:
                print("== kd, trained beside kdm" + (": waiting for it" if beside.running() else ""), flush=True)
                results["kd"] = beside.result()
                print(log.read_text(), end="")
        finally:
            if beside is not None:        # stopped: SIGTERM, so that KD checkpoints too
                beside.stop()
    title = f"KDM vs KD on {pairs} ({gcfg.teacher.name} teacher, {tcfg.steps} steps × batch {tcfg.batch} each)"
    report = write_comparison({k.upper(): out / k for k in STUDENTS}, out / "report.html", title)
    print(f"== {cfg.preset} done in {time.perf_counter() - start:.0f} s")
    print(evaluate.comparison({k.upper(): r for k, r in results.items()}))
    print(f"report: {report}" + "".join(f"\nrun report: {out / k / 'report.html'}" for k in STUDENTS))
    return results
