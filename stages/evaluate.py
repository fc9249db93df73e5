"""evaluate: one-step samples of a trained student against held-out teacher pairs → RUN/eval.json + figures."""

from __future__ import annotations

from typing import Any

from kdm_pipe.config import EvaluateConfig
from kdm_pipe.evaluation import evaluate


def table(results: dict[str, Any]) -> str:
    rows = [("", "student", "untrained", "teacher floor")]
    for key in ("sliced_wasserstein", "mmd", "off_support", "fd_teacher", "precision", "recall", "inception_score",
                "mse", "psnr"):
        if key in results["student"]:
            floor = results["teacher_floor"].get(key)
            rows.append((key, f"{results['student'][key]:.4g}", f"{results['untrained'][key]:.4g}",
                         "" if floor is None else f"{floor:.4g}"))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    fid = results.get("fid")
    if fid:
        name = "FID" if "fid" in fid else "Fréchet distance"
        lines.append(f"{name} vs {fid.get('ref', 'reference')}: {fid.get('fid', fid.get('frechet_distance')):.4g} "
                     f"({fid['num_samples']} one-step samples, {fid['detector']})")
    sp = results["speed"]
    if "speedup" in sp:
        lines.append(f"speed: student {sp['student_samples_per_s']:,.0f} samples/s (1 step) vs teacher "
                     f"{sp['teacher_samples_per_s']:,.0f} samples/s ({sp['teacher_nfe']} NFE): {sp['speedup']:.0f}×")
    return "\n".join(lines)


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    results = evaluate(cfg)
    print(f"{results['run']}: step {results['step']}, {results['weights']} weights, {results['num_pairs']} held-out pairs")
    print(table(results))
    print(f"wrote {cfg.run}/eval.json" + "".join(f", {f}" for f in results.get("figures", [])))
    return results
