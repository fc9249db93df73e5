"""The per-run HTML report (RUN/report.html) and a page comparing several runs.

Plain HTML with one inline stylesheet: no scripts, no external fonts or CSS, every text escaped. Figures are PNGs
beside the page, linked by relative paths: the samples evaluate drew (eval.json "figures"), RUN/analysis/*.png
from `analyze`, and the curves drawn here into RUN/report_files/. A section whose inputs are missing says so.
"""

from __future__ import annotations

import json
import math
import os
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kdm_pipe import plots, storage
from kdm_pipe.errors import ConfigError
from kdm_pipe.probes import load_probes, probe_spectra
from kdm_pipe.run import ANALYSIS, Run
from kdm_pipe.shards import Manifest
from kdm_pipe.student import is_image

FILES = "report_files"
# Rows in the order `kdm-pipe evaluate` prints them; any other numbers of eval.json follow.
METRICS = ("sliced_wasserstein", "mmd", "off_support", "fd_teacher", "precision", "recall", "inception_score", "mse",
           "psnr")
NOT_LOSSES = ("step", "steps_per_s", "pairs_per_s")
STYLE = """body{font-family:sans-serif;max-width:75em;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#eee}img{max-width:100%}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figcaption{font-size:90%;color:#555}
.note{color:#666}"""


def fmt(value: Any, digits: int = 4) -> str:
    """The one number format of every table and line: `digits` significant digits, thousands separators, no trailing
    zeros, and scientific notation only outside 1e-4 ≤ |x| < 1e15 (8,433 and 16,040, not 8433 and 1.604e+04);
    integers in full; None as an empty cell; anything else as str()."""
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    if not isinstance(value, (float, np.floating)):
        return str(value)
    short = f"{float(value):.{digits}g}"
    rounded = float(short)
    if not math.isfinite(rounded) or rounded == 0 or not 1e-4 <= abs(rounded) < 1e15:
        return short
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    text = f"{rounded:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table whose first column names the row; cells are formatted with `fmt` and escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{escape(fmt(c))}</{'th' if i == 0 else 'td'}>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def metric_keys(results: Sequence[dict]) -> list[str]:
    """The student metrics of these eval.json results: the printed ones first, then every other number."""
    present = [k for r in results for k, v in r.get("student", {}).items() if isinstance(v, (int, float))]
    return [k for k in METRICS if k in present] + list(dict.fromkeys(k for k in present if k not in METRICS))


def metric_rows(results: dict) -> list[list[Any]]:
    """[metric, student, untrained, teacher floor] per metric of one eval.json."""
    return [[k] + [results.get(part, {}).get(k) for part in ("student", "untrained", "teacher_floor")]
            for k in metric_keys([results])]


def speed_line(speed: dict) -> str:
    line = (f"student {fmt(speed['student_samples_per_s'])} samples/s ({speed['student_nfe']} NFE, "
            f"batch {speed['batch']})")
    if "speedup" in speed:
        line += (f" vs teacher {fmt(speed['teacher_samples_per_s'])} samples/s ({speed['teacher_nfe']} NFE): "
                 f"{fmt(speed['speedup'])}× faster")
    return line


def fid_line(fid: dict) -> str:
    name = "FID" if "fid" in fid else "Fréchet distance"
    return (f"{name} vs {fid.get('ref', 'reference')}: {fmt(fid.get('fid', fid.get('frechet_distance')))} "
            f"({fmt(fid.get('num_samples'))} one-step samples, {fid.get('detector')})")


def set_fd_line(results: dict) -> str:
    """FD to the whole teacher set (from stats.zarr) with both counts, beside the held-out comparison's counts."""
    fd, held = results.get("fd_set"), results.get("fd_teacher_samples", ["?", "?"])
    if not fd:
        return ""
    if "fd" not in fd:
        return f"FD to the teacher set: not computed ({fd['note']})"
    return (f"FD to the teacher set: {fmt(fd['fd'])} ({fd['num_samples']} fresh student samples vs the set's "
            f"{fd['num_reference']} pairs, {fd['detector']}); the held-out fd_teacher compares {held[0]} with "
            f"{held[1]}")


def latent_line(s: dict) -> str:
    """The latent statistics' summary (effective ranks, explained fraction, z_T's whiteness) in one sentence."""
    if "note" in s:
        return s["note"]
    ranks = ", ".join(f"{k} {fmt(v)}" for k, v in s["effective_rank"].items())
    return (f"latents over {s['num_pairs']} pairs, d = {s['dim']}: effective rank (participation ratio) {ranks}; "
            f"C z_T explains {fmt(100 * s['explained'])}% of z_0's variance; z_T isotropy {fmt(s['z_T_isotropy'])} "
            f"(1: white), |mean|/std {fmt(s['z_T_mean_over_std'])}")


