"""Every population-scoring engine, by mask space and name: how it computes a chunk's logits, how much
activation memory a member takes, whether it pads its widths, and what it executes.

Adding an engine is one entry here (and its backend in a file of its own); the config's choices, the
CLI's, the scoring's validation, the FLOP accounting and the chunking all read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from fastweedout.cost.flops import CONVENTION, count_forward, padded_live, useful_flops, weight_live_flops
from fastweedout.engines.compact import CompactBackend, pad_multiple
from fastweedout.engines.folded import FoldedBackend
from fastweedout.engines.grouped_weights import GroupedWeightBackend, masked_parameters
from fastweedout.masks import Masks
from fastweedout.model.wrn import WideResNet
from fastweedout.spaces.weight import check_weight_masks

AUTO = "auto"


@dataclass(frozen=True)
class Engine:
    name: str
    space: str  # the mask space it scores: "node" or "weight"
    #: (model, validated masks of one chunk, images, bn mode) -> logits [P, B, classes]
    logits: Callable[[WideResNet, Masks, Tensor, str], Tensor]
    #: (model, masks, image size, padding) -> forward FLOPs per image the engine executes for the population
    executed: Callable[[WideResNet, Masks, tuple, int], int]
    #: activation memory per member: "dense" (one full network per member), "padded-live" (the widths it runs)
    activations: str = "dense"
    pads: bool = False  # rounds each member's live widths up to PAD_MULTIPLE where the kernels run
    weight_copies: bool = False  # holds every member's own copy of each conv weight while it runs
    shares_stem: bool = False  # the stem runs once for all members (shared input, shared weights)
    batched: bool = True  # runs many members per pass (False: one member at a time)
    full_width_fold: bool = False  # folds members at full width into one tensor (images capped per pass on a GPU)


# ----------------------------------------------------------------------------------------- node masks
def _node_loop(model, masks, images, bn):
    return torch.stack([model(images, masks.member(i), bn=bn) for i in range(masks.population)])


def _node_folded(model, masks, images, bn):
    fm = {k: v.to(device=images.device, dtype=images.dtype) for k, v in masks.items()}
    return model.walk(FoldedBackend(fm, bn, masks.population, images.shape[0]), images)


def _node_compact(model, masks, images, bn):
    return model.walk(CompactBackend(masks, bn, images.device, images.dtype), images)


def _dense_per_member(model, masks, size, pad):
    return masks.population * count_forward(model, size).total


def _folded_executed(model, masks, size, pad):
    dense = count_forward(model, size)
    return masks.population * (dense.total - dense.stem) + dense.stem


def _compact_executed(model, masks, size, pad):  # stem once (dense), the rest at the padded live width
    c, dense = count_forward(model, size, padded_live(masks, pad)), count_forward(model, size)
    return masks.population * (c.total - c.stem) + dense.stem


# --------------------------------------------------------------------------------------- weight masks
def _weight_loop(model, masks, images, bn):
    return torch.stack([functional_call(model, masked_parameters(model, masks.member(i)), (images,), {"bn": bn})
                        for i in range(masks.population)])


def _weight_grouped(model, masks, images, bn):
    return model.walk(GroupedWeightBackend(model, masks, bn, images.device, images.dtype), images)


ENGINES: dict[str, dict[str, Engine]] = {
    "node": {
        "loop": Engine("loop", "node", _node_loop, _dense_per_member, batched=False),
        "folded": Engine("folded", "node", _node_folded, _folded_executed, shares_stem=True, full_width_fold=True),
        "compact": Engine("compact", "node", _node_compact, _compact_executed, activations="padded-live", pads=True,
                          weight_copies=True, shares_stem=True),
    },
    "weight": {
        "loop": Engine("loop", "weight", _weight_loop, _dense_per_member, batched=False),
        # the stem cannot be shared: its weights differ per member
        "grouped": Engine("grouped", "weight", _weight_grouped, _dense_per_member, weight_copies=True,
                          full_width_fold=True),
    },
}


def engine_names(space: str, auto: bool = True) -> tuple[str, ...]:
    """The engines of a mask space (with ``auto`` first unless ``auto=False``)."""
    return ((AUTO,) if auto else ()) + tuple(_space(space))


def all_engine_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for s in ENGINES for n in engine_names(s)))


def _space(space: str) -> dict[str, Engine]:
    if space not in ENGINES:
        raise ValueError(f"mask space must be one of {list(ENGINES)}, got {space!r}")
    return ENGINES[space]


def get_engine(space: str, name: str) -> Engine:
    engines = _space(space)
    if name not in engines:
        raise ValueError(f"{space} masks are scored by the engines {list(engine_names(space))}, got {name!r}")
    return engines[name]


def choose_engine(space: str, masks: Masks, device: torch.device) -> str:
    """What ``auto`` runs (measured: ``python -m bench engines`` on CPU, ``python -m bench gpu``)."""
    device = torch.device(device)
    if space == "weight":  # one launch per layer instead of P on a GPU; on a CPU P plain forwards are faster
        return "grouped" if device.type == "cuda" else "loop"
    # on a GPU dense masks fold (cuDNN's plain convolutions beat grouped ones there); on a CPU the compact
    # engine's channels_last grouped convolutions beat folding even with every channel live
    if device.type != "cuda":
        return "compact"
    return "compact" if masks.sparsity() >= 0.2 else "folded"


def resolve(space: str, name: str, masks: Masks, device: torch.device) -> Engine:
    """The engine that runs for ``name`` (``auto`` chosen here), validated."""
    return get_engine(space, choose_engine(space, masks, device) if name == AUTO else name)


def padding(engine: Engine, device: torch.device, dtype: torch.dtype) -> int:
    """The rounding of each member's live widths the engine uses on this device and dtype."""
    return pad_multiple(torch.device(device), dtype) if engine.pads else 1


def useful_scoring_flops(space: str, model: WideResNet, masks: Masks, image_size) -> int:
    """Forward FLOPs per image of every member's live sub-network, summed over the population."""
    if space == "weight":
        return weight_live_flops(model, {k: int(v.sum()) for k, v in masks.items()}, image_size)[0]
    return useful_flops(model, masks, image_size)


def scoring_flops(model: WideResNet, masks: Masks, batch: int, image_size, engine: str, *, space: str = "node",
                  device: torch.device | None = None, dtype: torch.dtype | None = None,
                  pad_multiple: int | None = None) -> dict:
    """Useful and executed FLOPs of scoring ``masks`` on ``batch`` images with ``engine`` (the one that
    ran, not ``auto``), at the padding the engine uses on ``device``/``dtype`` (default: the model's
    parameters'; ``pad_multiple`` overrides it)."""
    if engine == AUTO:
        raise ValueError("scoring_flops needs the engine that ran, not 'auto' (score_population's info says which)")
    e = get_engine(space, engine)
    if space == "weight":
        masks = check_weight_masks(model, masks)
    if pad_multiple is None:
        p = next(model.parameters())
        pad_multiple = padding(e, device if device is not None else p.device, dtype if dtype is not None else p.dtype)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return {"useful": int(batch * useful_scoring_flops(space, model, masks, size)),
            "executed": int(batch * e.executed(model, masks, size, pad_multiple)), "convention": CONVENTION}


__all__ = ["AUTO", "ENGINES", "Engine", "all_engine_names", "choose_engine", "engine_names", "get_engine", "padding",
           "resolve", "scoring_flops", "useful_scoring_flops"]
