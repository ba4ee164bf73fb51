"""The mask space of unstructured (weight-level) sparsity: which weights can be masked, and masks over them.

A weight-level mask population is a :class:`fastweedout.masks.Masks` whose "node sets" are the weight
tensors of every convolution and of the linear layer, flattened: parameter name -> bool ``[P, numel]``.
So sampling (:func:`fastweedout.masks.sample_masks`: exactly round(eta*numel) weights off per tensor,
or round(eta*total) overall, at least one live weight per tensor), selection, concatenation, I/O and
the search's mutation work on them unchanged. BN parameters and the linear layer's bias are never masked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastweedout.masks import Masks, Sparsity, sample_masks
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


def _describe(m) -> str:
    return f"{m.dtype} {list(m.shape)}" if isinstance(m, Tensor) else type(m).__name__


def _check_names(sets: Mapping[str, int], names) -> None:
    names = list(names)
    unknown = [k for k in names if k not in sets]
    missing = [k for k in sets if k not in names]
    if unknown or missing:
        parts = ([f"unknown weight tensors {unknown}"] if unknown else []) + \
                ([f"missing weight tensors {missing}"] if missing else [])
        raise ValueError("weight masks do not fit the model: " + "; ".join(parts)
                         + f" (the model's maskable weights are {list(sets)})")


def check_weight_masks(model: WideResNet, masks) -> Masks:
    """Validate a weight-mask population (a :class:`Masks` or a mapping name -> bool ``[P, numel]``)
    against ``model`` and return it as a Masks in the model's order. ValueError naming the problem.

    A tensor whose weights are all masked is allowed (it computes zeros); sampling never produces one.
    """
    sets = weight_sets(model)
    if isinstance(masks, Masks):
        items = dict(masks.items())
    elif isinstance(masks, Mapping):
        items = dict(masks)
        for name, m in items.items():
            if not isinstance(m, Tensor) or m.dtype != torch.bool or m.dim() != 2:
                raise ValueError(f"weight mask {name!r} must be a bool tensor [P, numel], got {_describe(m)}")
    else:
        raise ValueError(f"weight masks must be a Masks or a mapping name -> bool [P, numel], got "
                         f"{type(masks).__name__}")
    _check_names(sets, items)
    for name, n in sets.items():
        if items[name].shape[1] != n:
            raise ValueError(f"weight mask {name!r} has {items[name].shape[1]} entries per member; the weight "
                             f"has {n} (masks are flattened weight tensors)")
    out = Masks(OrderedDict((k, items[k]) for k in sets))  # checks bool [P, n] and one population
    if isinstance(masks, Masks) and hasattr(masks, "meta"):
        out.meta = masks.meta
    return out


def sample_weight_masks(model: WideResNet, population: int, sparsity: Sparsity, mode: str = "layerwise",
                        generator: torch.Generator | int | None = None) -> Masks:
    """Random weight masks: ``layerwise`` (exactly round(eta*numel) weights off in every weight tensor;
    a per-tensor schedule ``{name: eta}`` works too) or ``global`` (round(eta*total) off, any split);
    at least one live weight per tensor. ``generator``: a CPU ``torch.Generator`` or a seed."""
    return sample_masks(weight_sets(model), population, sparsity, mode, generator)


def member_weights(model: WideResNet, masks, i: int) -> dict[str, Tensor]:
    """Member ``i`` of a weight-mask population: name -> bool tensor shaped like the parameter."""
    masks = check_weight_masks(model, masks)
    shapes = weight_shapes(model)
    return {k: v.reshape(shapes[k]) for k, v in masks.member(i).items()}


def shaped_member(model: WideResNet, member) -> dict[str, Tensor]:
    """One member's weight mask (a Masks of one member, or a mapping name -> bool tensor shaped like the
    parameter or flat ``[numel]``), validated: name -> bool tensor shaped like the parameter."""
    if isinstance(member, Masks):
        if member.population != 1:
            raise ValueError(f"one member's weight mask is needed; got a population of {member.population}")
        return member_weights(model, member, 0)
    if not isinstance(member, Mapping):
        raise ValueError(f"a member's weight mask must be a mapping name -> bool tensor, got {type(member).__name__}")
    shapes = weight_shapes(model)
    _check_names(shapes, member)
    out = {}
    for name, shape in shapes.items():
        m = member[name]
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise ValueError(f"weight mask {name!r} must be a bool tensor, got {_describe(m)}")
        if tuple(m.shape) not in (tuple(shape), (shape.numel(),)):
            raise ValueError(f"weight mask {name!r} must have the parameter's shape {list(shape)} "
                             f"(or [{shape.numel()}]), got {list(m.shape)}")
        out[name] = m.reshape(shape)
    return out


__all__ = ["check_weight_masks", "member_weights", "sample_weight_masks", "shaped_member", "weight_sets",
           "weight_shapes"]