def spectrum_line(analysis: dict | None) -> str:
    s = (analysis or {}).get("spectrum")
    if not s:
        return ""
    return para(f"{analysis['weights']} weights, step {analysis['step']}: spectral radius {fmt(s['spectral_radius'])}, "
                f"{fmt(100 * s['fraction_inside'])}% of {s['dim']} eigenvalues inside the unit circle, "
                f"operator norm (largest singular value) {fmt(s['operator_norm'])}")


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n{body}</body>\n</html>\n")


def section(title: str, *parts: str) -> str:
    return f"<h2>{escape(title)}</h2>\n" + "".join(parts)


def para(text: str, cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{escape(text)}</p>\n"


def figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{escape(src)}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>\n")


def link(href: str, text: str) -> str:
    return f'<a href="{escape(href)}">{escape(text)}</a>'


def relative(path: Path, base: Path) -> str | None:
    """`path` as a URL relative to the directory `base`, or None if the file is missing."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix() if path.is_file() else None


def eval_figures(run: Path, results: dict) -> list[Path]:
    """eval.json's figures, found inside `run` even if the run has moved since (evaluate recorded them as
    results["run"]/name, relative to its own working directory)."""
    out = []
    for f in results.get("figures", []):
        try:
            out.append(run / Path(f).relative_to(results["run"]))
        except ValueError:
            out.append(Path(f))
    return out


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def data_manifest(run: Path, cfg: dict) -> Manifest | str:
    """The run's data manifest, or why it cannot be read now (the pairs may live elsewhere by report time)."""
    try:
        return Run(run).manifest()
    except (ConfigError, ValueError, KeyError) as e:
        return f"{cfg.get('data')} (unreadable now: {e})"


def config_rows(run: Path, cfg: dict, manifest: Manifest | str) -> list[list[Any]]:
    """Teacher, NFE, pairs, student and optimisation settings of a run, from config.json and its data manifest."""
    s = cfg.get("student", {})
    if isinstance(manifest, str):
        rows: list[list[Any]] = [["data", manifest]]
    else:
        m = manifest
        sampler = m.source.get("identity", {}).get("sampler")
        params = {k: v for k, v in m.teacher.get("params", {}).items() if k != "name"}
        rows = [["teacher", f"{m.teacher.get('name')} {json.dumps(params)}"],
                ["teacher NFE", m.nfe], ["sampler", json.dumps(sampler) if sampler else "(imported pairs)"],
                ["data shape", "×".join(map(str, m.shape)) + (f", {m.label_dim} classes" if m.label_dim else "")],
                ["pairs", f"{m.num_pairs:,} in {len(m.shards)} shards"]]
        rows.append(["student networks", f"U-Nets: channels {s.get('model_channels')}, mult {s.get('channel_mult')}, "
                                         f"{s.get('num_blocks')} blocks" if is_image(m.shape) else
                     f"MLPs: {s.get('depth')}×{s.get('hidden')}, latent {s.get('latent_dim')}"])
    split = read_json(run / "split.json")
    if split:
        rows.append(["shards (train / held out)", f"{len(split['train'])} / {len(split['holdout'])}"])
    rows += [["student", f"{s.get('kind')}" + (f", operator {s.get('operator')}" if s.get("kind") == "kdm" else "")],
             ["loss", f"distance {s.get('distance')}, w_latent {s.get('w_latent')}, w_rec {s.get('w_rec')}, "
                      f"w_push {s.get('w_push')}, w_adv {s.get('w_adv')}, σ_z {s.get('sigma_z')}"],
             ["steps × batch", f"{cfg.get('steps')} × {cfg.get('batch')}"],
             ["optimiser", f"Adam lr {cfg.get('lr')}, betas {cfg.get('betas')}, EMA {cfg.get('ema')}"]]
    return rows


def filter_section(directory: Path, manifest: Manifest, base: Path) -> str:
    """The memorisation filter of a pair set: its settings, counts and figures (DIR/filter-*.png), linked from
    `base`; empty when the set was not filtered."""
    f = manifest.filter
    if f is None:
        return ""
    s = f.settings
    rule = ("d₁ < α · mean(d₂…d_k)" if s["rule"] == "relative" else "d₁ < τ") + f", threshold {s['threshold']:g}"
    rows = [["reference", f"{s['ref']['source']} ({s['ref']['count']:,} images, sha256 {s['ref']['sha256'][:12]}…)"],
            ["space", s["metric"] + (f" ({s['detector']['path']})" if s.get("detector") else " (pixels)")],
            ["rule", f"{s['rule']}: {rule}, k = {s['k']}"],
            ["excluded", f"{f.flagged:,} of {f.scored:,} pairs ({f.flagged / max(f.scored, 1):.2%})"]]
    local = not storage.is_remote(directory)          # a bucket's figures are not linked from a local page
    figs = [figure(src, caption) for name, caption in (
        ("filter-distances.png", "distances to the nearest reference images; the line is the threshold"),
        ("filter-flagged.png", "top: teacher samples (flagged first, closest first); bottom: their nearest reference "
                               "image")) if local and (src := relative(Path(directory) / name, base)) is not None]
    return section("Memorisation filter", html_table(["setting", "value"], rows), *figs)


