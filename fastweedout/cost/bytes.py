"""Bytes moved by one scoring call: the global-memory traffic of activations and weights as each
engine's ops issue them (see :data:`PASSES`), by walking the network with shapes."""

from __future__ import annotations

from dataclasses import dataclass

from fastweedout.cost.flops import padded_live
from fastweedout.masks import Masks
from fastweedout.model.backend import BaseBackend

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
