"""The seam between the one description of the network (:meth:`WideResNet.walk`) and whoever runs it.

``walk`` calls only the methods of :class:`Backend`, in this order per block::

    o  = act(x, bn1, in_set)                        # mask * relu(bn1(x)): the block's input
    sc = x  or  conv(o, shortcut, in_set, out_set)  # identity, or the 1x1 projection
    h  = conv_act(o, conv1, bn2, in_set, inner_set) # conv1 and the inner activation
    h  = dropout(h, p)
    h  = conv(h, conv2, inner_set, out_set)
    x  = add(h, sc)

with ``stem`` first and ``act`` + ``head`` last. The plain masked forward (:class:`MaskedBackend`,
the reference), the population engines (``fastweedout.engines``) and the FLOP counter
(``fastweedout.cost.flops``) are backends, so they cannot drift apart. ``x`` is whatever the backend
carries: a tensor, a member-folded tensor, or a shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

BN_MODES = ("batch", "running")


@runtime_checkable
class Backend(Protocol):
    """What :meth:`fastweedout.model.wrn.WideResNet.walk` asks of a backend."""

    def stem(self, x: Any, conv: nn.Conv2d, node_set: str) -> Any:
        """The stem convolution (the input image is the same for every member)."""

    def conv(self, x: Any, conv: nn.Conv2d, in_set: str, out_set: str) -> Any:
        """A convolution reading node set ``in_set`` and writing ``out_set``."""

    def conv_act(self, x: Any, conv: nn.Conv2d, bn: nn.BatchNorm2d, in_set: str, out_set: str) -> Any:
        """``act(conv(x))`` where the conv's only consumer is its node set's BN-ReLU-mask (fusable)."""

    def act(self, x: Any, bn: nn.BatchNorm2d, node_set: str) -> Any:
        """``mask * relu(bn(x))`` of a node set, as every consumer of that node set reads it."""

    def dropout(self, x: Any, p: float) -> Any:
        """Dropout of the inner activation (scoring never draws noise)."""

    def add(self, h: Any, sc: Any) -> Any:
        """The residual addition."""

    def head(self, x: Any, fc: nn.Linear, node_set: str) -> Any:
        """Global average pooling and the linear layer: the logits (never masked)."""


class BaseBackend:
    """Default ``conv_act`` (the conv, then the activation) for backends that do not fuse the two."""

    def conv_act(self, x, conv, bn, in_set, out_set):
        return self.act(self.conv(x, conv, in_set, out_set), bn, out_set)


class ShapeBackend(BaseBackend):
    """For backends that follow shapes only (FLOP counts, weight uses): activation, dropout and the
    residual add leave the shape as it is."""

    def act(self, x, bn, node_set):
        return x

    def dropout(self, x, p):
        return x

    def add(self, h, sc):
        return h


def batch_norm(x: Tensor, bn: nn.BatchNorm2d, mode: str | None) -> Tensor:
    """BN in a given mode without side effects for 'batch'/'running' (None: the module decides)."""
    if mode is None:
        return bn(x)
    if mode == "batch":
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class MaskedBackend(BaseBackend):
    """The reference: one network, ``mask * relu(bn(x))`` at every consumer of a node set.

    masks: node set -> float multiplier ``[C]`` (None: dense). bn_mode: None (the modules' own
    train/eval behaviour), ``"batch"`` or ``"running"``.
    """

    def __init__(self, masks: Mapping[str, Tensor] | None, bn_mode: str | None, training: bool):
        self.masks, self.bn_mode, self.training = masks, bn_mode, training

    def stem(self, x, conv, node_set):
        return conv(x)

    def conv(self, x, conv, in_set, out_set):
        return conv(x)

    def act(self, x, bn, node_set):
        y = F.relu(batch_norm(x, bn, self.bn_mode))
        if self.masks is not None:
            y = y * self.masks[node_set].view(1, -1, 1, 1)
        return y

    def dropout(self, x, p):
        # Scoring (an explicit BN mode) never draws dropout noise.
        return F.dropout(x, p, self.training and self.bn_mode is None) if p > 0 else x

    def add(self, h, sc):
        return h + sc

    def head(self, x, fc, node_set):
        return fc(x.mean(dim=(2, 3)))


__all__ = ["BN_MODES", "Backend", "BaseBackend", "MaskedBackend", "batch_norm"]