def loss_figure(run: Path, files: Path) -> Path | None:
    """files/losses.png: every loss term of train.jsonl over steps (log-y)."""
    log = run / "train.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    keys = dict.fromkeys(k for r in rows for k in r if k not in NOT_LOSSES)
    if not keys:
        return None
    series = {k: (np.array([r["step"] for r in rows if k in r]), np.array([r[k] for r in rows if k in r]))
              for k in keys}
    return plots.curves(files / "losses.png", series, "training losses (train.jsonl)")


def probe_figure(run: Path, files: Path) -> Path | None:
    """files/probes.png: the held-out probes' paired and latent MSE over training (latents.zarr)."""
    path = run / "latents.zarr"
    probes = load_probes(path) if path.exists() else {}
    series = {k: (probes["step"], probes[k]) for k in ("paired_mse", "latent_mse") if k in probes}
    if not series:
        return None
    return plots.curves(files / "probes.png", series, "held-out probes of the EMA weights (latents.zarr)")


def spectrum_figure(run: Path, files: Path) -> tuple[Path, str] | None:
    """analyze's spectrum.png when it exists, else the latest probe's eigenvalues drawn into files/."""
    done = run / ANALYSIS / "spectrum.png"
    if done.is_file():
        return done, "Koopman eigenvalues against the unit circle (from kdm-pipe analyze)"
    spectra = probe_spectra(run)
    if spectra is None:
        return None
    steps, lams = spectra
    title = f"Koopman spectrum (EMA probe, step {int(steps[-1])})"
    return plots.spectrum(files / "spectrum.png", lams[-1], title, spectra), title


def samples_caption(image: bool) -> str:
    """What evaluate's samples.png shows (its rows or panels are titled in the figure too)."""
    return ("top row: teacher x_0, bottom row: the student's one-step x̂_0 from the same held-out x_T" if image else
            "x_T, teacher x_0 and one-step samples from the same x_T, coloured by the teacher's mode")


def eval_section(run: Path, results: dict | None, image: bool) -> str:
    if results is None:
        return section("Metrics", para(f"not evaluated yet: run `kdm-pipe evaluate {run}`", "note"))
    parts = [para(f"step {results.get('step')}, {results.get('weights')} weights, {results.get('num_pairs')} "
                  f"held-out pairs" + (f"; {results['feature_note']}" if "feature_note" in results else "")),
             html_table(["metric", "student", "untrained", "teacher floor"], metric_rows(results))]
    if results.get("speed"):
        parts.append(para("speed: " + speed_line(results["speed"])))
    if results.get("fid"):
        parts.append(para(fid_line(results["fid"])))
    if results.get("fd_set"):
        parts.append(para(set_fd_line(results)))
    for f in eval_figures(run, results):
        src = relative(f, run)
        parts.append(figure(src, f"{f.name}: {samples_caption(image)}") if src else para(f"missing figure {f}", "note"))
    return section("Metrics (held-out pairs)", *parts)


def analysis_section(run: Path, analysis: dict | None) -> str:
    if analysis is None:
        return section("Analysis", para(f"not analysed yet: run `kdm-pipe analyze {run}`", "note"))
    parts = []
    if "note" in analysis:
        parts.append(para(analysis["note"], "note"))
    if "proximity" in analysis:
        prox = analysis["proximity"]
        parts += [para(f"latent proximity, grouped by {prox['labels']}"),
                  html_table(["representation", "ARI", "NMI", "Davies–Bouldin", "Calinski–Harabasz"],
                             [[k, v["ari"], v["nmi"], v["davies_bouldin"], v["calinski_harabasz"]]
                              for k, v in prox["rows"].items()])]
    if "latent_spectra" in analysis:
        parts.append(para(latent_line(analysis["latent_spectra"]), "note" if "note" in analysis["latent_spectra"]
                          else ""))
    if "noise_structure" in analysis:
        ns = analysis["noise_structure"]
        parts.append(html_table(["outliers (fraction)", "DBSCAN noise", "|z| > 3", "either", "mean |x_T| outliers",
                                 "mean |x_T| inliers"],
                                [[w, ns[w]["dbscan"], ns[w]["zscore"], ns[w]["either"], ns[w]["x_T_norm_outliers"],
                                  ns[w]["x_T_norm_inliers"]] for w in ("student", "teacher")]))
    captions = {"latent_spectra": "covariance spectra of z_T, z_0 and C z_T over the pair set; the operator's |λ|",
                "noise_structure": "x_0 coloured by KMeans(8), the same colours on x_T; red: outliers",
                "interpolation": "one-step outputs between held-out x_T: " + ", ".join(
                    analysis.get("interpolation", {}).get("rows", []))}
    for f in analysis.get("figures", []):
        name = Path(f).stem
        src = relative(run / f, run)
        if name in captions and src:
            parts.append(figure(src, captions[name]))
    return section("Analysis", *parts)


