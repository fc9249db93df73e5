"""Building blocks of the EDM U-Nets (Karras et al. 2022), written from the published architecture.

Module and parameter names match EDM's so official checkpoints load with ``strict=True``. Layers cast their
weights to the input dtype, so a float16 input runs the layer in float16 (EDM's ``use_fp16`` path).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def init_tensor(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """Random tensor of ``shape`` with the variance of the named init scheme.

    Draws from the global torch generator in the same order and form as EDM, so a seeded build reproduces
    EDM's initial weights.
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}; expected one of {INIT_MODES}")


def _param(shape: Sequence[int], scale: float, mode: str, fan_in: int, fan_out: int) -> torch.nn.Parameter:
    # The bias is drawn even when its scale is 0: skipping the draw would shift every later init vs. EDM.
    return torch.nn.Parameter(init_tensor(shape, mode, fan_in, fan_out) * scale)


class Linear(torch.nn.Module):
    """Fully connected layer ``y = x Wᵀ + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = _param([out_features, in_features], init_weight, **fans)
        self.bias = _param([out_features], init_bias, **fans) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = x @ self.weight.to(x.dtype).t()
        return x if self.bias is None else x + self.bias.to(x.dtype)


def _depthwise(f: Tensor, channels: int) -> Tensor:
    return f.tile([channels, 1, 1, 1])


class Conv2d(torch.nn.Module):
    """2-D convolution ("same" padding) with optional 2× FIR up/down-sampling.

    ``kernel=0`` gives a pure resampling layer without weights. The normalised outer product of
    ``resample_filter`` is kept as the ``resample_filter`` buffer only when resampling. ``fused_resample`` (used
    by NCSN++'s input pyramid) convolves at full resolution and then blurs down, with all padding up front.
    Fused upsampling is refused: EDM's version returns 2H−4 pixels and none of its networks uses it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        if up and fused_resample and kernel:
            raise ValueError("fused upsampling is not supported; use fused_resample=False")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = _param([out_channels, in_channels, kernel, kernel], init_weight, **fans) if kernel else None
        self.bias = _param([out_channels], init_bias, **fans) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2

        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, _depthwise(f, self.out_channels), groups=self.out_channels, stride=2)
        else:
            # Zero-stuffing keeps 1 of every 4 taps of f, so 4·f keeps the upsampler's DC gain at 1.
            if self.up:
                x = F.conv_transpose2d(x, _depthwise(4 * f, self.in_channels), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, _depthwise(f, self.in_channels), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """softmax_k(qᵀk / √c) for q, k of shape [n, c, tokens]; computed in float32 for fp16 stability."""
    logits = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1]))
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(torch.nn.Module):
    """Residual block shared by DDPM++, NCSN++ and ADM: GN-SiLU-conv, embedding injection, GN-SiLU-dropout-conv,
    skip add, then optional multi-head self-attention; both adds are scaled by ``skip_scale``.

    ``adaptive_scale`` selects FiLM (``x·(1+scale) + shift`` after the norm, ADM) or an additive bias before the
    norm (DDPM++). ``num_heads`` defaults to ``out_channels // channels_per_head`` when ``attention`` is set.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1×1 projection only when channels change or it is asked for; otherwise a pure resampler.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale

        if self.num_heads:
            # EDM's channel layout: qkv's 3C outputs are read as [heads, C/heads, (q, k, v)].
            b, c = x.shape[:2]
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            a = torch.einsum("nqk,nck->ncq", attention_weights(q, k), v)
            x = (self.proj(a.reshape(x.shape)) + x) * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """Transformer sinusoidal embedding ``[cos(x·ω_i), sin(x·ω_i)]`` with ω_i = max_positions^(−i/n).

    ``endpoint=True`` spaces the exponents so that the last frequency is exactly 1/max_positions.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        i = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** i
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features ``[cos(2π f x), sin(2π f x)]``, f ~ N(0, scale²) kept as the ``freqs`` buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
