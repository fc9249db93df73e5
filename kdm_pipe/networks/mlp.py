"""The vector students' MLPs, built from a JSON-able spec.

This module imports torch alone: `kdm-pipe export` copies it into an exported pipeline folder, which must run
without kdm-pipe installed. Swish = SiLU.

    spec = {"layers": "linear-head" | "swish", "d_in": int, "d_out": int, "hidden": int, "depth": int,
            "time": float | None}

"linear-head": depth × (Linear + SiLU) then Linear(→ d_out); "swish": depth × (Linear + SiLU), the last one to
d_out (its output is activated). "time": the network sees [x, t] with this constant t (a learned bias), d_in
counting the extra input; None: no time input.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(d_in: int, d_out: int, hidden: int, depth: int) -> nn.Sequential:
    """depth × (Linear + SiLU) then Linear(→ d_out): a linear head."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(hidden if depth else d_in, d_out))


def swish_stack(d_in: int, d_out: int, hidden: int, depth: int) -> nn.Sequential:
    """depth × (Linear + Swish), the last one to d_out: the official 2-D encoder (its output is activated)."""
    widths = [d_in] + [hidden] * (depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers)


class TimeInput(nn.Module):
    """`net` applied to [x, t], t by default the network's constant time (the official 2-D networks' time input: a
    learned bias); trajectory supervision passes the time of an intermediate state."""

    def __init__(self, net: nn.Module, t: float) -> None:
        super().__init__()
        self.net, self.t = net, t

    def forward(self, x: Tensor, t: float | None = None) -> Tensor:
        return self.net(torch.cat([x, x.new_full((x.shape[0], 1), self.t if t is None else t)], dim=1))


LAYERS = {"linear-head": mlp, "swish": swish_stack}


def build_mlp(spec: dict) -> nn.Module:
    """The network a spec (module docstring) describes."""
    net = LAYERS[spec["layers"]](spec["d_in"], spec["d_out"], spec["hidden"], spec["depth"])
    return net if spec.get("time") is None else TimeInput(net, spec["time"])