def write_report(run: Path) -> Path:
    """Write RUN/report.html (and the curves it shows into RUN/report_files/); returns its path."""
    run = Path(run)
    cfg = read_json(run / "config.json")
    if cfg is None:
        raise ConfigError(f"{run} is not a training run (no config.json); pass the --out directory of `kdm-pipe train`")
    files = run / FILES
    files.mkdir(exist_ok=True)
    results, analysis = read_json(run / "eval.json"), read_json(run / ANALYSIS / "analysis.json")
    manifest = data_manifest(run, cfg)
    image = is_image(manifest.shape) if isinstance(manifest, Manifest) else "detector" in (results or {})
    curves = [figure(relative(p, run), c) for p, c in ((loss_figure(run, files), "training losses"),
                                                       (probe_figure(run, files), "held-out probes of the EMA weights"))
              if p is not None]
    spectrum = spectrum_figure(run, files)
    body = [section("Configuration", html_table(["setting", "value"], config_rows(run, cfg, manifest))),
            eval_section(run, results, image),
            section("Training", *(curves or [para("no train.jsonl rows yet", "note")])),
            section("Koopman spectrum", spectrum_line(analysis),
                    figure(relative(spectrum[0], run), spectrum[1]) if spectrum else
                    para("no Koopman operator (KD student) or no probes recorded yet", "note")),
            analysis_section(run, analysis)]
    if isinstance(manifest, Manifest):
        body.insert(1, filter_section(Run(run).data_dir(), manifest, run))
    links = [(n, n) for n in ("eval.json", "config.json", "split.json", "train.jsonl") if (run / n).is_file()]
    if analysis is not None:
        links.append((f"{ANALYSIS}/analysis.json", "analysis.json"))
    body.append(section("Files", "<ul>\n" + "".join(f"<li>{link(h, t)}</li>\n" for h, t in links) + "</ul>\n"))
    out = run / "report.html"
    out.write_text(page(f"kdm-pipe run {run.resolve().name}", "".join(body)), encoding="utf-8")
    return out


def write_comparison(runs: dict[str, Path], out: Path) -> Path:
    """One page comparing runs (name → run dir) side by side: the student metrics of each eval.json, the teacher
    floor, speed, each run's samples and a link to its report. `out` is the .html file to write."""
    out = Path(out)
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    results = {name: read_json(Path(r) / "eval.json") for name, r in runs.items()}
    missing = [name for name, r in results.items() if r is None]
    if missing:
        raise ConfigError(f"no eval.json in the runs {', '.join(missing)}: evaluate them first")
    floors = [r.get("teacher_floor", {}) for r in results.values()]
    floor_cols = ({"teacher floor": floors[0]} if all(f == floors[0] for f in floors)
                  else {f"teacher floor ({n})": f for n, f in zip(results, floors)})
    rows: list[list[Any]] = [["step"] + [r["step"] for r in results.values()] + [None] * len(floor_cols),
                             ["weights"] + [r["weights"] for r in results.values()] + [None] * len(floor_cols)]
    rows += [[k] + [r["student"].get(k) for r in results.values()] + [f.get(k) for f in floor_cols.values()]
             for k in metric_keys(list(results.values()))]
    rows.append(["samples/s (1 step)"] + [r.get("speed", {}).get("student_samples_per_s") for r in results.values()]
                + [None] * len(floor_cols))
    figs, links = [], []
    for name, r in results.items():
        report = Path(runs[name]) / "report.html"
        if report.is_file():
            links.append(f"<li>{link(relative(report, base), f'{name}: report')}</li>\n")
        for f in eval_figures(Path(runs[name]), r):
            src = relative(f, base)
            if src:
                figs.append(figure(src, f"{name}: {samples_caption('detector' in r)}"))
    body = [section("Student metrics (held-out pairs)", html_table(["metric", *results, *floor_cols], rows)),
            section("Samples", *figs) if figs else "",
            section("Runs", "<ul>\n" + "".join(links) + "</ul>\n") if links else ""]
    out.write_text(page("kdm-pipe: " + " vs ".join(results), "".join(body)), encoding="utf-8")
    return out
