"""analyze: the paper's analyses of a trained run → RUN/analysis/ (spectrum, noise structure, interpolation PNGs
and analysis.json). Reads the run's config, checkpoints, latents.zarr, weights.json (the run's EMA-or-raw choice,
shared with evaluate and sample) and its held-out shards. An existing RUN/report.html is rewritten so that it shows
the analysis."""

from __future__ import annotations

from typing import Any

from kdm_pipe.analysis import analyze
from kdm_pipe.config import AnalyzeConfig
from kdm_pipe.report import write_report
from kdm_pipe.run import ANALYSIS, working


def run(cfg: AnalyzeConfig) -> dict[str, Any]:
    with working(cfg.run) as r:                        # RUN on s3://: worked on in its mirror, outputs pushed after
        result = analyze(r.path, num=cfg.num, seed=cfg.seed, device=cfg.device, vae=cfg.vae)
        if (r.path / "report.html").is_file():
            write_report(r.path)
    run_dir = cfg.run
    print(f"{run_dir}: step {result['step']}, {result['weights']} weights, {result['num_pairs']} held-out pairs")
    if "spectrum" in result:
        s = result["spectrum"]
        print(f"Koopman spectrum: radius {s['spectral_radius']:.4g}, {100 * s['fraction_inside']:.1f}% of "
              f"{s['dim']} eigenvalues inside the unit circle, operator norm {s['operator_norm']:.4g}")
    else:
        print(result["note"])
    written = [f"{ANALYSIS}/analysis.json", *result["figures"]]
    if (r.path / "report.html").is_file():
        written.append("report.html")
    print("wrote " + ", ".join(f"{run_dir}/{f}" for f in written))
    return result
