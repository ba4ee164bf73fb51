"""Compact engine: each member runs only its live channels.

Activations are ``[B, P*K, H, W]`` (member-major channels, K live channels per member and node
set); every convolution is a grouped convolution over per-member gathered weights
``[P, K_out, K_in, kh, kw]``, so its FLOPs fall by (1-eta)^2. BN over this layout is plain
per-channel BN: each (member, channel) gets its own statistics. Members with fewer live channels
(global sparsity) are padded to K with a zero mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..backend import BaseBackend


class CompactBackend(BaseBackend):
    def __init__(self, masks, bn_mode: str, device: torch.device, dtype: torch.dtype):
        self.bn_mode, self.dtype = bn_mode, dtype
        self.P = masks.population
        self.idx: dict[str, Tensor] = {}  # name -> long [P, K] (padded with a live index)
        self.pad: dict[str, Tensor | None] = {}  # name -> float [P*K] zero on padding, or None
        for name, m in masks.items():
            m = m.to(device)
            counts = m.sum(1)
            k = int(counts.max())
            # Live indices first (stable), padded by repeating the first live index.
            order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :k]
            valid = torch.arange(k, device=device)[None, :] < counts[:, None]
            self.idx[name] = torch.where(valid, order, order[:, :1])
            self.pad[name] = None if bool(valid.all()) else valid.flatten().to(dtype)

    def stem(self, x, conv, node_set):
        return conv(x).index_select(1, self.idx[node_set].flatten())

    def gather_weight(self, conv, in_set, out_set) -> Tensor:
        """Per-member weights ``[P, K_out, K_in, kh, kw]`` in the layout the Triton conv loads fastest."""
        return ops.gather_conv_weight(conv.weight, self.idx[out_set], self.idx[in_set])

    def conv(self, x, conv, in_set, out_set):
        w = self.gather_weight(conv, in_set, out_set)
        return ops.grouped_conv(x, w, conv.stride[0], conv.padding[0])

    def _bn_args(self, bn, node_set):
        i = self.idx[node_set].flatten()
        running = self.bn_mode == "running"
        pad = self.pad[node_set]
        return (bn.weight[i], bn.bias[i], None if pad is None else pad[None],
                bn.running_mean[i] if running else None, bn.running_var[i] if running else None, bn.eps)

    def act(self, x, bn, node_set):
        return ops.population_bn_act(x, 1, *self._bn_args(bn, node_set))

    def conv_act(self, x, conv, bn, in_set, out_set):
        # One op: the running-mode epilogue is fused into the conv; batch mode takes the statistics
        # from partial sums the conv writes (see kernels/grouped_conv.py).
        w = self.gather_weight(conv, in_set, out_set)
        return ops.grouped_conv_bn_act(x, w, conv.stride[0], conv.padding[0], *self._bn_args(bn, out_set))

    def dropout(self, x, p):
        return x

    def add(self, h, sc):
        return h + sc

    def head(self, x, fc, node_set):
        b = x.shape[0]
        feats = x.mean(dim=(2, 3)).view(b, self.P, -1)  # padding already zeroed by act
        w = fc.weight[:, self.idx[node_set]]  # [classes, P, K]
        return torch.einsum("bpk,cpk->pbc", feats, w) + fc.bias
