"""Analytic FLOP and byte counts, by walking the network with shapes instead of tensors.

Convention (as ``torch.utils.flop_counter.FlopCounterMode``): one multiply-add = 2 FLOPs; only
convolutions and linear layers count (BN, ReLU, masks, pooling and additions count zero).
*Useful* FLOPs are those of the live sub-network; *executed* FLOPs are what an engine computes.
A training step costs 3x the forward (backward = grad-input + grad-weight), less the stem's
grad-input, which nothing needs. *Bytes moved* (:func:`scoring_bytes`) are the global-memory traffic
of one scoring call as the engine's ops issue it (see :data:`PASSES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastweedout.masks import Masks
from fastweedout.model.backend import BaseBackend, ShapeBackend

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


def scoring_flops(model, masks: Masks, batch: int, image_size, engine: str, pad_multiple: int = 1) -> dict:
    """Useful and executed FLOPs of scoring ``masks`` on ``batch`` images with ``engine``
    (``pad_multiple``: the compact engine's rounding of its widths, see :func:`padded_live`)."""
    p = masks.population
    dense = count_forward(model, image_size)
    useful = batch * useful_flops(model, masks, image_size)
    if engine == "loop":
        executed = batch * p * dense.total
    elif engine == "folded":  # the stem runs once
        executed = batch * (p * (dense.total - dense.stem) + dense.stem)
    elif engine == "compact":  # stem once (dense), the rest at the padded live width
        c = count_forward(model, image_size, padded_live(masks, pad_multiple))
        executed = batch * (p * (c.total - c.stem) + dense.stem)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return {"useful": int(useful), "executed": int(executed), "convention": CONVENTION}


# ------------------------------------------------------------------------------------ bytes moved
#: Activation-sized (reads, writes) of one BN-ReLU-mask, by engine variant and BN mode, as the engines'
#: code issues them. Eager PyTorch ops read each input once and write their output once, and
#: batch-statistics BN reads its input twice (statistics, then normalisation): the reference
#: ``mask * relu(bn(x))`` is BN + ReLU + mask multiply (+ the per-member slices concatenated when
#: members are folded). The Triton epilogue is one pass (running) or a statistics pass + one apply
#: pass (batch). In the fused compact engine the activation is never written: the next convolution
#: applies it while loading (its reads and writes are the convolutions' own).
PASSES = {
    "loop": {"batch": (4, 3), "running": (3, 3)},
    "folded": {"batch": (5, 4), "running": (4, 4)},
    "folded-triton": {"batch": (2, 1), "running": (1, 1)},
    "compact": {"batch": (3, 2), "running": (2, 2)},  # members=1, no mask: BN + ReLU (+ 1R 1W with a pad mask)
    "compact-triton": {"batch": (0, 0), "running": (0, 0)},
}


@dataclass
class _Act:
    node_set: str | None
    h: int
    w: int
    n: int  # member copies: 1 (shared: the folded stem, or the compact engine's dense stem) or P


class _BytesBackend(BaseBackend):
    """Counts elements moved by one scoring call (activations and weights), per the engine's code."""

    def __init__(self, variant, bn, width, live, dense, in_channels, batch, members, num_classes, pad):
        self.v, self.bn, self.width, self.live, self.dense = variant, bn, width, live, dense
        self.cin, self.B, self.P, self.classes, self.pad = in_channels, batch, members, num_classes, pad
        self.act_elems = 0
        self.weight_elems = 0

    def _t(self, x: _Act, width: int | None = None) -> int:
        c = self.cin if x.node_set is None else (width or self.width[x.node_set])
        return x.n * self.B * c * x.h * x.w

    def _conv_shape(self, x: _Act, conv, out_set: str, n: int) -> _Act:
        kh, kw = conv.kernel_size
        s, p = conv.stride[0], conv.padding[0]
        return _Act(out_set, (x.h + 2 * p - kh) // s + 1, (x.w + 2 * p - kw) // s + 1, n)

    def _weights(self, conv, in_set, out_set):
        kk = conv.kernel_size[0] * conv.kernel_size[1]
        if self.v.startswith("compact"):  # gathered per member: read the rows, write, the conv reads them
            cin = self.cin if in_set is None else self.live[in_set]
            self.weight_elems += 3 * self.P * cin * self.live[out_set] * kk
        else:
            cin = self.cin if in_set is None else self.dense[in_set]
            self.weight_elems += (self.P if self.v == "loop" else 1) * cin * self.dense[out_set] * kk

    def stem(self, x, conv, node_set):
        n = self.P if self.v == "loop" else 1
        x = _Act(None, x.h, x.w, n)
        y = self._conv_shape(x, conv, node_set, n)
        kk = conv.kernel_size[0] * conv.kernel_size[1]
        self.weight_elems += n * self.cin * self.dense[node_set] * kk
        dense_out = self._t(y, self.dense[node_set])
        self.act_elems += self._t(x) + dense_out
        if self.v.startswith("compact"):
            y = _Act(node_set, y.h, y.w, self.P)
            self.act_elems += 2 * self._t(y)  # index_select of every member's live channels
            if self.v == "compact-triton" and self.bn == "batch":
                self.act_elems += dense_out  # the stem's statistics, once
        return y

    def act(self, x, bn, node_set):
        t = self._t(x)
        if self.v in ("folded", "folded-triton") and x.n == 1 and self.P > 1:
            # the shared stem: BN + ReLU on [B], then one product per member
            r, w = PASSES["loop"][self.bn]
            self.act_elems += (r + w - 2) * t + t + self.P * t
            return _Act(x.node_set, x.h, x.w, self.P)
        r, w = PASSES[self.v][self.bn]
        if self.v == "compact" and self.pad.get(node_set):
            r, w = r + 1, w + 1
        self.act_elems += (r + w) * t
        return x

    def conv(self, x, conv, in_set, out_set):
        y = self._conv_shape(x, conv, out_set, x.n)
        self.act_elems += self._t(x) + self._t(y)
        self._weights(conv, in_set, out_set)
        return y

    def dropout(self, x, p):
        return x

    def add(self, h, sc):
        if self.v == "compact-triton":  # conv2 reads the shortcut in its epilogue; its write was counted
            self.act_elems += self._t(sc)
        else:
            self.act_elems += 2 * self._t(h) + self._t(sc)  # read h and sc, write the sum (h's size)
        return h

    def head(self, x, fc, node_set):
        t = self._t(x)
        self.act_elems += 3 * t if self.v == "compact-triton" else t  # (apply the pending act,) then mean
        w = self.live[node_set] if self.v.startswith("compact") else self.dense[node_set]
        self.weight_elems += (1 if self.v in ("folded", "folded-triton") else self.P) * w * self.classes
        return x


def scoring_bytes(model, masks: Masks, batch: int, image_size, engine: str, *, bn: str = "batch",
                  kernels: bool = False, element_size: int = 4, pad_multiple: int = 1) -> dict:
    """Bytes moved to and from global memory by one scoring call of ``masks`` on ``batch`` images.

    ``engine``: loop, folded or compact; ``kernels``: the Triton variants (folded: the fused
    epilogue; compact: the fused pass, BN-ReLU-mask in the next conv's prologue, residual and
    statistics in conv2's epilogue). Activations are counted per op by :data:`PASSES` (the widths the
    engine runs: dense, or the compact engine's padded live widths); weights as each engine reads
    them (loop: every member reads the dense weights; folded: once; compact: the per-member gather
    reads, writes and the conv reads the gathered weights). Tiny tensors (BN vectors, statistics
    partials) are not counted; dtype conversions are not either. ``element_size``: bytes per element
    (2 for bf16). Returns ``{"activations", "weights", "total", "variant"}`` (bytes).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    variant = engine + ("-triton" if kernels and engine != "loop" else "")
    if variant not in PASSES:
        raise ValueError(f"unknown engine {engine!r}")
    dense = dict(model.node_layers())
    live = padded_live(masks, pad_multiple if engine == "compact" else 1)
    counts = masks.live_counts()
    pad = {k: bool((counts[k] < live[k]).any()) for k in live}
    width = live if engine == "compact" else dense
    be = _BytesBackend(variant, bn, width, live, dense, model.in_channels, batch, masks.population,
                       model.num_classes, pad)
    model.walk(be, _Act(None, h, w, 1))
    a, wt = be.act_elems * element_size, be.weight_elems * element_size
    return {"activations": int(a), "weights": int(wt), "total": int(a + wt), "variant": variant}


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
