"""analyze: the paper's analyses of a trained run → RUN/analysis/ (spectrum, noise structure, interpolation PNGs
and analysis.json). Reads the run's config, checkpoints, latents.zarr, weights.json (the run's EMA-or-raw choice,
shared with evaluate and sample) and its held-out shards. An existing RUN/report.html is rewritten so that it shows
the analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdm_pipe.analysis import OUT_DIR, analyze
from kdm_pipe.config import AnalyzeConfig
from kdm_pipe.report import write_report


def run(cfg: AnalyzeConfig) -> dict[str, Any]:
    run_dir = cfg.run
    result = analyze(run_dir, num=cfg.num, seed=cfg.seed, device=cfg.device)
    print(f"{run_dir}: step {result['step']}, {result['weights']} weights, {result['num_pairs']} held-out pairs")
    if "spectrum" in result:
        s = result["spectrum"]
        print(f"Koopman spectrum: radius {s['spectral_radius']:.4g}, {100 * s['fraction_inside']:.1f}% of "
              f"{s['dim']} eigenvalues inside the unit circle, operator norm {s['operator_norm']:.4g}")
    else:
        print(result["note"])
    written = [Path(run_dir) / OUT_DIR / "analysis.json", *(Path(run_dir) / f for f in result["figures"])]
    if (Path(run_dir) / "report.html").is_file():
        written.append(write_report(run_dir))
    print("wrote " + ", ".join(map(str, written)))
    return result
