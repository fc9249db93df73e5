"""EDM's U-Nets: ``SongUNet`` (DDPM++ / NCSN++, Song et al. 2021) and ``DhariwalUNet`` (ADM, Dhariwal & Nichol 2021).

Constructor keywords, defaults and module names follow EDM's ``training/networks.py``, so the state dict of an
official checkpoint loads with ``strict=True``. ``forward(x, noise_labels, class_labels, augment_labels=None)``
returns the raw network output F (preconditioning lives in ``precond.py``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

# Relative: `kdm-pipe export` copies this file and layers.py into pipelines that run without kdm-pipe.
from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock


def _drop_labels(labels: Tensor, p: float, training: bool) -> Tensor:
    """Zero whole label rows with probability p while training (classifier-free guidance)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def _role(name: str) -> str:
    """'16x16_aux_down' -> 'aux_down': the part of a module name after the resolution tag."""
    return name.split("_", 1)[1]


class SongUNet(torch.nn.Module):
    """DDPM++ (positional embedding, standard encoder, [1,1] filter) and NCSN++ (Fourier embedding, residual
    input pyramid, [1,3,3,1] filter) U-Net of Song et al., as reimplemented in EDM."""

    def __init__(self,
                 img_resolution: int,
                 in_channels: int,
                 out_channels: int,
                 label_dim: int = 0,
                 augment_dim: int = 0,
                 model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4,
                 num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10,
                 label_dropout: float = 0,
                 embedding_type: str = "positional",
                 channel_mult_noise: int = 1,
                 encoder_type: str = "standard",
                 decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        for key, value, allowed in (("embedding_type", embedding_type, ("positional", "fourier")),
                                    ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                    ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}; expected one of {allowed}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise (+ label, + augmentation) embedding -> two SiLU layers.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder; NCSN++'s input pyramid ("aux") runs beside the main path and is merged after each downsample.
        self.enc = torch.nn.ModuleDict()
        skips = []
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, kernel=3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
                skips.append(cout)

        # Decoder; every "block" concatenates one encoder skip; "aux" convs produce (and sum) the output image.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(noise_labels)
        # Song et al. order the halves [sin, cos]; the embeddings return [cos, sin].
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            # Scaled so a one-hot label has unit mean square, like the other embedding inputs.
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        aux = x
        for name, module in self.enc.items():
            role = _role(name)
            if role == "aux_down":
                aux = module(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + module(aux)
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + module(aux)) / math.sqrt(2)
            else:
                x = module(x) if role == "conv" else module(x, emb)
                skips.append(x)

        out = None
        for name, module in self.dec.items():
            role = _role(name)
            if role == "aux_up":
                out = module(out)
            elif role == "aux_norm":
                head = module(x)
            elif role == "aux_conv":
                head = module(F.silu(head))
                out = head if out is None else head + out
            else:
                if role.startswith("block"):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


class DhariwalUNet(torch.nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021) as reimplemented in EDM: FiLM embedding injection, 64 channels per
    attention head, attention at every block of the listed resolutions."""

    def __init__(self,
                 img_resolution: int,
                 in_channels: int,
                 out_channels: int,
                 label_dim: int = 0,
                 augment_dim: int = 0,
                 model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4,
                 num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10,
                 label_dropout: float = 0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Creation order follows EDM so that a seeded build draws the same initial weights.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = torch.nn.ModuleDict()
        skips = []
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, kernel=3, **init)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
                skips.append(cout)

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        skips = []
        for name, module in self.enc.items():
            x = module(x) if _role(name) == "conv" else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if _role(name).startswith("block"):
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


UNETS: dict[str, type[torch.nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
