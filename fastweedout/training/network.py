"""The network that is actually trained for a mask: the physically pruned network (the default), the
full network under its node mask (:class:`MaskedNet`, same function), the full network under a
weight mask, or the dense network; with its FLOPs and live parameter count."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from fastweedout.cost.flops import forward_flops, train_step_flops
from fastweedout.masks import Masks
from fastweedout.model.wrn import WideResNet
from fastweedout.spaces.node import count_params
from fastweedout.spaces.registry import get_space


def member_mask(mask) -> dict[str, Tensor] | None:
    """One member's mask as CPU bool tensors (a Masks of one member or a mapping); None stays None."""
    if mask is None:
        return None
    if hasattr(mask, "population") and hasattr(mask, "member"):
        if mask.population != 1:
            raise ValueError(f"train takes one member's mask; got a population of {mask.population}")
        mask = mask.member(0)
    return {k: v.detach().to("cpu", torch.bool) for k, v in mask.items()}


def prepare_network(model: WideResNet, mask, masked: bool, device: torch.device, channels_last: bool,
                    image_size, granularity: str = "node") -> tuple:
    """The network actually trained, a copy (the caller's model stays as it was): the space's network
    for the mask (node masks: the pruned network, or the full one under its mask with ``masked``;
    weight masks: the full network under its mask), or the dense one. Returns ``(net, run_net, forward
    FLOPs, train-step FLOPs, live forward FLOPs, live parameters)``, FLOPs per image; ``run_net`` is
    what the forward calls (``net`` itself unless masked)."""
    if mask is None:
        net = run_net = copy.deepcopy(model)
        live = (forward_flops(net, image_size), count_params(net))
    else:
        space = get_space(granularity)
        net, run_net = space.trainable(model, mask, masked)
        live = space.live(model, Masks({k: v[None] for k, v in mask.items()}), image_size)
    net.train()
    run_net.to(device)
    if channels_last:
        run_net.to(memory_format=torch.channels_last)
    return (net, run_net, forward_flops(net, image_size), train_step_flops(net, image_size), *live)


__all__ = ["member_mask", "prepare_network"]
