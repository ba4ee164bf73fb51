"""Engines that compute the logits of a weight-mask population (no validation, one chunk).

``loop`` (the reference): one forward per member through :func:`torch.func.functional_call`, with every
masked weight replaced by ``weight * mask``.

``grouped``: the members folded into the channel dimension, activations ``[B, P*C, H, W]``
(member-major channels). The stem reads the shared image with all members' masked stem weights
``[P*C, C_in, kh, kw]`` stacked (one ordinary convolution); every other convolution is a grouped
convolution (groups = P) over the per-member masked weights ``[P, C_out, C_in, kh, kw]``
(``ops.grouped_conv``: the compact node engine's op, here at full width); BN per (member, channel) is
plain per-channel BN in this layout (``ops.population_bn_act`` with one "member" and the BN
parameters repeated P times); the head is an einsum over the per-member masked linear weights.
It is a backend of :meth:`WideResNet.walk`, so it cannot drift from the network's definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastweedout.masks import Masks
from fastweedout.model.backend import BaseBackend
from fastweedout.model.wrn import WideResNet
from fastweedout.ops import dispatch as ops


def _weight_names(model: WideResNet) -> dict[int, str]:
    return {id(m): f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


class GroupedWeightBackend(BaseBackend):
    """The ``grouped`` engine (see the module docstring). masks: a weight-mask :class:`Masks` that fits
    ``model``; ``bn_mode``: ``batch`` or ``running``."""

    def __init__(self, model: WideResNet, masks: Masks, bn_mode: str, device: torch.device, dtype: torch.dtype):
        self.P, self.bn_mode = masks.population, bn_mode
        self.names = _weight_names(model)
        self.masks = {k: v.to(device) for k, v in masks.items()}  # name -> bool [P, numel]

    def member_weight(self, mod: nn.Module, packed: bool = False) -> Tensor:
        """``[P, *weight.shape]``: every member's masked copy of ``mod.weight`` (a masked weight is an
        exact zero, whatever its value). ``packed``: stored K_out-contiguous (memory order
        [kh, kw, P, C_in, C_out]), the layout the Triton grouped conv loads without repacking
        (``kernels.grouped_conv.pack_weight``)."""
        w = mod.weight
        m = self.masks[self.names[id(mod)]].view(self.P, *w.shape)
        if not packed or w.dim() != 4 or (torch.is_grad_enabled() and w.requires_grad):  # out= has no autograd
            return torch.where(m, w, 0.0)
        co, ci, kh, kw = w.shape
        out = torch.empty(kh, kw, self.P, ci, co, device=w.device, dtype=w.dtype).permute(2, 4, 3, 0, 1)
        return torch.where(m, w, w.new_zeros(()), out=out)

    def stem(self, x, conv, node_set):
        w = self.member_weight(conv)
        return F.conv2d(x, w.flatten(0, 1), stride=conv.stride, padding=conv.padding)

    def conv(self, x, conv, in_set, out_set):
        return ops.grouped_conv(x, self.member_weight(conv, x.is_cuda), conv.stride[0], conv.padding[0])

    def _bn_args(self, bn: nn.BatchNorm2d):
        running = self.bn_mode == "running"
        p = self.P
        return (bn.weight.repeat(p), bn.bias.repeat(p), None,
                bn.running_mean.repeat(p) if running else None, bn.running_var.repeat(p) if running else None, bn.eps)

    def act(self, x, bn, node_set):
        return ops.population_bn_act(x, 1, *self._bn_args(bn))

    def conv_act(self, x, conv, bn, in_set, out_set):
        w = self.member_weight(conv, x.is_cuda)
        return ops.grouped_conv_bn_act(x, w, conv.stride[0], conv.padding[0], *self._bn_args(bn))

    def dropout(self, x, p):
        return x  # scoring never draws dropout noise

    def add(self, h, sc):
        return h + sc

    def head(self, x, fc, node_set):
        b = x.shape[0]
        feats = x.mean(dim=(2, 3)).view(b, self.P, -1)
        w = self.member_weight(fc)  # [P, classes, C]
        return torch.einsum("bpc,pkc->pbk", feats, w.to(feats.dtype)) + fc.bias


def masked_parameters(model: WideResNet, member: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: weight where mask else 0}`` for one member (masks bool, any shape with the weight's numel)."""
    params = dict(model.named_parameters())
    return {k: torch.where(m.to(params[k].device).view(params[k].shape), params[k], 0.0) for k, m in member.items()}


__all__ = ["GroupedWeightBackend", "masked_parameters"]
