"""The mask space of unstructured (weight-level) sparsity: which weights can be masked, and masks over them.

A weight-level mask population is a :class:`fastweedout.masks.Masks` whose "node sets" are the weight
tensors of every convolution and of the linear layer, flattened: parameter name -> bool ``[P, numel]``.
So sampling (:func:`fastweedout.masks.sample_masks`: exactly round(eta*numel) weights off per tensor,
or round(eta*total) overall, at least one live weight per tensor), selection, concatenation, I/O and
the search's mutation work on them unchanged. BN parameters and the linear layer's bias are never masked.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastweedout.cost.flops import CONVENTION, train_step_flops, weight_live_flops
from fastweedout.masks import Masks, Sparsity, sample_masks
from fastweedout.model.masked import (
    WeightMaskedNet,
    check_weight_names,
    describe_mask,
    shaped_member,
    weight_sets,
    weight_shapes,
)
from fastweedout.model.wrn import WideResNet
from fastweedout.spaces.node import count_params
from fastweedout.spaces.space import MaskSpace


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
                raise ValueError(f"weight mask {name!r} must be a bool tensor [P, numel], got {describe_mask(m)}")
    else:
        raise ValueError(f"weight masks must be a Masks or a mapping name -> bool [P, numel], got "
                         f"{type(masks).__name__}")
    check_weight_names(sets, items)
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


class WeightSpace(MaskSpace):
    """Weight tensors (:func:`weight_sets`) -> bool ``[P, numel]``: unstructured sparsity. The trained
    network is the full one under the mask (:class:`WeightMaskedNet`: masked weights exact zeros)."""

    name = "weight"

    def sets(self, model: WideResNet) -> OrderedDict[str, int]:
        return weight_sets(model)

    def check(self, model: WideResNet, masks) -> Masks:
        return check_weight_masks(model, masks)

    def live(self, model: WideResNet, member: Masks, image_size) -> tuple[int, int]:
        shaped = member_weights(model, member, 0)
        off = sum(int((~v).sum()) for v in shaped.values())
        return weight_forward_flops(model, shaped, image_size), count_params(model) - off

    def trainable(self, model: WideResNet, member: dict[str, Tensor], masked: bool) -> tuple[nn.Module, nn.Module]:
        net = copy.deepcopy(model)
        return net, WeightMaskedNet(net, shaped_member(model, member))


def weight_forward_flops(model: WideResNet, member, image_size) -> int:
    """Useful forward FLOPs per image of one member's live weights (``member``: name -> bool tensor,
    shaped like the parameter or flat, or a weight-mask Masks of one member)."""
    live = {k: int(v.sum()) for k, v in shaped_member(model, member).items()}
    return weight_live_flops(model, live, image_size)[0]


def weight_training_flops(model: WideResNet, member, image_size) -> dict:
    """Useful and executed FLOPs per image of one training step of the full network under one member's
    weight mask: 3x the forward less the stem's grad-input (as ``train_step_flops``); useful: the live
    weights only; executed: the dense step (the masked weights are multiplied as zeros)."""
    live = {k: int(v.sum()) for k, v in shaped_member(model, member).items()}
    total, stem = weight_live_flops(model, live, image_size)
    return {"useful": int(3 * total - stem), "executed": int(train_step_flops(model, image_size)),
            "convention": CONVENTION}


__all__ = ["WeightSpace", "check_weight_masks", "member_weights", "sample_weight_masks", "weight_forward_flops",
           "weight_training_flops"]
