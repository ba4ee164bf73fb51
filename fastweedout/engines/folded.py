"""Folded engine: P members in the batch dimension ``[P*B, C, H, W]``, sharing the weights.

The stem (and its BN-ReLU, whose statistics are the same for every member) runs once on ``[B]``;
per-member BN statistics, ReLU and mask are one fused op (``ops.population_bn_act``). The
activations are channels_last from the stem on (cuDNN's NHWC convolutions and the kernels' 16-byte
accesses on a GPU, oneDNN's convolutions without a reorder per call on a CPU): the same layout as the
compact engine, so the comparison between them is fair.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastweedout.model.backend import BaseBackend, batch_norm
from fastweedout.ops import dispatch as ops


class FoldedBackend(BaseBackend):
    def __init__(self, masks: dict[str, Tensor], bn_mode: str, members: int, batch: int,
                 channels_last: bool = True):
        self.masks = masks  # name -> float [P, C]
        self.bn_mode, self.P, self.B = bn_mode, members, batch
        self.channels_last = channels_last

    def _shared(self, x: Tensor) -> bool:
        return self.P > 1 and x.shape[0] == self.B

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def stem(self, x, conv, node_set):
        return self._layout(conv(x))  # [B, C, H, W], identical for all members

    def conv(self, x, conv, in_set, out_set):
        return conv(x)

    def act(self, x, bn, node_set):
        m = self.masks[node_set]
        if self._shared(x):
            y = torch.relu(batch_norm(x, bn, self.bn_mode))
            return self._layout((y.unsqueeze(0) * m.to(y.dtype)[:, None, :, None, None]).flatten(0, 1))
        running = self.bn_mode == "running"
        return ops.population_bn_act(x, self.P, bn.weight, bn.bias, m,
                                     bn.running_mean if running else None,
                                     bn.running_var if running else None, bn.eps)

    def dropout(self, x, p):
        return x

    def add(self, h, sc):
        if h.shape[0] != sc.shape[0]:  # shared stem stream + per-member branch
            return self._layout((h.unflatten(0, (self.P, self.B)) + sc.unsqueeze(0)).flatten(0, 1))
        return h + sc

    def head(self, x, fc, node_set):
        return fc(x.mean(dim=(2, 3))).unflatten(0, (self.P, self.B))
