"""What a search runs over: a mask space (node masks or weight masks) and the one interface that every
stage of a run asks of it, so that no stage switches on the granularity itself."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict

import torch
from torch import Tensor, nn

from fastweedout.masks import Masks, Sparsity, sample_masks
from fastweedout.model.wrn import WideResNet


class MaskSpace(ABC):
    """The sets a mask covers, how masks are drawn and checked, what one member's network costs and
    which network is trained for it. Subclasses: :class:`fastweedout.spaces.node.NodeSpace` and
    :class:`fastweedout.spaces.weight.WeightSpace`; scoring is ``fastweedout.engines.scoring.score``
    with ``space=<name>``."""

    name: str = ""

    @abstractmethod
    def sets(self, model: WideResNet) -> OrderedDict[str, int]:
        """Set name -> entries per member (nodes of a node set, weights of a weight tensor)."""

    @abstractmethod
    def check(self, model: WideResNet, masks) -> Masks:
        """The population validated against ``model`` (ValueError naming the problem)."""

    def sample(self, model: WideResNet, population: int, sparsity: Sparsity, mode: str = "layerwise",
               generator: torch.Generator | int | None = None) -> Masks:
        return sample_masks(self.sets(model), population, sparsity, mode, generator)

    @abstractmethod
    def live(self, model: WideResNet, member: Masks, image_size) -> tuple[int, int]:
        """(forward FLOPs per image, parameters) of one member's live network."""

    @abstractmethod
    def trainable(self, model: WideResNet, member: dict[str, Tensor], masked: bool) -> tuple[nn.Module, nn.Module]:
        """(the network whose parameters are trained, the module the forward calls) for one member's mask
        (name -> bool), built from a copy of ``model``; ``masked``: the full network under the mask
        rather than the physically smaller one, where the space has one."""


__all__ = ["MaskSpace"]
