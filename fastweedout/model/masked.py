"""The network under one member's fixed mask, for training and evaluation: :class:`MaskedNet` (node
masks, the full network with its masked channels deleted in the forward) and :class:`WeightMaskedNet`
(weight masks); and which weights a weight mask covers (:func:`weight_sets`)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fastweedout.masks import Masks
from fastweedout.model.backend import MaskedBackend
from fastweedout.model.wrn import WideResNet


def weight_sets(model: WideResNet) -> OrderedDict[str, int]:
    """Maskable weight tensors, in ``model.named_parameters()`` order: parameter name -> numel
    (``stem.weight``, every block's ``conv1``/``conv2``/``shortcut`` weight, ``fc.weight``)."""
    if not isinstance(model, WideResNet):
        raise ValueError(f"model must be a fastweedout.WideResNet, got {type(model).__name__}")
    kinds = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return OrderedDict((n, p.numel()) for n, p in model.named_parameters() if n in kinds)


def weight_shapes(model: WideResNet) -> OrderedDict[str, torch.Size]:
    """Maskable weight tensors: parameter name -> shape (same order as :func:`weight_sets`)."""
    params = dict(model.named_parameters())
    return OrderedDict((n, params[n].shape) for n in weight_sets(model))


def describe_mask(m) -> str:
    return f"{m.dtype} {list(m.shape)}" if isinstance(m, Tensor) else type(m).__name__


def check_weight_names(sets: Mapping[str, int], names) -> None:
    names = list(names)
    unknown = [k for k in names if k not in sets]
    missing = [k for k in sets if k not in names]
    if unknown or missing:
        parts = ([f"unknown weight tensors {unknown}"] if unknown else []) + \
                ([f"missing weight tensors {missing}"] if missing else [])
        raise ValueError("weight masks do not fit the model: " + "; ".join(parts)
                         + f" (the model's maskable weights are {list(sets)})")


def shaped_member(model: WideResNet, member) -> dict[str, Tensor]:
    """One member's weight mask (a Masks of one member, or a mapping name -> bool tensor shaped like the
    parameter or flat ``[numel]``), validated: name -> bool tensor shaped like the parameter."""
    if isinstance(member, Masks):
        if member.population != 1:
            raise ValueError(f"one member's weight mask is needed; got a population of {member.population}")
        member = member.member(0)
    if not isinstance(member, Mapping):
        raise ValueError(f"a member's weight mask must be a mapping name -> bool tensor, got {type(member).__name__}")
    shapes = weight_shapes(model)
    check_weight_names(shapes, member)
    out = {}
    for name, shape in shapes.items():
        m = member[name]
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise ValueError(f"weight mask {name!r} must be a bool tensor, got {describe_mask(m)}")
        if tuple(m.shape) not in (tuple(shape), (shape.numel(),)):
            raise ValueError(f"weight mask {name!r} must have the parameter's shape {list(shape)} "
                             f"(or [{shape.numel()}]), got {list(m.shape)}")
        out[name] = m.reshape(shape)
    return out


class MaskedNet(nn.Module):
    """The full network under a node mask held in buffers (validated once; ``set_masks`` swaps it)."""

    def __init__(self, net: WideResNet, mask: Mapping[str, Tensor]):
        super().__init__()
        self.net = net
        fm = net.check_member_masks(mask)
        for i, v in enumerate(fm.values()):
            self.register_buffer(f"mask{i}", v)
        self._names = list(fm)

    def masks(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"mask{i}") for i, k in enumerate(self._names)}

    @torch.no_grad()
    def set_masks(self, mask: Mapping[str, Tensor]) -> None:
        fm = self.net.check_member_masks(mask)
        for i, k in enumerate(self._names):
            getattr(self, f"mask{i}").copy_(fm[k])

    def forward(self, x: Tensor) -> Tensor:
        return self.net.walk(MaskedBackend(self.masks(), None, self.training), x)


class WeightMaskedNet(nn.Module):
    """A :class:`WideResNet` under ONE member's fixed weight mask, for training and evaluation.

    ``mask``: name -> bool tensor shaped like the parameter (or flat ``[numel]``), every maskable weight
    named (:func:`weight_sets`); a weight-mask :class:`Masks` of one
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


__all__ = ["MaskedNet", "WeightMaskedNet", "check_weight_names", "describe_mask", "shaped_member", "weight_sets",
           "weight_shapes"]
