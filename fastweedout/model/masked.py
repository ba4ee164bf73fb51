"""Training under a fixed weight mask: :class:`WeightMaskedNet`."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fastweedout.model.wrn import WideResNet
from fastweedout.spaces.weight import shaped_member


class WeightMaskedNet(nn.Module):
    """A :class:`WideResNet` under ONE member's fixed weight mask, for training and evaluation.

    ``mask``: name -> bool tensor shaped like the parameter (or flat ``[numel]``), every maskable weight
    named (:func:`fastweedout.engines.weight_scoring.weight_sets`); a weight-mask :class:`Masks` of one
    member works too.
    At construction the masked weights of ``net`` are set to zero (in place: ``net`` is held, not
    copied). The forward computes with ``weight * mask`` (``torch.where(mask, weight, 0)``: a masked
    weight is an exact zero whatever its value; through :func:`torch.func.functional_call`,
    so no hooks, no parametrisation, ``net``'s ``state_dict`` keys unchanged, and ``torch.compile``
    traces it), so the gradient of every masked weight is exactly zero; with the weights themselves
    zero, SGD's weight decay and momentum add nothing either, and the masked weights stay exactly
    zero through training (SGD with momentum, Nesterov and weight decay; any optimiser whose update
    is zero for a zero weight with a zero gradient). ``parameters()`` are ``net``'s; the masks are
    float 0/1 buffers (``mask0``, ``mask1``, ...; they follow ``.to()``).
    """

    def __init__(self, net: WideResNet, mask: Mapping[str, Tensor]):
        super().__init__()
        if not isinstance(net, WideResNet):
            raise ValueError(f"net must be a fastweedout.WideResNet, got {type(net).__name__}")
        shaped = shaped_member(net, mask)
        self.net = net
        self._names = list(shaped)
        params = dict(net.named_parameters())
        for i, (name, m) in enumerate(shaped.items()):
            p = params[name]
            self.register_buffer(f"mask{i}", m.to(device=p.device, dtype=p.dtype))
        self.apply_mask()

    def masks(self) -> dict[str, Tensor]:
        """Parameter name -> float 0/1 mask shaped like the parameter."""
        return {k: getattr(self, f"mask{i}") for i, k in enumerate(self._names)}

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the masked weights of ``net`` in place (done at construction; training keeps them zero)."""
        params = dict(self.net.named_parameters())
        for k, m in self.masks().items():
            params[k].masked_fill_(m == 0, 0.0)

    def masked_parameters(self) -> dict[str, Tensor]:
        params = dict(self.net.named_parameters())
        return {k: torch.where(m != 0, params[k], 0.0) for k, m in self.masks().items()}

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``net(x, ...)`` with every masked weight replaced by zero."""
        return functional_call(self.net, self.masked_parameters(), (x, *args), kwargs)

    @torch.no_grad()
    def export(self) -> WideResNet:
        """A plain :class:`WideResNet` copy holding the masked (zeroed) weights (same function)."""
        out = copy.deepcopy(self.net)
        params = dict(out.named_parameters())
        for k, m in self.masks().items():
            params[k].masked_fill_(m == 0, 0.0)
        return out


__all__ = ["WeightMaskedNet"]
