"""evaluate: one-step samples of a trained student against held-out teacher pairs → RUN/eval.json + figures."""

from __future__ import annotations

from typing import Any

from kdm_pipe import storage
from kdm_pipe.config import EvaluateConfig
from kdm_pipe.evaluation import evaluate
from kdm_pipe.pages import fmt
from kdm_pipe.report import comparison_rows, fid_line, metric_rows, oddities, set_fd_line, speed_line, write_report
from kdm_pipe.run import EVAL, per_steps, working


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]


def table(results: dict[str, Any]) -> str:
    lines = aligned([("", "better", "student", "untrained", "teacher floor"),
                     *((name, better, *map(fmt, values)) for name, better, *values in metric_rows(results))])
    fid = results.get("fid")
    if fid:
        lines.append(fid_line(fid))
    if results.get("fd_set"):
        lines.append(set_fd_line(results))
    lines.append("speed: " + speed_line(results["speed"]))
    return "\n".join(lines)


def comparison(results: dict[str, dict[str, Any]]) -> str:
    """Several runs on the same pairs (e.g. KDM vs the KD baseline): the headline rows first (for images the FD of
    fresh samples to the whole teacher set and the paired error), then the rest, each with the direction that is
    better, the teacher floor, the best run and the ratio of each run to the first."""
    names = list(results)
    lead, rest = comparison_rows(results)
    head = ("", "better", *names, "teacher floor", "best", *(f"{n}/{names[0]}" for n in names[1:]))

    def cells(row: list) -> tuple[str, ...]:
        vals, floor, best = row[2:-2], row[-2], row[-1]
        ratios = (f"{v / vals[0]:.3g}" if isinstance(v, float) and vals[0] else "" for v in vals[1:])
        return (row[0], row[1], *(fmt(v) for v in vals), fmt(floor), best or "", *ratios)

    lines = aligned([head, *map(cells, lead + rest)])
    lines.insert(1 + len(lead), "secondary:")
    return "\n".join(lines + [f"note: {n}" for n in oddities(results)])


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    storage.check_bucket(cfg.data, "--data")
    with working(cfg.run) as r:                        # RUN on s3://: worked on in its mirror, outputs pushed after
        results = evaluate(cfg.model_copy(update={"run": r.path}))
        report = write_report(r.path, cfg.steps)
    print(f"{results['run']}: step {results['step']}, {results['weights']} weights, "
          f"{results['num_pairs']} held-out pairs")
    choice = results["weights_choice"]
    print(f"weights chosen on {choice['selection_pairs']} other held-out pairs by {choice['criterion']}: "
          + ", ".join(f"{w} {v:.4g}" for w, v in choice["scores"].items()) + " (both reported in eval.json)")
    print(table(results))
    print(f"wrote {cfg.run}/{per_steps(EVAL, cfg.steps)}" + "".join(f", {f}" for f in results.get("figures", [])))
    print(f"report: {r.location / report.relative_to(r.path)}")
    return results
