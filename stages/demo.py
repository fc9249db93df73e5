"""demo: a preset's whole pipeline, generate → verify → stats → train → evaluate, into one output directory.

This is the composition of the stages (what a cluster scheduler would chain), not a stage of its own.
"""

from __future__ import annotations

from pathlib import Path

from kdm_pipe.config import ConfigError, EvaluateConfig, GenerateConfig, TrainConfig, build, load_preset
from kdm_pipe.shards import verify
from stages import evaluate, generate, stats, train


def run(preset: str, out: Path, progress: bool = True, resume: bool = True) -> dict:
    sections = load_preset(preset)
    pairs, run_dir = Path(out) / "pairs", Path(out) / "run"
    gcfg = build(GenerateConfig, sections.get("generate", {}), {"out": pairs}, where="generate")
    tcfg = build(TrainConfig, sections.get("train", {}), {"data": pairs, "out": run_dir}, where="train")
    ecfg = build(EvaluateConfig, sections.get("evaluate", {}), {"run": run_dir, "data": pairs}, where="evaluate")
    print(f"== generate ({gcfg.shards} shards × {gcfg.pairs_per_shard} pairs, teacher {gcfg.teacher.name})")
    generate.run(gcfg, progress=progress)
    print("== verify")
    problems = verify(pairs)
    if problems:
        raise ConfigError(f"verify failed after generate: {problems}")
    print(f"{pairs}: all shards match the manifest")
    print("== stats")
    stats.run(pairs, workers=gcfg.workers, progress=progress)
    print(f"== train ({tcfg.steps} steps, student {tcfg.student.kind})")
    train.run(tcfg, resume=resume and (run_dir / "config.json").exists(), progress=progress)
    print("== evaluate")
    results = evaluate.run(ecfg)
    print(f"report: {run_dir / 'eval.json'}" + "".join(f"\nfigure: {f}" for f in results.get("figures", [])))
    return results
