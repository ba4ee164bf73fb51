"""Compact engine: each member runs only its live channels.

Activations are ``[B, P*K, H, W]`` (member-major channels, K channels per member and node set);
every convolution is a grouped convolution over per-member gathered weights
``[P, K_out, K_in, kh, kw]``, so its FLOPs fall by (1-eta)^2. BN over this layout is plain
per-channel BN: each (member, channel) gets its own statistics. Members with fewer live channels
than K (global sparsity, or K rounded up to a multiple of :data:`PAD_MULTIPLE` where the Triton
kernels run, so that every load is 16 bytes and every ``tl.dot`` tile full) are padded with
zero-masked channels.

Two paths, the same function:

* **eager** (PyTorch ops, or the Triton ops with autograd): ``act`` writes ``mask * relu(bn(x))``,
  convs read it (``ops.population_bn_act`` / ``ops.grouped_conv`` / ``ops.grouped_conv_bn_act``);
* **fused** (Triton kernels, no gradients: scoring): a node set's activation stays *pending*
  (the raw tensor, its batch moments, and the consumer's scale/shift with the mask folded in) and
  is applied in the next convolution's A-tile prologue; conv2 adds the residual and writes the
  statistics partials of the block output in its epilogue (``ops.fused_conv``). A block then moves
  about 5 activation-sized tensors instead of about 12 (``fastweedout.cost.bytes.scoring_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastweedout.model.backend import BaseBackend
from fastweedout.ops import dispatch as ops

#: live channels per member and node set are rounded up to this multiple where the kernels run
PAD_MULTIPLE = 16


def pad_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """The rounding of K the compact engine uses for tensors on this device and dtype."""
    return PAD_MULTIPLE if ops.kernels_active(torch.empty(0, device=device, dtype=dtype)) else 1


@dataclass
class _Raw:
    """A node set's tensor before its BN, with its batch moments ``[P*K]`` (None in running mode)."""

    t: Tensor
    mean: Tensor | None
    var: Tensor | None


@dataclass
class _Act:
    """A pending activation: ``relu(raw * scale + shift)`` (BN, ReLU and mask folded in)."""

    raw: Tensor
    scale: Tensor
    shift: Tensor


@dataclass
class _Conv:
    """A convolution not yet run: conv2 runs in ``add`` with the residual in its epilogue."""

    x: _Act
    w: Tensor
    stride: int
    padding: int


class CompactBackend(BaseBackend):
    def __init__(self, masks, bn_mode: str, device: torch.device, dtype: torch.dtype, *,
                 fused: bool | None = None, pad_to: int | None = None):
        self.bn_mode, self.dtype = bn_mode, dtype
        self.P = masks.population
        device = torch.device(device)
        kernels = ops.kernels_active(torch.empty(0, device=device, dtype=dtype))
        self.fused = (kernels and not torch.is_grad_enabled()) if fused is None else bool(fused)
        multiple = (PAD_MULTIPLE if kernels else 1) if pad_to is None else max(1, int(pad_to))
        # channels_last everywhere: cuDNN's NHWC convolutions and the kernels' 16-byte loads on a GPU,
        # oneDNN's grouped convolutions without a layout reorder on each call on a CPU
        self.channels_last = True
        self.idx: dict[str, Tensor] = {}  # name -> long [P, K] (padded with a live index)
        self.pad: dict[str, Tensor | None] = {}  # name -> float [P*K] zero on padding, or None
        for name, m in masks.items():
            m = m.to(device)
            counts = m.sum(1)
            k = -(-int(counts.max()) // multiple) * multiple
            # Live indices first (stable), padded by repeating the first live index.
            order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
            order = torch.cat([order, order[:, :1].expand(-1, max(0, k - order.shape[1]))], 1)[:, :k]
            valid = torch.arange(k, device=device)[None, :] < counts[:, None]
            self.idx[name] = torch.where(valid, order, order[:, :1])
            self.pad[name] = None if bool(valid.all()) else valid.flatten().to(dtype)

    # ------------------------------------------------------------------------------- shared
    def member_weight(self, conv, in_set, out_set) -> Tensor:
        """Per-member weights ``[P, K_out, K_in, kh, kw]`` in the layout the Triton conv loads fastest."""
        return ops.gather_conv_weight(conv.weight, self.idx[out_set], self.idx[in_set])

    def _bn_args(self, bn, node_set):
        i = self.idx[node_set].flatten()
        running = self.bn_mode == "running"
        pad = self.pad[node_set]
        return (bn.weight[i], bn.bias[i], None if pad is None else pad[None],
                bn.running_mean[i] if running else None, bn.running_var[i] if running else None, bn.eps)

    def stem(self, x, conv, node_set):
        y = conv(x)  # the dense stem, once: identical for every member
        i = self.idx[node_set].flatten()
        t = y.index_select(1, i)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        if not self.fused:
            return t
        if self.bn_mode == "running":
            return _Raw(t, None, None)
        dt = torch.float64 if y.dtype == torch.float64 else torch.float32
        var, mean = torch.var_mean(y.to(dt), dim=(0, 2, 3), correction=0)  # the same for every member
        return _Raw(t, mean[i], var[i])

    def act(self, x, bn, node_set):
        if not self.fused:
            return ops.population_bn_act(x, 1, *self._bn_args(bn, node_set))
        i = self.idx[node_set].flatten()
        if self.bn_mode == "running":
            mean, var = bn.running_mean[i], bn.running_var[i]
        else:
            mean, var = x.mean, x.var
        scale, shift = ops.scale_shift(mean, var, bn.weight[i], bn.bias[i], self.pad[node_set], bn.eps)
        return _Act(x.t, scale, shift)

    def conv(self, x, conv, in_set, out_set):
        w = self.member_weight(conv, in_set, out_set)
        if not self.fused:
            return ops.grouped_conv(x, w, conv.stride[0], conv.padding[0])
        return _Conv(x, w, conv.stride[0], conv.padding[0])

    def conv_act(self, x, conv, bn, in_set, out_set):
        w = self.member_weight(conv, in_set, out_set)
        if not self.fused:
            # One op: the running-mode epilogue is fused into the conv; batch mode takes the statistics
            # from partial moments the conv writes (kernels/grouped_conv.py).
            return ops.grouped_conv_bn_act(x, w, conv.stride[0], conv.padding[0], *self._bn_args(bn, out_set))
        y, mean, var = ops.fused_conv(x.raw, w, conv.stride[0], conv.padding[0], x.scale, x.shift,
                                      stats=self.bn_mode == "batch")
        return self.act(_Raw(y, mean, var), bn, out_set)

    def dropout(self, x, p):
        return x

    def _run(self, c: _Conv) -> Tensor:
        return ops.fused_conv(c.x.raw, c.w, c.stride, c.padding, c.x.scale, c.x.shift)[0]

    def add(self, h, sc):
        if not self.fused:
            return h + sc
        res = sc.t if isinstance(sc, _Raw) else self._run(sc)  # the shortcut projection runs first
        y, mean, var = ops.fused_conv(h.x.raw, h.w, h.stride, h.padding, h.x.scale, h.x.shift, residual=res,
                                      stats=self.bn_mode == "batch")
        return _Raw(y, mean, var)

    def head(self, x, fc, node_set):
        if self.fused:
            x = ops.affine_relu(x.raw, x.scale, x.shift)
        b = x.shape[0]
        feats = x.mean(dim=(2, 3)).view(b, self.P, -1)  # padding already zeroed by act
        w = fc.weight[:, self.idx[node_set]]  # [classes, P, K]
        return torch.einsum("bpk,cpk->pbc", feats.to(w.dtype), w) + fc.bias
