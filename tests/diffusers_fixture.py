"""Tiny random diffusers models saved with save_pretrained, as a user's local model folder would be."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_unet(size: int = 8, channels: int = 1, classes: int | None = None, width: int = 8, seed: int = 0, **extra):
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                                 block_out_channels=(width, 2 * width), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=classes, **extra)
    with torch.no_grad():      # larger random weights: outputs that depend visibly on x, t and the label
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def scheduler(kind: str, prediction: str = "epsilon"):
    import diffusers

    if kind == "flow":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    # clip_sample off: the probability-flow ODE is not clipped, and DDIM with η = 0 is its Euler step
    return diffusers.DDIMScheduler(beta_schedule="linear", prediction_type=prediction, clip_sample=False,
                                   set_alpha_to_one=True)


def save_model(root: Path, kind: str = "vp", prediction: str = "epsilon", pipeline: bool = False, **unet_kw) -> Path:
    """UNet2DModel + scheduler_config.json in `root`, or a DDPMPipeline-style folder (model_index.json, unet/,
    scheduler/) when `pipeline`."""
    import diffusers

    unet, sched = tiny_unet(**unet_kw), scheduler(kind, prediction)
    if pipeline:
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(root, safe_serialization=True)
    else:
        unet.save_pretrained(root, safe_serialization=True)
        sched.save_pretrained(root)
    return root


def tiny_vae(latent_channels: int = 4, seed: int = 1, **extra):
    """An AutoencoderKL with two blocks: 16×16 RGB images ↔ 8×8 latents."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                                   sample_size=16, **extra).eval()


def save_latent_pipeline(root: Path, kind: str = "vp", prediction: str = "epsilon", vae_kw: dict | None = None,
                         **unet_kw) -> Path:
    """A latent pipeline folder as save_pretrained writes it: model_index.json naming unet/, vae/ (AutoencoderKL)
    and scheduler/; the UNet works on the VAE's 4 × 8 × 8 latents."""
    import diffusers

    vae = tiny_vae(**(vae_kw or {}))
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(**{"channels": 4, **unet_kw}), scheduler=scheduler(kind, prediction))
    pipe.register_modules(vae=vae)                     # named in model_index.json …
    pipe.save_pretrained(root, safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)      # … and saved beside unet/ and scheduler/
    return root


def save_dit_pipeline(root: Path, classes: int = 3, learn_sigma: bool = True, prediction: str = "epsilon",
                      seed: int = 0) -> Path:
    """A DiTPipeline folder (transformer/, vae/, scheduler/): a class-conditional DiT on the VAE's 4 × 8 × 8 latents,
    with a learned variance (8 output channels) as DiT-XL/2 has."""
    import diffusers

    torch.manual_seed(seed)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                          out_channels=8 if learn_sigma else 4, num_layers=2, sample_size=8,
                                          patch_size=2, num_embeds_ada_norm=classes)
    with torch.no_grad():      # DiT zero-initialises its modulation and output: random weights make it do something
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = diffusers.DiTPipeline(transformer=dit.eval(), vae=tiny_vae(), scheduler=scheduler("vp", prediction))
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def shard_twice(cfg):
    """Shard 0 of `cfg` written by two fresh teachers (as two Ray workers would build them from the folder), into
    cfg.out and a sibling `b`: byte for byte the same (pairs are f(seed)); its ShardInfo."""
    from kdm_pipe.generation import _TEACHERS, make_shard

    out = Path(cfg.out)
    out.mkdir()
    (out.parent / "b").mkdir()
    _TEACHERS.clear()
    first = make_shard(cfg, 0)[0]
    _TEACHERS.clear()
    again = make_shard(cfg.model_copy(update={"out": out.parent / "b"}), 0)[0]
    assert first.sha256 == again.sha256
    return first
