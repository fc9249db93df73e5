"""Train an EDM teacher (Karras et al. 2022) on an image dataset, written in the project's checkpoint format.

Loss per preconditioning, as EDM pairs them (all: loss = λ(σ)·‖D(y + n, σ) − y‖², n ~ N(0, σ²I)):
    edm: ln σ ~ N(P_mean, P_std²),                           λ = (σ² + σ_d²)/(σ·σ_d)²
    vp:  σ = σ(t), t ~ U(ε_t, 1) of the VP SDE,              λ = 1/σ²
    ve:  ln σ ~ U(ln σ_min, ln σ_max),                        λ = 1/σ²
Adam with a linear warm-up, an EMA whose half-life is counted in images (with EDM's ramp-up), and, at the end, a grid
of Heun samples drawn by the shipped sampler from the EMA network. Runs are repeatable bit for bit on CPU.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from kdm_pipe.config import ConfigError, SamplerConfig, TeacherTrainConfig  # noqa: E402
from kdm_pipe.datasets import ImageData, load_images  # noqa: E402
from kdm_pipe.image_files import save_grid  # noqa: E402
from kdm_pipe.networks import ARCHITECTURES, build_network  # noqa: E402
from kdm_pipe.optim import ema_update, sanitize_grads  # noqa: E402
from kdm_pipe.runtime import pick_device, set_threads  # noqa: E402
from kdm_pipe.teachers.edm import EDMTeacher  # noqa: E402
from kdm_pipe.teachers.edm_checkpoint import save_state_dict_checkpoint  # noqa: E402

PRECONDS = {"edm": "EDMPrecond", "vp": "VPPrecond", "ve": "VEPrecond"}
CKPT_DIR = "checkpoints"


def network_spec(cfg: TeacherTrainConfig, data: ImageData) -> tuple[str, dict[str, Any]]:
    """Class name and constructor kwargs of the network, JSON-able (they go into the checkpoint's spec)."""
    c, h, w = data.shape
    if h != w or h & (h - 1):
        raise ConfigError(f"--data: images are {h}×{w}; EDM U-Nets need square images with a power-of-two side")
    unet = dict(ARCHITECTURES[cfg.arch])
    explicit = dict(model_channels=cfg.model_channels, channel_mult=cfg.channel_mult, num_blocks=cfg.num_blocks,
                    attn_resolutions=cfg.attn_resolutions)
    unet.update({k: v for k, v in explicit.items() if v is not None}, dropout=cfg.dropout)
    if h >> (len(unet["channel_mult"]) - 1) < 1:
        raise ConfigError(f"channel_mult {unet['channel_mult']} has more levels than {h}-px images can be halved")
    kwargs = dict(img_resolution=h, img_channels=c, label_dim=data.num_classes if cfg.cond else 0, **unet)
    if cfg.precond == "edm":
        kwargs["sigma_data"] = cfg.sigma_data
    return PRECONDS[cfg.precond], kwargs


def sample_sigma(net: torch.nn.Module, precond: str, n: int, gen: torch.Generator, P_mean: float,
                 P_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels σ and loss weights λ(σ) for one batch (float32, on the generator's device)."""
    shape, dev = (n, 1, 1, 1), gen.device
    if precond == "edm":
        sigma = (torch.randn(shape, generator=gen, device=dev) * P_std + P_mean).exp()
        return sigma, (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
    u = torch.rand(shape, generator=gen, device=dev)
    if precond == "vp":
        sigma = net.sigma(1 + u * (net.epsilon_t - 1))
    else:
        sigma = net.sigma_min * (net.sigma_max / net.sigma_min) ** u
    return sigma, 1 / sigma ** 2


def edm_loss(net: torch.nn.Module, precond: str, y: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator, P_mean: float = -1.2, P_std: float = 1.2) -> torch.Tensor:
    """Mean over the batch and pixels of λ(σ)·(D(y + n, σ) − y)²."""
    sigma, weight = sample_sigma(net, precond, len(y), gen, P_mean, P_std)
    n = torch.randn(y.shape, generator=gen, device=y.device) * sigma
    return (weight * (net(y + n, sigma, labels) - y) ** 2).mean()


def ema_decay(cfg: TeacherTrainConfig, images_seen: int) -> float:
    if cfg.ema_beta is not None:
        return cfg.ema_beta
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup is not None:
        halflife = min(halflife, images_seen * cfg.ema_rampup)
    return 0.5 ** (cfg.batch / max(halflife, 1e-8))


def plot_loss(log: Path, path: Path) -> Path:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["kimg"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="training images (thousands)", ylabel="EDM loss (mean over window)", yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(net: torch.nn.Module, count: int, device: torch.device) -> torch.Tensor:
    """Heun samples for seeds 0 … count − 1 with the network's EDM sampler defaults."""
    teacher = EDMTeacher("trained", {}, net, None)
    with torch.no_grad():
        sampler = SamplerConfig().over(teacher.sampler_defaults)
        return teacher.sample(sampler, list(range(count)), None, device)["x_0"]


def train_teacher(cfg: TeacherTrainConfig, progress: bool = False) -> Path:
    """Train; write OUT/config.json, train.jsonl, checkpoints/, teacher.pt + .json (EMA), loss.png, samples.png."""
    out = Path(cfg.out)
    if (out / "config.json").exists():
        raise ConfigError(f"{out} already holds a teacher run; choose another --out")
    data = load_images(cfg.data)
    if cfg.cond and data.labels is None:
        raise ConfigError(f"--cond: {cfg.data} has no class labels (add a dataset.json, or drop --cond)")
    class_name, kwargs = network_spec(cfg, data)

    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # initial weights and dropout
    net = build_network(class_name, **kwargs).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # batches, σ and noise
    images = torch.as_tensor(data.images, device=device)
    onehot = (torch.nn.functional.one_hot(torch.as_tensor(data.labels, device=device), data.num_classes).float()
              if cfg.cond else None)

    (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({
        "config": cfg.model_dump(mode="json"), "network": {"class_name": class_name, "init_kwargs": kwargs},
        "data": {"images": len(images), "shape": list(data.shape), "num_classes": data.num_classes},
        "parameters": sum(p.numel() for p in net.parameters())}, indent=1))
    log = (out / "train.jsonl").open("w")
    window, t0 = [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(images), (cfg.batch,), generator=gen, device=device)
        loss = edm_loss(net, cfg.precond, images[idx], None if onehot is None else onehot[idx], gen,
                        cfg.P_mean, cfg.P_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sanitize_grads(net.parameters())               # as EDM: a non-finite gradient must not poison the weights
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(step / cfg.lr_warmup, 1.0) if cfg.lr_warmup else cfg.lr
        opt.step()
        beta = ema_decay(cfg, step * cfg.batch)
        ema_update(ema, net, beta)
        window.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "kimg": step * cfg.batch / 1000, "loss": sum(window) / len(window),
                   "lr": opt.param_groups[0]["lr"], "ema_beta": beta, "seconds": time.perf_counter() - t0}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if progress:
                print(f"step {step}/{cfg.steps}  loss {row['loss']:.4f}  {row['seconds']:.0f} s", flush=True)
            window = []
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_state_dict_checkpoint(ema, class_name, kwargs, out / CKPT_DIR / f"teacher-{step:08d}.pt")
    log.close()

    save_state_dict_checkpoint(ema, class_name, kwargs, out / "teacher.pt")
    plot_loss(out / "train.jsonl", out / "loss.png")
    if cfg.grid:
        samples = sample_grid(ema, cfg.grid, device).float().cpu().numpy()
        save_grid(out / "samples.png", samples, scale=max(1, 64 // data.shape[1]))
    return out
