"""Clean-room EDM networks (Karras et al. 2022): U-Nets, preconditioning wrappers, a name registry and the
architecture presets of EDM's ``train.py``.

    net = build_network("VPPrecond", img_resolution=32, img_channels=3, **ARCHITECTURES["ddpmpp"],
                        dropout=0.13, augment_dim=9)
"""
from __future__ import annotations

from typing import Any

import torch

from kdm_pipe.networks.precond import EDMPrecond, VEPrecond, VPPrecond
from kdm_pipe.networks.unets import DhariwalUNet, SongUNet

NETWORKS: dict[str, type[torch.nn.Module]] = {
    "SongUNet": SongUNet,
    "DhariwalUNet": DhariwalUNet,
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
    "EDMPrecond": EDMPrecond,
}

# U-Net keywords per `--arch` of EDM's train.py; dropout (0.13) and augment_dim (9 when augmenting) are
# training options there, so they are left to the caller.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
}


def build_network(class_name: str, **kwargs: Any) -> torch.nn.Module:
    """Instantiate a registered network by class name.

    A dotted EDM name such as ``"training.networks.EDMPrecond"`` resolves to its last component.
    """
    name = class_name.rsplit(".", 1)[-1]
    if name not in NETWORKS:
        raise ValueError(f"unknown network class {class_name!r}; expected one of {sorted(NETWORKS)}")
    return NETWORKS[name](**kwargs)


__all__ = ["ARCHITECTURES", "NETWORKS", "build_network", "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond",
           "EDMPrecond"]
