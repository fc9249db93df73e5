"""Latent probes during training: on fixed held-out pairs, the paired error of the one-step sample and the moments
of z_0, z_T and C·z_T plus the Koopman eigenvalues, appended to RUN/latents.zarr so drift can be plotted over training.

    latents.zarr/step                 (n,)        training step of each probe
    latents.zarr/paired_mse           (n,)        mean (x̂_0 − x_0)² of the probed weights
    latents.zarr/{z_0,z_T,Cz_T}/mean  (n, d)      per-dimension mean over the probe pairs
    latents.zarr/{z_0,z_T,Cz_T}/std   (n, d)      per-dimension standard deviation
    latents.zarr/latent_mse           (n,)        mean (z_0 − C z_T)²
    latents.zarr/eigenvalues          (n, d, 2)   (Re, Im) of the operator's eigenvalues
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import Tensor, nn

from kdm_pipe.stats import compressor

STATISTICS = "statistics"        # kdm_pipe.latents' group in the same store


@torch.no_grad()
def probe(model: nn.Module, x_0: Tensor, x_T: Tensor, labels: Tensor | None) -> dict[str, np.ndarray]:
    """One probe row (arrays without the step axis); KD students have no latent, only `paired_mse`."""
    was_training = model.training
    model.eval()
    row = {"paired_mse": np.asarray(((model(x_T, labels) - x_0) ** 2).mean().item())}
    if hasattr(model, "koopman"):
        z_0, z_T = model.encode_0(x_0, labels), model.encode_T(x_T, labels)
        z_hat = model.push(z_T, labels)
        for name, z in (("z_0", z_0), ("z_T", z_T), ("Cz_T", z_hat)):
            row[f"{name}/mean"] = z.mean(0).double().cpu().numpy()
            row[f"{name}/std"] = z.std(0).double().cpu().numpy()
        row["latent_mse"] = np.asarray(((z_0 - z_hat) ** 2).mean().item())
        lam = model.koopman.eigenvalues().detach().cpu()
        row["eigenvalues"] = torch.stack([lam.real, lam.imag], -1).double().numpy()
    model.train(was_training)
    return row


def walk(group: zarr.Group, prefix: str = ""):
    """(path, array) for every probe array under `group` (the latent statistics group is not a probe: skipped)."""
    for name, arr in group.arrays():
        yield prefix + name, arr
    for name, sub in group.groups():
        if prefix + name != STATISTICS:
            yield from walk(sub, prefix + name + "/")


class ProbeStore:
    """Append-only rows keyed by step; reopening for a resumed run drops rows past the resumed step."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.root = zarr.open_group(str(path), mode="a")
        if "step" in self.root:
            keep = int(np.searchsorted(self.root["step"][:], resume_step, side="right"))
            for _, arr in walk(self.root):
                arr.resize((keep, *arr.shape[1:]))

    def append(self, step: int, row: dict[str, np.ndarray]) -> None:
        for name, value in {"step": np.asarray(step, dtype=np.int64), **row}.items():
            value = np.asarray(value, dtype=np.int64 if name == "step" else np.float64)
            if name not in self.root:
                self.root.create_array(name, shape=(0, *value.shape), dtype=value.dtype,
                                       chunks=(64, *value.shape), compressors=compressor())
            self.root[name].append(value[None], axis=0)


def load_probes(path: Path, attempts: int = 5) -> dict[str, np.ndarray]:
    """All probe arrays of a run's latents.zarr, by path ("z_0/mean", "eigenvalues", ...), cut to the rows every
    array has. A run training meanwhile appends to them array by array: a read that meets an append under way
    (an array's shape and chunks out of step) is retried."""
    for attempt in range(attempts):
        try:
            rows = {name: arr[:] for name, arr in walk(zarr.open_group(str(path), mode="r"))}
            n = min((len(a) for a in rows.values()), default=0)
            return {name: a[:n] for name, a in rows.items()}
        except ValueError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


def probe_spectra(run: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps (n,), complex eigenvalues (n, d)) of the EMA probes in RUN/latents.zarr, or None without them."""
    path = Path(run) / "latents.zarr"
    probes = load_probes(path) if path.exists() else {}
    if "eigenvalues" not in probes:
        return None
    lam = probes["eigenvalues"]
    return probes["step"], lam[..., 0] + 1j * lam[..., 1]
