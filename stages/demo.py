"""demo: a preset's whole pipeline into one directory — generate → verify → filter (when the preset has a `filter`
section) → stats → train the KDM student and the KD baseline on the same pairs, steps and batch → evaluate both →
reports.

This is the composition of the stages (what a cluster scheduler would chain), not a stage of its own. Reruns
resume: finished shards are kept, finished runs are re-evaluated only.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from kdm_pipe.config import (
    DemoConfig,
    EvaluateConfig,
    FilterConfig,
    GenerateConfig,
    StatsConfig,
    TrainConfig,
    VerifyConfig,
    build,
    load_preset,
)
from kdm_pipe.interrupts import Terminated
from kdm_pipe.report import write_comparison
from stages import evaluate, generate, stats, train, verify
from stages import filter_pairs as memorisation_filter

STUDENTS = ("kdm", "kd")


def run(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the preset's pipeline; `scale` < 1 shrinks pairs and steps (for tests and quick looks)."""
    preset, out, scale = cfg.preset, Path(cfg.out), cfg.scale
    sections = load_preset(preset)
    pairs = out / "pairs"
    g = sections.get("generate", {})
    t = sections.get("train", {})
    # Scaled down, a shard must still hold a whole training batch (the loader's smallest unit).
    batch = t.get("batch", TrainConfig.model_fields["batch"].default)
    small = {} if scale == 1 else {"pairs_per_shard": max(batch, int(g.get("pairs_per_shard", batch) * scale))}
    gcfg = build(GenerateConfig, g, {"out": pairs, **small}, where="generate")
    start = time.perf_counter()
    print(f"== generate ({gcfg.shards} shards × {gcfg.pairs_per_shard} pairs, teacher {gcfg.teacher.name})")
    generate.run(gcfg, progress=progress)
    print("== verify")
    verify.run(VerifyConfig(data=pairs))
    if "filter" in sections:
        fcfg = build(FilterConfig, sections["filter"], {"data": pairs, "workers": gcfg.workers}, where="filter")
        print(f"== filter (teacher samples that copy {fcfg.ref}: {fcfg.rule} rule)")
        memorisation_filter.run(fcfg, progress=progress)
    print("== stats")
    stats.run(StatsConfig(data=pairs, workers=gcfg.workers), progress=progress)
    results = {}
    for kind in STUDENTS:
        run_dir = out / kind
        steps = {} if scale == 1 else {"steps": max(2, int(t.get("steps", 2) * scale))}
        tcfg = build(TrainConfig, t, {"data": pairs, "out": run_dir, "student": {"kind": kind}, **steps},
                     where="train")
        ecfg = build(EvaluateConfig, sections.get("evaluate", {}), {"run": run_dir, "data": pairs}, where="evaluate")
        print(f"== train {kind} ({tcfg.steps} steps, batch {tcfg.batch})")
        done = (run_dir / "config.json").exists()
        if train.run(tcfg, resume=cfg.resume and done, progress=progress)["status"] == "preempted":
            raise Terminated(signal.SIGTERM)       # checkpointed; rerun the demo with --resume to continue
        print(f"== evaluate {kind}")
        results[kind] = evaluate.run(ecfg)
    report = write_comparison({k: out / k for k in STUDENTS}, out / "report.html")
    print(f"== {preset} done in {time.perf_counter() - start:.0f} s")
    print(evaluate.comparison(results))
    print(f"report: {report}" + "".join(f"\nrun report: {out / k / 'report.html'}" for k in STUDENTS))
    return results
