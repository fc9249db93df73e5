"""evaluate: one-step samples of a trained student against held-out teacher pairs → RUN/eval.json + figures."""

from __future__ import annotations

from typing import Any

from kdm_pipe import storage
from kdm_pipe.config import EvaluateConfig
from kdm_pipe.evaluation import evaluate
from kdm_pipe.report import METRICS, set_fd_line, write_report
from kdm_pipe.run import working


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]


def table(results: dict[str, Any]) -> str:
    rows = [("", "student", "untrained", "teacher floor")]
    for key in METRICS:
        if key in results["student"]:
            floor = results["teacher_floor"].get(key)
            rows.append((key, f"{results['student'][key]:.4g}", f"{results['untrained'][key]:.4g}",
                         "" if floor is None else f"{floor:.4g}"))
    lines = aligned(rows)
    fid = results.get("fid")
    if fid:
        name = "FID" if "fid" in fid else "Fréchet distance"
        lines.append(f"{name} vs {fid.get('ref', 'reference')}: {fid.get('fid', fid.get('frechet_distance')):.4g} "
                     f"({fid['num_samples']} one-step samples, {fid['detector']})")
    if results.get("fd_set"):
        lines.append(set_fd_line(results))
    sp = results["speed"]
    if "speedup" in sp:
        lines.append(f"speed: student {sp['student_samples_per_s']:,.0f} samples/s (1 step) vs teacher "
                     f"{sp['teacher_samples_per_s']:,.0f} samples/s ({sp['teacher_nfe']} NFE): {sp['speedup']:.0f}×")
    return "\n".join(lines)


def comparison(results: dict[str, dict[str, Any]]) -> str:
    """Several runs side by side (e.g. KDM vs the KD baseline on the same pairs), with the ratio to the first."""
    names = list(results)
    rows = [("", *names, *(f"{n}/{names[0]}" for n in names[1:]))]
    for key in METRICS:
        if all(key in r["student"] for r in results.values()):
            vals = [r["student"][key] for r in results.values()]
            ratios = (f"{v / vals[0]:.3g}" if vals[0] else "" for v in vals[1:])
            rows.append((key, *(f"{v:.4g}" for v in vals), *ratios))
    rows.append(("samples/s", *(f"{r['speed']['student_samples_per_s']:,.0f}" for r in results.values()),
                 *("" for _ in names[1:])))
    return "\n".join(aligned(rows))


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    storage.check_bucket(cfg.data, "--data")
    with working(cfg.run) as r:                        # RUN on s3://: worked on in its mirror, outputs pushed after
        results = evaluate(cfg.model_copy(update={"run": r.path}))
        report = write_report(r.path)
    print(f"{results['run']}: step {results['step']}, {results['weights']} weights, "
          f"{results['num_pairs']} held-out pairs")
    choice = results["weights_choice"]
    print(f"weights chosen on {choice['selection_pairs']} other held-out pairs by {choice['criterion']}: "
          + ", ".join(f"{w} {v:.4g}" for w, v in choice["scores"].items()) + " (both reported in eval.json)")
    print(table(results))
    print(f"wrote {cfg.run}/eval.json" + "".join(f", {f}" for f in results.get("figures", [])))
    print(f"report: {r.location / report.relative_to(r.path)}")
    return results
