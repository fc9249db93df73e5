"""sample: one-step samples of a trained student from seeds, written as EDM writes them.

Images → OUT/{seed//1000*1000:06d}/{seed:06d}.png, OUT/samples.npz (arr_0 uint8 NHWC, seeds, labels), grid.png and
samples.json. Vector data → OUT/samples.npz (x_0, seeds, labels) and samples.json. x_T = σ_max·z with z from one
generator per seed (and the class label drawn from it next), exactly as the teacher's pairs were drawn, so
`sample` from seed s is comparable with the teacher's pair of seed s. Latent pairs (a VAE's latents): the student's
latents are kept in OUT/latents.npy and the images are their decoding through the VAE the manifest records (or
--vae). RUN and OUT may be s3:// URLs (OUT is written in a local mirror and uploaded file by file, samples.json last).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kdm_pipe import mirror, storage
from kdm_pipe.config import ConfigError, SampleConfig
from kdm_pipe.evaluation import apply, chosen_weights, network_passes, sampler
from kdm_pipe.image_files import SAMPLES_JSON, write_samples
from kdm_pipe.run import Run, working
from kdm_pipe.runtime import pick_device
from kdm_pipe.sampling import seed_noise
from kdm_pipe.student import is_image
from kdm_pipe.teachers.vae import decoder
from kdm_pipe.trained import load_students


def run(cfg: SampleConfig) -> dict:
    out = cfg.out
    storage.check_bucket(out, "--out")
    with storage.remote_errors(out, "--out", ConfigError):
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; pass a directory for the samples")
    with working(cfg.run) as r:                        # RUN on s3://: worked on in its mirror, weights.json pushed
        if storage.is_remote(out):                     # written in a mirror, then uploaded with samples.json last
            staged = mirror.of(out)
            storage.remove(out / SAMPLES_JSON)         # (the directory is incomplete until it is rewritten)
            paths = draw(cfg, r, staged.local)
            staged.push_changed()
            return {k: out / p.relative_to(staged.local) for k, p in paths.items()}
        return draw(cfg, r, Path(out))


def draw(cfg: SampleConfig, r: Run, out: Path) -> dict[str, Path]:
    run_dir, num, seed, class_label, batch = r.path, cfg.num, cfg.seed, cfg.class_label, cfg.batch
    dev = pick_device(cfg.device)
    decode = decoder(r.manifest(), cfg.vae, dev, r.data_dir())   # latent pairs: a VAE not found is refused first
    models, _, manifest, step, ckpt = load_students(run_dir, device=dev)      # one read of the checkpoint
    fns = {w: sampler(m, cfg.steps) for w, m in models.items()}   # a --steps the student cannot take: refused first
    which = chosen_weights(run_dir, cfg.weights, dev, models, ckpt)    # auto: the run's recorded choice
    fn = fns[which]
    if class_label is not None and not 0 <= class_label < manifest.label_dim:
        raise ConfigError(f"--class {class_label}: the student has {manifest.label_dim} classes"
                          + ("" if manifest.label_dim else " (it is unconditional: drop --class)"))
    seeds = np.arange(seed, seed + num)
    xs, ys = [], []
    for b in range(0, num, batch):
        z, y = seed_noise(seeds[b:b + batch].tolist(), tuple(manifest.shape), manifest.label_dim)
        if class_label is not None:
            y = torch.nn.functional.one_hot(torch.full((len(z),), class_label), manifest.label_dim).float()
        y = None if y is None else y.numpy()
        xs.append(apply(fn, (manifest.sigma_max * z).numpy(), y, dev, batch))
        ys.append(y)
    x = np.concatenate(xs)
    labels = None if ys[0] is None else np.concatenate(ys)
    settings = {"run": str(r), "step": step, "weights": which, "seed": seed, "class": class_label,
                "steps": cfg.steps, "network_passes": network_passes(r.config.student.kind, cfg.steps),
                "x_T": "sigma_max * z, one generator per seed (EDM)"}
    if decode is not None:
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "latents.npy", x)
        settings["latent"] = manifest.latent.model_dump()
        paths = {**write_samples(out, decode(x, batch), seeds, labels, settings), "latents": out / "latents.npy"}
    elif is_image(manifest.shape):
        paths = write_samples(out, x, seeds, labels, settings)
    else:
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "samples.npz", x_0=x, seeds=seeds, **({} if labels is None else {"labels": labels}))
        storage.write_text(out / SAMPLES_JSON, json.dumps({"num": num, "seeds": seeds.tolist(), "settings": settings}))
        paths = {"dir": out, "npz": out / "samples.npz"}
    print(f"{cfg.out}: {num} {cfg.steps}-step samples ({settings['network_passes']} network passes each; seeds "
          f"{seed}…{seed + num - 1}) from {r} step {step}, {which} weights")
    return paths
