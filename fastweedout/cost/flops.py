"""Analytic FLOP counts, by walking the network with shapes instead of tensors.

Convention (as ``torch.utils.flop_counter.FlopCounterMode``): one multiply-add = 2 FLOPs; only
convolutions and linear layers count (BN, ReLU, masks, pooling and additions count zero).
*Useful* FLOPs are those of the live sub-network; *executed* FLOPs are what an engine computes.
A training step costs 3x the forward (backward = grad-input + grad-weight), less the stem's
grad-input, which nothing needs. Each scoring engine's executed FLOPs are its entry's rule in
:mod:`fastweedout.engines.registry`; bytes moved are :mod:`fastweedout.cost.bytes`. Weight
(unstructured) masks: a live conv weight costs 2*H_out*W_out FLOPs per image, a live linear weight 2
(:func:`weight_uses`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastweedout.masks import Masks
from fastweedout.model.backend import ShapeBackend

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
    max_weight: int = 0       # largest conv weight at these widths, elements
    layers: dict = field(default_factory=dict)  # conv/linear name -> FLOPs per image
    uses: dict = field(default_factory=dict)  # id(conv/linear module) -> multiply-adds per weight per image


class _CountBackend(ShapeBackend):
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
        self.c.max_weight = max(self.c.max_weight, cin * self.live[out_set] * kh * kw)
        self.c.uses[id(conv)] = h * w
        return _Shape(out_set, h, w), f

    def stem(self, x, conv, node_set):
        out, f = self._conv(x, conv, self.in_channels, node_set)
        self.c.stem = f
        return out

    def conv(self, x, conv, in_set, out_set):
        return self._conv(x, conv, self.live[in_set], out_set)[0]

    def head(self, x, fc, node_set):
        f = 2 * self.live[node_set] * fc.out_features
        self.c.total += f
        self.c.head = f
        self.c.layers["fc"] = f
        self.c.uses[id(fc)] = 1
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


def padded_live(masks: Masks, multiple: int = 1) -> dict[str, int]:
    """The compact engine's width per node set: the most live channels of any member, rounded up to
    ``multiple`` (16 where the Triton kernels run: ``engines.compact.PAD_MULTIPLE``)."""
    return {k: -(-int(v.max()) // multiple) * multiple for k, v in masks.live_counts().items()}


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


def weight_uses(model, image_size) -> dict[str, int]:
    """Parameter name -> multiply-adds each of its weights takes per image (conv: H_out * W_out; linear: 1)."""
    uses = count_forward(model, image_size).uses
    return {f"{n}.weight": uses[id(m)] for n, m in model.named_modules() if id(m) in uses}


def weight_live_flops(model, live: Mapping[str, int], image_size) -> tuple[int, int]:
    """(forward FLOPs per image of ``live`` weights per weight tensor, of which the stem's)."""
    uses = weight_uses(model, image_size)
    per = {k: 2 * uses[k] * n for k, n in live.items()}
    return sum(per.values()), per.get("stem.weight", 0)


def counted_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """(FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts while ``fn(*args, **kwargs)`` runs,
    fn's result): the measured cross-check of the analytic counts (same convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = fn(*args, **kwargs)
    return int(fc.get_total_flops()), out
