"""Statistics of a trained student's latent space over a whole pair set, in RUN/latents.zarr/statistics/:

    per_shard/{z_T, z_0, Cz_T, residual}/{count, sum, outer}   row k = shard k: n, Σz, Σzzᵀ (float64)
    per_shard/sha256                                           the shard bytes the row was computed from
    merged/{z_T, z_0, Cz_T}/{mean, cov, eigenvalues}           moments and the covariance spectrum (descending)

z_T = E_T(x_T), z_0 = E_0(x_0), Cz_T = ẑ_0 = C z_T (+ B y), residual = z_0 − ẑ_0, latents flattened. One Ray task per
shard encodes it and returns its sums (kdm_pipe.latents_update); the driver writes the row, sha256 last. The group's
attributes name the checkpoint, its sha256 and the weights: rows of another checkpoint are never mixed in (the group is
rebuilt), rows of unchanged shards are reused. The summary (attributes, `summary`) is what one chooses a latent size by:

    effective rank   participation ratio (Σλ)² / Σλ² of the covariance eigenvalues λ: how many directions the
                     latent really uses (d when all are used equally, 1 when one direction carries everything)
    explained        1 − E‖z_0 − ẑ_0‖² / tr Σ_{z_0}: the fraction of z_0's variance the pushed latent explains
    z_T isotropy     effective rank / d of z_T (1: white up to scale) and ‖μ_{z_T}‖ / √(tr Σ_{z_T}) (0: centred)

The probe rows of training (kdm_pipe.probes) share the store and never touch this group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdm_pipe import storage
from kdm_pipe.manifest import Manifest, ShardInfo
from kdm_pipe.metrics.fid import FeatureSums
from kdm_pipe.probes import STATISTICS
from kdm_pipe.stats import create_array

STORE, GROUP = "latents.zarr", STATISTICS
LATENTS = ("z_T", "z_0", "Cz_T")


def participation_ratio(eigenvalues: np.ndarray) -> float:
    lam = np.clip(eigenvalues, 0, None)
    return float(lam.sum() ** 2 / (lam**2).sum()) if lam.any() else 0.0


def identity(run: Path, ckpt: Path, weights: str) -> dict[str, Any]:
    """What the rows depend on besides the shards."""
    return {"checkpoint": ckpt.name, "checkpoint_sha256": storage.sha256(ckpt), "weights": weights, "run": str(run)}


def open_group(run: Path, who: dict[str, Any], num_shards: int, dim: int) -> zarr.Group:
    """The statistics group for `who` (rows of other checkpoints or weights are dropped), resized to the plan."""
    root = zarr.open_group(str(run / STORE), mode="a")
    g = root.get(GROUP)
    same = g is not None and all(g.attrs.get(k) == v for k, v in who.items() if k != "run") \
        and g.attrs.get("dim") == dim
    if not same:
        if g is not None:
            del root[GROUP]
        g = root.create_group(GROUP)
        g.attrs.update({**who, "dim": dim, "complete": False})
        rows = g.create_group("per_shard")
        for name in (*LATENTS, "residual"):
            s = rows.create_group(name)
            for part, shape, dtype in (("count", (), "int64"), ("sum", (dim,), "float64"),
                                       ("outer", (dim, dim), "float64")):
                create_array(s, part, (num_shards, *shape), dtype, (1, *shape))
        create_array(rows, "sha256", (num_shards, 32), "uint8", (1, 32))
    for _, a in g["per_shard"].members(max_depth=None):
        if isinstance(a, zarr.Array) and a.shape[0] != num_shards:
            a.resize((num_shards, *a.shape[1:]))
    return g


def stale(g: zarr.Group, manifest: Manifest) -> list[ShardInfo]:
    done = g["per_shard/sha256"].get_orthogonal_selection(([s.index for s in manifest.shards], slice(None)))
    return [s for s, row in zip(manifest.shards, done) if row.tobytes().hex() != s.sha256]


def write_row(g: zarr.Group, index: int, digest: str, sums: dict[str, dict[str, np.ndarray]], pairs: int) -> int:
    """The driver writes a finished task's row (sha256 last); returns the pairs for the progress bar."""
    rows = g["per_shard"]
    rows["sha256"][index] = 0                 # a row half-written by a killed driver is never trusted
    for name, parts in sums.items():
        for part, a in parts.items():
            rows[f"{name}/{part}"][index] = a
    rows["sha256"][index] = np.frombuffer(bytes.fromhex(digest), np.uint8)
    return pairs


def summarise(merged: dict[str, FeatureSums]) -> dict[str, Any]:
    """Effective ranks, the explained fraction and z_T's distance from white (see the module docstring)."""
    stats = {k: merged[k].stats(k) for k in LATENTS}
    eig = {k: np.linalg.eigvalsh(s.sigma)[::-1] for k, s in stats.items()}
    d = len(stats["z_0"].mu)
    r = merged["residual"]
    mse = float(np.trace(r.outer)) / r.count                 # E‖z_0 − ẑ_0‖²
    t = stats["z_T"]
    return {"dim": d, "num_pairs": int(merged["z_0"].count),
            "effective_rank": {k: participation_ratio(e) for k, e in eig.items()},
            "explained": 1 - mse / float(np.trace(stats["z_0"].sigma)),
            "z_T_isotropy": participation_ratio(eig["z_T"]) / d,
            "z_T_mean_over_std": float(np.linalg.norm(t.mu) / np.sqrt(np.trace(t.sigma))),
            "_stats": stats, "_eig": eig}


def write_merged(g: zarr.Group, manifest: Manifest) -> dict[str, Any]:
    """Merge the manifest's rows, write merged/ and the summary, then publish (complete: true)."""
    rows, d = g["per_shard"], g.attrs["dim"]
    merged = {name: FeatureSums(d) for name in (*LATENTS, "residual")}
    for s in manifest.shards:
        for name, m in merged.items():
            m.count += int(rows[f"{name}/count"][s.index])
            m.sum += rows[f"{name}/sum"][s.index]
            m.outer += rows[f"{name}/outer"][s.index]
    summary = summarise(merged)
    g.attrs.update({"complete": False})
    out = g.require_group("merged")
    for name in LATENTS:
        sub = out.require_group(name)
        st = summary["_stats"][name]
        for part, a in (("mean", st.mu), ("cov", st.sigma), ("eigenvalues", summary["_eig"][name])):
            create_array(sub, part, a.shape, "float64", a.shape)[...] = a
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    g.attrs.update({"summary": public, "shards": [{"index": s.index, "sha256": s.sha256} for s in manifest.shards],
                    "complete": True})
    return public


def load_latent_stats(run: Path) -> dict[str, Any] | None:
    """{summary, eigenvalues: {z_T, z_0, Cz_T}, checkpoint, weights} of a run's latent statistics, or None."""
    try:
        g = zarr.open_group(str(Path(run) / STORE), mode="r")[GROUP]
    except (OSError, ValueError, KeyError):
        return None
    if g.attrs.get("complete") is not True:
        return None
    return {"summary": g.attrs["summary"], "checkpoint": g.attrs["checkpoint"], "weights": g.attrs["weights"],
            "eigenvalues": {k: g[f"merged/{k}/eigenvalues"][...] for k in LATENTS}}
