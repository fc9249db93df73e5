"""The memorisation filter's report: DIR/filter.html with the distance histograms and the flagged samples beside
their nearest reference images (DIR/filter-distances.png, DIR/filter-flagged.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdm_pipe import plots, storage
from kdm_pipe.manifest import Manifest
from kdm_pipe.memorisation import Scores, flags
from kdm_pipe.pages import figure, html_table, page, relative, section
from kdm_pipe.shards import read_shard

SHOWN = 16                           # flagged samples drawn (then the closest unflagged ones, to compare)


def write_filter_report(directory: Path, manifest: Manifest, ref: np.ndarray, scores: dict[str, Scores]) -> Path:
    directory = Path(directory)
    s = manifest.filter.settings
    names = list(scores)
    d1 = np.concatenate([scores[n].d1 for n in names])
    d_rest = np.concatenate([scores[n].d_rest for n in names])
    hit = flags(d1, d_rest, s["rule"], s["threshold"])
    plots.filter_histograms(directory / "filter-distances.png", d1, d1 / d_rest, hit, s["rule"], s["threshold"])
    # Most copy-like first: the smallest ratio (relative rule) or distance (absolute rule); flagged ones lead.
    key = d1 / d_rest if s["rule"] == "relative" else d1
    order = np.lexsort((key, ~hit))[:SHOWN]
    shard = np.repeat(np.arange(len(names)), [len(scores[n].seed) for n in names])
    seeds = np.concatenate([scores[n].seed for n in names])
    nearest = np.concatenate([scores[n].nearest for n in names])
    samples = x0_of(directory, [(names[shard[i]], seeds[i]) for i in order])
    n_hit, total = int(hit[order].sum()), int(hit.sum())
    shown = (f"the {n_hit} closest of the {total:,} flagged" if total > n_hit else f"all {total} flagged")
    plots.image_rows(directory / "filter-flagged.png", {
        f"teacher samples: {shown}" + (f", then the {len(order) - n_hit} closest kept ones"
                                       if len(order) > n_hit else ""): samples,
        "nearest reference image": ref[nearest[order]]}, scale=max(1, 64 // manifest.shape[-1]))
    out = directory / "filter.html"
    out.write_text(page(f"Memorisation filter of {directory}", filter_section(directory, manifest, directory)),
                   encoding="utf-8")
    return out


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
    shown = min(SHOWN, f.flagged)
    flagged = (f"top: the {shown} flagged teacher samples closest to a reference image"
               + (f" (of {f.flagged:,} flagged)" if f.flagged > SHOWN else
                  ", then the closest kept ones" if f.flagged < SHOWN else "")
               + "; bottom: the nearest reference image of each")
    figs = [figure(src, caption) for name, caption in (
        ("filter-distances.png", f"distances to the nearest reference images of all {f.scored:,} scored samples "
                                 f"({f.flagged:,} flagged in red); the dashed line is the threshold"),
        ("filter-flagged.png", flagged)) if local and (src := relative(Path(directory) / name, base)) is not None]
    return section("Memorisation filter", html_table(["setting", "value"], rows, "kv"), *figs)


def x0_of(directory: Path, wanted: list[tuple[str, int]]) -> np.ndarray:
    """x_0 of the (shard name, seed) pairs `wanted`, in that order."""
    found: dict[int, np.ndarray] = {}
    for name in dict.fromkeys(n for n, _ in wanted):
        seeds = {int(seed) for n, seed in wanted if n == name}
        for rec in read_shard(directory / name):
            for row in np.flatnonzero(np.isin(rec["seed"], list(seeds))):
                found[int(rec["seed"][row])] = rec["x_0"][row]
    return np.stack([found[int(seed)] for _, seed in wanted])
