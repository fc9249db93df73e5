"""The per-run HTML report (RUN/report.html) and a page comparing several runs, built with the kit of
`kdm_pipe.pages`. Figures: the samples evaluate drew (eval.json "figures"), RUN/analysis/*.png from `analyze`, and
the curves drawn here into RUN/report_files/. A section whose inputs are missing says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdm_pipe import plots
from kdm_pipe.errors import ConfigError
from kdm_pipe.filter_report import filter_section
from kdm_pipe.manifest import Manifest
from kdm_pipe.pages import figure, fmt, html_table, link, page, para, relative, section
from kdm_pipe.probes import load_probes, probe_spectra
from kdm_pipe.run import ANALYSIS, EVAL, Run, per_steps
from kdm_pipe.student import is_image

FILES = "report_files"
# Rows in the order `kdm-pipe evaluate` prints them; any other numbers of eval.json follow.
METRICS = ("sliced_wasserstein", "mmd", "off_support", "fd_teacher", "precision", "recall", "inception_score", "mse",
           "psnr")
NOT_LOSSES = ("step", "steps_per_s", "pairs_per_s")
# Which way each number improves (every table says it).
BETTER = {"sliced_wasserstein": "lower", "mmd": "lower", "off_support": "lower", "fd_teacher": "lower",
          "precision": "higher", "recall": "higher", "inception_score": "higher", "mse": "lower", "rmse": "lower",
          "mae": "lower", "psnr": "higher", "fd_set": "lower", "samples/s": "higher"}
# The rows a comparison leads with: a distance of the sample distribution with little bias, and the paired error.
HEADLINE = {True: ("fd_set", "mse", "psnr"), False: ("sliced_wasserstein", "mmd", "off_support", "mse")}
LABELS = {"fd_teacher": "FD, held out (secondary: {} vs {} samples, dominated by its bias)",
          "mse": "paired MSE (x̂_0 vs the teacher's x_0 from the same held-out x_T)",
          "psnr": "paired PSNR (dB)"}
def metric_keys(results: Sequence[dict]) -> list[str]:
    """The student metrics of these eval.json results: the printed ones first, then every other number."""
    present = [k for r in results for k, v in r.get("student", {}).items() if isinstance(v, (int, float))]
    return [k for k in METRICS if k in present] + list(dict.fromkeys(k for k in present if k not in METRICS))


def metric_rows(results: dict) -> list[list[Any]]:
    """[metric, better, student, untrained, teacher floor] per metric of one eval.json; for images the FD of fresh
    samples to the whole teacher set leads (the untrained student's is not computed)."""
    fd = results.get("fd_set") or {}
    lead = [[label("fd_set", [results]), BETTER["fd_set"], fd["fd"], None, (fd.get("floor") or {}).get("fd")]
            ] if fd.get("fd") is not None else []
    return lead + [[label(k, [results]), BETTER.get(k, "")] + [results.get(part, {}).get(k)
                                                               for part in ("student", "untrained", "teacher_floor")]
                   for k in metric_keys([results])]


def label(key: str, results: Sequence[dict]) -> str:
    """A row's name: the metric's key, or what it measures when that needs saying."""
    if key == "fd_set":
        fd = results[0].get("fd_set") or {}
        return (f"FD to the whole teacher set ({fmt(fd.get('num_samples'))} fresh samples vs its "
                f"{fmt(fd.get('num_reference'))} pairs)")
    held = results[0].get("fd_teacher_samples", ["?", "?"])
    return LABELS.get(key, key).format(*held)


def comparison_rows(results: dict[str, dict]) -> tuple[list[list[Any]], list[list[Any]]]:
    """(headline rows, secondary rows) comparing runs on the same pairs: [label, better, value per run…, teacher
    floor, best run]. Images lead with the FD of fresh samples to the whole teacher set and the paired error; the
    held-out FD (a few hundred samples a side) follows as a secondary row."""
    runs = list(results.values())
    image = "fd_teacher_samples" in runs[0] or "detector" in runs[0]
    value = {k: [r["student"].get(k) for r in runs] for k in metric_keys(runs)}
    floor = {k: runs[0].get("teacher_floor", {}).get(k) for k in value}
    if all(r.get("fd_set", {}).get("fd") is not None for r in runs) and image:
        value["fd_set"] = [r["fd_set"]["fd"] for r in runs]
        floor["fd_set"] = (runs[0]["fd_set"].get("floor") or {}).get("fd")
    value["samples/s"] = [r.get("speed", {}).get("student_samples_per_s") for r in runs]

    def row(k: str) -> list[Any]:
        vals = value[k]
        known = [(v, n) for v, n in zip(vals, results) if v is not None]
        top = (min if BETTER.get(k) == "lower" else max)(known) if len(known) > 1 and k in BETTER else None
        best = top[1] if top is not None and sum(v == top[0] for v, _ in known) == 1 else None    # no tie
        return [label(k, runs), BETTER.get(k, ""), *vals, floor.get(k), best]

    lead = [k for k in HEADLINE[image] if k in value]
    return [row(k) for k in lead], [row(k) for k in value if k not in lead]


def oddities(results: dict[str, dict]) -> list[str]:
    """Sentences for the numbers that look wrong and are not: a student above the teacher's own precision, a
    negative MMD floor, a whole-set FD below its floor."""
    notes, runs = [], results
    first = next(iter(runs.values()))
    floor = first.get("teacher_floor", {})
    above = [n for n, r in runs.items() if floor.get("precision") is not None
             and r["student"].get("precision", 0) > floor["precision"]]
    if above:
        notes.append(f"precision of {', '.join(above)} above the teacher's own ({fmt(floor['precision'])}): "
                     f"precision counts samples that fall inside the teacher samples' k-nearest-neighbour balls, so "
                     f"samples bunched in the densest regions score high; recall (how much of the teacher's "
                     f"spread the samples cover) is what tells a sharper student from a less varied one.")
    if floor.get("mmd") is not None and floor["mmd"] < 0:
        notes.append(f"the MMD floor is negative ({fmt(floor['mmd'])}): MMD² is estimated without bias, so two "
                     f"samples of one distribution give values scattered around 0, negative ones included; a "
                     f"student within that distance of 0 is indistinguishable from the teacher by this test.")
    fd_floor = (first.get("fd_set") or {}).get("floor")
    if fd_floor:
        notes.append(f"the whole-set FD's floor compares the first half of the set's shards with the second "
                     f"({fmt(fd_floor['num'][0])} vs {fmt(fd_floor['num'][1])} teacher samples): with half the samples "
                     f"on each side its bias is about twice the students' ({fmt(first['fd_set']['num_samples'])} fresh "
                     f"samples vs all {fmt(first['fd_set']['num_reference'])}), so a student close to the teacher can "
                     f"sit below it.")
    return notes


def speed_line(speed: dict) -> str:
    """Samples/s with the steps and network passes per sample of the student and the teacher (their NFE)."""
    line = (f"student {fmt(speed['student_samples_per_s'])} samples/s ({plural(speed['student_steps'], 'step')}, "
            f"{plural(speed['student_network_passes'], 'network pass', 'network passes')}; batch {speed['batch']})")
    if "speedup" in speed:
        line += (f" vs teacher {fmt(speed['teacher_samples_per_s'])} samples/s "
                 f"({plural(speed['teacher_steps'], 'step')}, {speed['teacher_network_passes']} network passes = "
                 f"NFE): {fmt(speed['speedup'])}× faster")
    return line


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


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
    floor = (f"; its teacher floor compares half the set's shards with the other half ({fd['floor']['num'][0]} vs "
             f"{fd['floor']['num'][1]})" if fd.get("floor") else "")
    return (f"FD to the whole teacher set: {fd['num_samples']} fresh student samples vs the set's "
            f"{fd['num_reference']} pairs (features: {fd['detector']}){floor}; the held-out FD compares "
            f"{held[0]} with {held[1]} samples")


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


def outside_line(eigenvalues: np.ndarray) -> str:
    """A sentence when eigenvalues lie outside the unit circle (what that means for the one-step sampler)."""
    modulus = np.abs(np.asarray(eigenvalues))
    out = int((modulus > 1).sum())
    if not out:
        return para(f"all {len(modulus)} eigenvalues lie inside the unit circle (|λ| ≤ {fmt(modulus.max())}).")
    return para(f"{out} of {len(modulus)} eigenvalues lie outside the unit circle (|λ| up to {fmt(modulus.max())}): "
                f"the operator stretches those latent directions. One step applies it once, so this is harmless "
                f"for one-step samples, but carrying a latent over several steps (--steps S) would amplify them "
                f"by |λ|^S.", "warn")


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


def setting(value: Any) -> str:
    """A config value for a table cell: lists and mappings written out, not as JSON."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {setting(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(setting(v) for v in value) + "]"
    return fmt(value)


def config_rows(run: Path, cfg: dict, manifest: Manifest | str) -> list[list[Any]]:
    """Teacher, NFE, pairs, student and optimisation settings of a run, from config.json and its data manifest."""
    s = cfg.get("student", {})
    if isinstance(manifest, str):
        rows: list[list[Any]] = [["data", manifest]]
    else:
        m = manifest
        sampler = m.source.get("identity", {}).get("sampler")
        params = {k: v for k, v in m.teacher.get("params", {}).items() if k != "name"}
        rows = [["teacher", m.teacher.get("name")]] + [[f"teacher {k}", setting(v)] for k, v in params.items()]
        rows += [["teacher NFE", m.nfe]]
        rows += ([[f"sampler {k}", setting(v)] for k, v in sampler.items()] if sampler else
                 [["sampler", "(imported pairs)"]])
        kd = s.get("kind") == "kd"
        nets = "one U-Net" if kd else "U-Nets (E_T, E_0, D)"
        rows += [["data shape", "×".join(map(str, m.shape)) + (f", {m.label_dim} classes" if m.label_dim else "")],
                 ["pairs", f"{m.num_pairs:,} in {len(m.shards)} shards"],
                 ["student networks",
                  f"{nets}: channels {s.get('model_channels')}, mult {s.get('channel_mult')}, {s.get('num_blocks')} "
                  f"blocks" + ("" if kd else f", latent channels {s.get('latent_channels')}") if is_image(m.shape)
                  else f"{'one MLP' if kd else 'MLPs (E_T, E_0, D)'}: {s.get('depth')}×{s.get('hidden')}"
                  + ("" if kd else f", latent {s.get('latent_dim')}")]]
    split = read_json(run / "split.json")
    if split:
        rows.append(["shards (train / held out)", f"{len(split['train'])} / {len(split['holdout'])}"])
    if s.get("kind") == "kd":                           # one network regressing x_0: no operator, no latent terms
        rows += [["student", "kd (direct regression x_T → x_0)"],
                 ["loss", f"distance {s.get('distance')}, w_adv {s.get('w_adv')}"]]
    else:
        rows += [["student", f"kdm, operator {s.get('operator')}"],
                 ["loss", f"distance {s.get('distance')}, w_latent {s.get('w_latent')}, w_rec {s.get('w_rec')}, "
                          f"w_push {s.get('w_push')}, w_adv {s.get('w_adv')}, σ_z {s.get('sigma_z')}"]]
    rows += [["steps × batch", f"{cfg.get('steps')} × {cfg.get('batch')}"],
             ["optimiser", f"Adam lr {cfg.get('lr')}, betas {cfg.get('betas')}, EMA {cfg.get('ema')}"]]
    return rows


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


def spectrum_figure(run: Path, files: Path) -> tuple[Path, str, np.ndarray | None] | None:
    """analyze's spectrum.png when it exists, else the latest probe's eigenvalues drawn into files/; with the
    latest probe's eigenvalues (None when there are no probes)."""
    spectra = probe_spectra(run)
    latest = None if spectra is None else spectra[1][-1]
    done = run / ANALYSIS / "spectrum.png"
    if done.is_file():
        return done, "Koopman eigenvalues against the unit circle (from kdm-pipe analyze)", latest
    if spectra is None:
        return None
    steps, lams = spectra
    title = f"Koopman spectrum (EMA probe, step {int(steps[-1])})"
    return plots.spectrum(files / "spectrum.png", lams[-1], title, spectra), title, latest


def samples_caption(image: bool) -> str:
    """What evaluate's samples.png shows (its rows or panels are titled in the figure too)."""
    return ("top row: teacher x_0, bottom row: the student's one-step x̂_0 from the same held-out x_T" if image else
            "x_T, teacher x_0 and one-step samples from the same x_T, coloured by the teacher's mode")


def eval_section(run: Path, results: dict | None, image: bool, steps: int = 1) -> str:
    if results is None:
        flag = "" if steps == 1 else f" --steps {steps}"
        return section("Metrics", para(f"not evaluated yet: run `kdm-pipe evaluate {run}{flag}`", "note"))
    parts = [para(f"step {results.get('step')}, {results.get('weights')} weights, {results.get('num_pairs')} "
                  f"held-out pairs, {plural(results.get('steps', 1), 'sampling step')}"
                  + (f"; {results['feature_note']}" if "feature_note" in results else "")),
             html_table(["metric", "better", "student", "untrained", "teacher floor"], metric_rows(results))]
    parts += [para(n, "note") for n in oddities({"student": results})]
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


def run_title(run: Path, cfg: dict, manifest: Manifest | str) -> str:
    """What a run is, for its page's title: its student, its teacher and where it lives."""
    kind = cfg.get("student", {}).get("kind", "?")
    teacher = f" of the {manifest.teacher.get('name')} teacher" if isinstance(manifest, Manifest) else ""
    return f"{kind.upper()} student{teacher}: {run}"


def write_report(run: Path, steps: int = 1) -> Path:
    """Write RUN/report.html — or, for a `steps`-step evaluation, report-{steps}steps.html from its
    eval-{steps}steps.json — and the curves it shows into RUN/report_files/; returns its path."""
    run = Path(run)
    cfg = read_json(run / "config.json")
    if cfg is None:
        raise ConfigError(f"{run} is not a training run (no config.json); pass the --out directory of `kdm-pipe train`")
    files = run / FILES
    files.mkdir(exist_ok=True)
    results, analysis = read_json(run / per_steps(EVAL, steps)), read_json(run / ANALYSIS / "analysis.json")
    manifest = data_manifest(run, cfg)
    image = is_image(manifest.shape) if isinstance(manifest, Manifest) else "detector" in (results or {})
    curves = [figure(relative(p, run), c) for p, c in ((loss_figure(run, files), "training losses"),
                                                       (probe_figure(run, files), "held-out probes of the EMA weights"))
              if p is not None]
    kdm = cfg.get("student", {}).get("kind") == "kdm"
    spectrum = spectrum_figure(run, files) if kdm else None
    body = [section("Configuration", html_table(["setting", "value"], config_rows(run, cfg, manifest), "kv")),
            eval_section(run, results, image, steps),
            section("Training", *(curves or [para("no train.jsonl rows yet", "note")]))]
    if kdm:                                            # a KD student has no operator and no latent space
        body += [section("Koopman spectrum", spectrum_line(analysis),
                         outside_line(spectrum[2]) if spectrum and spectrum[2] is not None else "",
                         figure(relative(spectrum[0], run), spectrum[1]) if spectrum else
                         para("no probes recorded yet", "note"))]
    body.append(analysis_section(run, analysis))       # a KD student's analyses are those of its samples
    if isinstance(manifest, Manifest):
        body.insert(1, filter_section(Run(run).data_dir(), manifest, run))
    links = [(n, n) for n in (per_steps(EVAL, steps), "config.json", "split.json", "train.jsonl")
             if (run / n).is_file()]
    if analysis is not None:
        links.append((f"{ANALYSIS}/analysis.json", "analysis.json"))
    body.append(section("Files", "<ul>\n" + "".join(f"<li>{link(h, t)}</li>\n" for h, t in links) + "</ul>\n"))
    out = run / per_steps("report.html", steps)
    title = run_title(run, cfg, manifest) + ("" if steps == 1 else f", {steps}-step sampler")
    out.write_text(page(title, "".join(body)), encoding="utf-8")
    return out


def write_comparison(runs: dict[str, Path], out: Path, title: str | None = None) -> Path:
    """One page comparing runs (name → run dir) on the same pairs: the headline rows (whole-set FD and paired error
    for images), then the secondary ones, each saying which way is better, with the teacher floor and the best run;
    speed, each run's samples and a link to its report. `out` is the .html file to write."""
    out = Path(out)
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    results = {name: read_json(Path(r) / EVAL) for name, r in runs.items()}
    missing = [name for name, r in results.items() if r is None]
    if missing:
        raise ConfigError(f"no eval.json in the runs {', '.join(missing)}: evaluate them first")
    lead, rest = comparison_rows(results)
    header = ["metric", "better", *results, "teacher floor", "best"]
    runs_rows = [["step", "", *(r["step"] for r in results.values()), None, None],
                 ["weights", "", *(r["weights"] for r in results.values()), None, None]]
    same = len({json.dumps(r.get("teacher_floor"), sort_keys=True) for r in results.values()}) == 1
    notes = oddities(results) + ([] if same else ["the runs were evaluated on different pairs: the floor column is "
                                                  "the first run's"])
    figs, links = [], []
    for name, r in results.items():
        report = Path(runs[name]) / "report.html"
        if report.is_file():
            links.append(f"<li>{link(relative(report, base), f'{name}: report')}</li>\n")
        for f in eval_figures(Path(runs[name]), r):
            src = relative(f, base)
            if src:
                figs.append(figure(src, f"{name}: {samples_caption('detector' in r)}"))
    body = [section("Headline", html_table(header, lead)),
            section("Secondary metrics (held-out pairs)", html_table(header, rest + runs_rows),
                    *(para(n, "note") for n in notes)),
            section("Samples", *figs) if figs else "",
            section("Runs", "<ul>\n" + "".join(links) + "</ul>\n") if links else ""]
    out.write_text(page(title or "kdm-pipe: " + " vs ".join(results), "".join(body)), encoding="utf-8")
    return out
