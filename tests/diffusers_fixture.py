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
