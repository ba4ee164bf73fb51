"""The network that is actually trained for a mask: the physically pruned network (the default), the
full network under its node mask (:class:`MaskedNet`, same function), the full network under a
weight mask, or the dense network; with its FLOPs and live parameter count."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastweedout.cost.flops import forward_flops, train_step_flops
from fastweedout.engines import weight_scoring as W
from fastweedout.model.backend import MaskedBackend
from fastweedout.model.wrn import WideResNet


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


def member_mask(mask) -> dict[str, Tensor] | None:
    """One member's mask as CPU bool tensors (a Masks of one member or a mapping); None stays None."""
    if mask is None:
        return None
    if hasattr(mask, "population") and hasattr(mask, "member"):
        if mask.population != 1:
            raise ValueError(f"train takes one member's mask; got a population of {mask.population}")
        mask = mask.member(0)
    return {k: v.detach().to("cpu", torch.bool) for k, v in mask.items()}


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def prepare_network(model: WideResNet, mask, masked: bool, device: torch.device, channels_last: bool,
                    image_size, granularity: str = "node") -> tuple:
    """The network actually trained, a copy (the caller's model stays as it was): the pruned network,
    the full one under its mask (``masked``, or any weight-level mask), or the dense one. Returns
    ``(net, run_net, forward FLOPs, train-step FLOPs, live forward FLOPs, live parameters)``, FLOPs per
    image; ``run_net`` is what the forward calls (``net`` itself unless masked)."""
    if granularity == "weight" and mask is not None:
        params = dict(model.named_parameters())
        shaped = {k: v.reshape(params[k].shape) for k, v in mask.items()}
        net = copy.deepcopy(model)
        run_net = W.WeightMaskedNet(net, shaped)
        net.train()
        run_net.to(device)
        if channels_last:
            run_net.to(memory_format=torch.channels_last)
        fl = W.weight_training_flops(model, shaped, image_size)
        full = train_step_flops(net, image_size)
        live_params = count_params(net) - sum(int((~v).sum()) for v in shaped.values())
        return net, run_net, forward_flops(net, image_size), full, fl["useful"] // 3, live_params
    if mask is None:
        net = copy.deepcopy(model)
        live = run_net = net
    elif masked:
        net = copy.deepcopy(model)
        run_net = MaskedNet(net, mask)
        live = model.prune(mask)
    else:
        net = model.prune(mask)
        live = run_net = net
    net.train()
    run_net.to(device)
    if channels_last:
        run_net.to(memory_format=torch.channels_last)
    return (net, run_net, forward_flops(net, image_size), train_step_flops(net, image_size),
            forward_flops(live, image_size), count_params(live))


__all__ = ["MaskedNet", "count_params", "member_mask", "prepare_network"]
