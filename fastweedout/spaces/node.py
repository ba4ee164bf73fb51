"""The mask space of structured sparsity: node (channel) masks over the network's node sets."""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import Tensor, nn

from fastweedout.cost.flops import forward_flops
from fastweedout.masks import Masks
from fastweedout.model.masked import MaskedNet
from fastweedout.model.wrn import WideResNet
from fastweedout.spaces.space import MaskSpace


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class NodeSpace(MaskSpace):
    """Node sets (``model.node_layers()``: the stem, each stage's residual stream, each block's inner
    activation) -> bool ``[P, C]``; masking a node is deleting it (``model.prune``)."""

    name = "node"

    def sets(self, model: WideResNet) -> OrderedDict[str, int]:
        return model.node_layers()

    def check(self, model: WideResNet, masks) -> Masks:
        masks = masks if isinstance(masks, Masks) else Masks(dict(masks))
        masks.check(model.node_layers())
        return masks

    def live(self, model: WideResNet, member: Masks, image_size) -> tuple[int, int]:
        pruned = model.prune(member.member(0))
        return forward_flops(pruned, image_size), count_params(pruned)

    def trainable(self, model: WideResNet, member: dict[str, Tensor], masked: bool) -> tuple[nn.Module, nn.Module]:
        if masked:
            net = copy.deepcopy(model)
            return net, MaskedNet(net, member)
        net = model.prune(member)
        return net, net


__all__ = ["NodeSpace", "count_params"]
