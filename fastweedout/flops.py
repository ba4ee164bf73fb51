"""Analytic FLOP counts, by walking the network with shapes instead of tensors.

Convention (as ``torch.utils.flop_counter.FlopCounterMode``): one multiply-add = 2 FLOPs; only
convolutions and linear layers count (BN, ReLU, masks, pooling and additions count zero).
*Useful* FLOPs are those of the live sub-network; *executed* FLOPs are what an engine computes.
A training step costs 3x the forward (backward = grad-input + grad-weight), less the stem's
grad-input, which nothing needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .masks import Masks
from .backend import BaseBackend

CONVENTION = "1 multiply-add = 2 FLOPs; conv and linear layers only (FlopCounterMode's convention)"


@dataclass
class _Shape:
    node_set: str | None
    h: int
    w: int


@dataclass
class FlopCount:
    total: int = 0            # forward FLOPs per image
    stem: int = 0             # of which the stem convolution
    head: int = 0             # of which the final linear layer
    max_activation: int = 0   # largest activation, elements per image
    layers: dict = field(default_factory=dict)  # conv/linear name -> FLOPs per image


class _CountBackend(BaseBackend):
    def __init__(self, live: Mapping[str, int], in_channels: int):
        self.live, self.in_channels = live, in_channels
        self.c = FlopCount()
        self._n = 0

    def _conv(self, x: _Shape, conv, cin: int, out_set: str) -> _Shape:
        kh, kw = conv.kernel_size
        s, p = conv.stride[0], conv.padding[0]
        h, w = (x.h + 2 * p - kh) // s + 1, (x.w + 2 * p - kw) // s + 1
        f = 2 * cin * self.live[out_set] * kh * kw * h * w
        self.c.total += f
        self.c.layers[f"conv{self._n}"] = f
        self._n += 1
        self.c.max_activation = max(self.c.max_activation, self.live[out_set] * h * w)
        return _Shape(out_set, h, w), f

    def stem(self, x, conv, node_set):
        out, f = self._conv(x, conv, self.in_channels, node_set)
        self.c.stem = f
        return out

    def conv(self, x, conv, in_set, out_set):
        return self._conv(x, conv, self.live[in_set], out_set)[0]

    def act(self, x, bn, node_set):
        return x

    def dropout(self, x, p):
        return x

    def add(self, h, sc):
        return h

    def head(self, x, fc, node_set):
        f = 2 * self.live[node_set] * fc.out_features
        self.c.total += f
        self.c.head = f
        self.c.layers["fc"] = f
        return x


def count_forward(model, image_size, live: Mapping[str, int] | None = None) -> FlopCount:
    """Forward FLOPs per image of ``model`` with ``live`` channels per node set (None: dense)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    live = dict(model.node_layers()) if live is None else dict(live)
    be = _CountBackend(live, model.in_channels)
    model.walk(be, _Shape(None, h, w))
    return be.c


def forward_flops(model, image_size, live: Mapping[str, int] | None = None) -> int:
    return count_forward(model, image_size, live).total


def train_step_flops(model, image_size, live: Mapping[str, int] | None = None) -> int:
    """Forward + backward FLOPs per image of one training step."""
    c = count_forward(model, image_size, live)
    return 3 * c.total - c.stem  # the stem's input needs no gradient


def member_live(masks: Masks) -> list[dict[str, int]]:
    counts = masks.live_counts()
    return [{k: int(v[i]) for k, v in counts.items()} for i in range(masks.population)]


def useful_flops(model, masks: Masks, image_size) -> int:
    """Forward FLOPs per image of all members' live sub-networks, summed over the population."""
    return sum(forward_flops(model, image_size, live) for live in member_live(masks))


def scoring_flops(model, masks: Masks, batch: int, image_size, engine: str) -> dict:
    """Useful and executed FLOPs of scoring ``masks`` on ``batch`` images with ``engine``."""
    p = masks.population
    dense = count_forward(model, image_size)
    useful = batch * useful_flops(model, masks, image_size)
    if engine == "loop":
        executed = batch * p * dense.total
    elif engine == "folded":  # the stem runs once
        executed = batch * (p * (dense.total - dense.stem) + dense.stem)
    elif engine == "compact":  # stem once (dense), the rest at the padded live width
        padded = {k: int(v.max()) for k, v in masks.live_counts().items()}
        c = count_forward(model, image_size, padded)
        executed = batch * (p * (c.total - c.stem) + dense.stem)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return {"useful": int(useful), "executed": int(executed), "convention": CONVENTION}


def training_flops(model, image_size, mask: Mapping | None = None, masked: bool = False) -> dict:
    """Useful and executed FLOPs per image of one training step (forward + backward).

    ``mask``: one member's node masks (name -> bool ``[C]``) or None (dense). ``masked=False``: the
    physically pruned network is trained (executed = useful); ``masked=True``: the full network runs
    under the mask (executed = the dense step, useful = the live sub-network's step).
    """
    live = None
    if mask is not None:
        live = {k: int(v.sum()) for k, v in mask.items()}
    useful = train_step_flops(model, image_size, live)
    executed = train_step_flops(model, image_size) if masked else useful
    return {"useful": int(useful), "executed": int(executed), "convention": CONVENTION}


def counted_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """(FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts while ``fn(*args, **kwargs)`` runs,
    fn's result): the measured cross-check of the analytic counts (same convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = fn(*args, **kwargs)
    return int(fc.get_total_flops()), out
