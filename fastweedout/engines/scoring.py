"""Population scoring: fitness of every member of a mask population (node or weight masks) on one batch.

The engines are :mod:`fastweedout.engines.registry`'s entries; what they cost on this project's
machines is in ``bench/results/README.md`` (``python -m bench engines``, ``python -m bench gpu``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fastweedout.cost.flops import count_forward, padded_live
from fastweedout.engines.registry import AUTO, Engine, engine_names, get_engine, padding, resolve, scoring_flops
from fastweedout.masks import Masks
from fastweedout.model.backend import BN_MODES
from fastweedout.model.wrn import WideResNet
from fastweedout.spaces.weight import check_weight_masks, weight_sets
from fastweedout.world import World, gather_fitness, use_distributed

METRICS = ("loss", "accuracy")

# Activation memory per member and image, in elements, is about this many copies of the widest
# layer (stream, pre-activation, inner, shortcut, and the op's fp32 temporaries).
_LIVE_COPIES = 8
_CPU_BUDGET_BYTES = 2 << 30
# CPU: a chunk's widest activation tensor (chunk x B x widest channels x H x W) is kept within about
# the L2 caches of the threads that work on it: larger chunks allocate tensors above glibc's mmap
# threshold, zero-filled afresh on first touch, and oneDNN's grouped convolution is slower per FLOP
# than one plain convolution per member at these sizes (bench/results/README.md, "chunking").
_CPU_CHUNK_BYTES_PER_THREAD = 2 << 20
# GPU, members folded into the batch: images per chunk (members x B). One member's convolution over a
# few thousand images already fills the GPU; folding more only adds memory traffic
# (bench/results/NOTES.md, the H200 run).
_CUDA_FOLDED_IMAGES = 8192
# weight masks: members' masked weight copies (fp32 copy, bool mask, headroom) within this share of
# the free GPU memory, or this many bytes on a CPU
_CUDA_WEIGHT_SHARE = 0.3
_CPU_WEIGHT_BUDGET_BYTES = 1 << 30


def as_masks(masks) -> Masks:
    if isinstance(masks, Masks):
        return masks
    if isinstance(masks, Mapping):
        return Masks(dict(masks))
    raise ValueError(f"masks must be a Masks or a mapping name -> bool [P, C], got {type(masks).__name__}")


def check_batch(model: WideResNet, images: Tensor, labels: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor [B, C, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if images.shape[1] != model.in_channels:
        raise ValueError(f"images have {images.shape[1]} channels, the model takes {model.in_channels}")
    if images.shape[0] < 1:
        raise ValueError("empty batch: images hold zero examples")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised), got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images hold NaN or infinite values (bad input data, not bad members)")
    if not isinstance(labels, Tensor) or labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be a tensor [{images.shape[0]}], got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def auto_chunk(model: WideResNet, images: Tensor, engine: Engine | str, masks: Masks,
               budget_bytes: float | None = None, device: torch.device | None = None) -> int:
    """Members per chunk so that a chunk's activations (and the members' own weight copies, for an
    engine that holds them) fit ``budget_bytes`` (default: 60% of the GPU's free memory; on CPU, a
    chunk whose widest activation fits the threads' L2 caches, at least one member; see
    ``_CPU_CHUNK_BYTES_PER_THREAD``); on a GPU a chunk that folds members into the batch holds at most
    ``_CUDA_FOLDED_IMAGES`` images. ``engine``: an entry of the registry, or a node engine's name.
    ``device``: where the scoring runs (default: the images')."""
    if isinstance(engine, str):
        engine = get_engine("node", engine)
    b, _, h, w = images.shape
    device = device or images.device
    live = None
    if engine.activations == "padded-live":  # the widths it runs (padding decided by where the images are)
        live = padded_live(masks, padding(engine, images.device, images.dtype))
    c = count_forward(model, (h, w), live)
    widest = c.max_activation
    elem = max(4, images.element_size())
    per_member = _LIVE_COPIES * widest * b * elem
    if engine.weight_copies and engine.space == "node":
        # every member has its own copy of each conv's weights (gathered per call); the largest conv's,
        # and the next one's, are alive at once
        per_member += 2 * c.max_weight * images.element_size()
    if budget_bytes is not None:
        budget = budget_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.6 * free
    else:
        budget = _CPU_BUDGET_BYTES
        if engine.batched:  # cache-sized chunks (see _CPU_CHUNK_BYTES_PER_THREAD)
            tensor = widest * b * elem
            cache = _CPU_CHUNK_BYTES_PER_THREAD * torch.get_num_threads()
            budget = min(budget, per_member * max(1, cache // tensor))
    chunk = int(budget // per_member)
    if engine.full_width_fold and device.type == "cuda":
        chunk = min(chunk, _CUDA_FOLDED_IMAGES // b)
    if engine.weight_copies and engine.space == "weight":  # every member's masked copy of every weight
        copies = 2 * sum(weight_sets(model).values()) * elem
        if budget_bytes is not None:
            wbudget = budget_bytes
        elif device.type == "cuda":
            wbudget = _CUDA_WEIGHT_SHARE * torch.cuda.mem_get_info(device)[0]
        else:
            wbudget = _CPU_WEIGHT_BUDGET_BYTES
        chunk = min(chunk, int(wbudget // copies))
    return max(1, min(masks.population, chunk))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def member_losses(logits: Tensor, labels: Tensor, metric: str) -> Tensor:
    """logits [P, B, classes] -> fitness [P] (higher is better)."""
    if metric == "loss":
        p, b, c = logits.shape
        ce = F.cross_entropy(logits.float().reshape(p * b, c), labels.repeat(p), reduction="none")
        return -ce.view(p, b).mean(1)
    return (logits.argmax(-1) == labels[None]).float().mean(1)


@torch.no_grad()
def population_logits(model: WideResNet, masks: Masks, images: Tensor, engine: str, bn: str,
                      space: str = "node") -> Tensor:
    """Logits ``[P, B, classes]`` of every member (validated masks, one chunk; ``auto`` chosen here)."""
    return resolve(space, engine, masks, images.device).logits(model, masks, images, bn)


def over_member_chunks(masks: Masks, start: int, stop: int, chunk: int, device: torch.device, fn) -> tuple[list, int]:
    """``fn(part)`` for the members [start, stop) in parts of ``chunk``; on out-of-memory the chunk is
    halved and the part redone (never silently skipped). Returns the results and the last chunk size."""
    out = []
    while start < stop:
        part = masks.select(list(range(start, min(start + chunk, stop))))
        try:
            out.append(fn(part))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e) or chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"out of memory while scoring; retrying with chunks of {chunk} members",
                          RuntimeWarning, stacklevel=3)
            continue
        start += part.population
    return out, chunk


def gathered_fitness(parts: list, masks: Masks, labels: Tensor, sharded: bool) -> Tensor:
    """The chunks' fitness joined (all-gathered when sharded); NaN/inf becomes -inf with a warning, so
    a member whose forward blew up is never selected."""
    fitness = torch.cat(parts).float() if parts else torch.zeros(0)
    if sharded:
        fitness = gather_fitness(fitness, masks, labels)
    bad = ~torch.isfinite(fitness)
    if bool(bad.any()):
        warnings.warn(f"{int(bad.sum())} of {fitness.numel()} members have non-finite fitness; "
                      "they get -inf and are never selected", RuntimeWarning, stacklevel=3)
        fitness = torch.where(bad, torch.full_like(fitness, -math.inf), fitness)
    return fitness


def check_masks(space: str, model: WideResNet, masks) -> Masks:
    """A population of ``space`` masks validated against ``model`` (a Masks or a mapping)."""
    if space == "weight":
        return check_weight_masks(model, masks)
    masks = as_masks(masks)
    masks.check(model.node_layers())
    return masks


def _check_args(model, space: str, engine: str, metric: str, bn: str, chunk_size) -> None:
    if not isinstance(model, WideResNet):
        raise ValueError(f"model must be a fastweedout.WideResNet, got {type(model).__name__}")
    if engine not in engine_names(space):
        raise ValueError(f"{space} masks are scored by the engines {list(engine_names(space))}, got {engine!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _on_model(model: WideResNet, images: Tensor) -> Tensor:
    param = next(model.parameters())
    return images.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def score(model: WideResNet, masks, images: Tensor, labels: Tensor, *, space: str = "node", engine: str = AUTO,
          metric: str = "loss", bn: str = "batch", chunk_size: int | None = None, return_info: bool = False,
          distributed: bool | None = None):
    """Fitness ``[P]`` (float32, CPU; higher is better) of every member of a ``space`` ("node" or
    "weight") mask population on one batch: ``-loss`` (mean cross-entropy) or accuracy.

    engine: one of the space's engines (:mod:`fastweedout.engines.registry`) or ``auto``. bn: ``batch``
    (each member's own batch statistics) or ``running``. The population is scored in chunks of
    ``chunk_size`` members (None: what fits the device; never changes the fitness). The model is left
    exactly as it was; NaN/inf fitness becomes -inf with a warning. With ``return_info`` also returns
    ``{"engine", "chunk_size", "pad_multiple", "flops"}``: the engine that ran, the last chunk size, the
    padding of its widths, and this call's useful and executed FLOPs (:func:`scoring_flops`).
    distributed: under an initialised process group (None: auto; False: never) each rank scores its
    contiguous slice of the population and the fitness is all-gathered: every rank returns the full
    ``[P]``; every rank must make the same call (see :mod:`fastweedout.world`).
    """
    _check_args(model, space, engine, metric, bn, chunk_size)
    masks = check_masks(space, model, masks)
    check_batch(model, images, labels)
    images = _on_model(model, images)
    labels = labels.to(device=images.device, dtype=torch.long)
    e = resolve(space, engine, masks, images.device)  # picked on the whole population: the same on every rank
    chunk = chunk_size or auto_chunk(model, images, e, masks)
    sharded = use_distributed(distributed)
    start, stop = World.current().shard(masks.population) if sharded else (0, masks.population)
    out, chunk = over_member_chunks(
        masks, start, stop, chunk, images.device,
        lambda part: member_losses(e.logits(model, part, images, bn), labels, metric).cpu())
    fitness = gathered_fitness(out, masks, labels, sharded)
    if not return_info:
        return fitness
    pad = padding(e, images.device, images.dtype)
    flops = scoring_flops(model, masks, images.shape[0], tuple(images.shape[2:]), e.name, space=space,
                          pad_multiple=pad)
    return fitness, {"engine": e.name, "chunk_size": chunk, "pad_multiple": pad, "flops": flops}


@torch.no_grad()
def logits(model: WideResNet, masks, images: Tensor, *, space: str = "node", bn: str = "batch", engine: str = AUTO,
           chunk_size: int | None = None) -> Tensor:
    """Logits ``[P, B, classes]`` of every member (validated; no labels needed), chunked as :func:`score`."""
    _check_args(model, space, engine, "loss", bn, chunk_size)
    masks = check_masks(space, model, masks)
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != model.in_channels:
        raise ValueError(f"images must be a tensor [B, {model.in_channels}, H, W]")
    images = _on_model(model, images)
    e = resolve(space, engine, masks, images.device)
    out, _ = over_member_chunks(masks, 0, masks.population, chunk_size or auto_chunk(model, images, e, masks),
                                images.device, lambda part: e.logits(model, part, images, bn))
    return torch.cat(out)


def score_population(model: WideResNet, masks, images: Tensor, labels: Tensor, engine: str = AUTO,
                     metric: str = "loss", bn: str = "batch", chunk_size: int | None = None,
                     return_info: bool = False, distributed: bool | None = None):
    """Fitness ``[P]`` of a node-mask population (set -> bool ``[P, C]``): :func:`score` with
    ``space="node"``. engine: ``loop`` (reference: one masked forward per member), ``folded`` (members
    in the batch, shared weights), ``compact`` (live channels only) or ``auto``."""
    return score(model, masks, images, labels, space="node", engine=engine, metric=metric, bn=bn,
                 chunk_size=chunk_size, return_info=return_info, distributed=distributed)


def score_weight_population(model: WideResNet, masks, images: Tensor, labels: Tensor, *, metric: str = "loss",
                            bn: str = "batch", engine: str = AUTO, chunk_size: int | None = None,
                            return_info: bool = False, distributed: bool | None = None):
    """Fitness ``[P]`` of a weight-mask population (parameter name -> bool ``[P, numel]``, see
    :func:`fastweedout.spaces.weight.weight_sets`): :func:`score` with ``space="weight"``. engine:
    ``loop`` (reference: one forward per member with ``torch.where(mask, weight, 0)``), ``grouped``
    (members folded into the channels, grouped convolutions) or ``auto``."""
    return score(model, masks, images, labels, space="weight", engine=engine, metric=metric, bn=bn,
                 chunk_size=chunk_size, return_info=return_info, distributed=distributed)


__all__ = ["METRICS", "auto_chunk", "check_batch", "check_masks", "logits", "member_losses", "population_logits",
           "score", "score_population", "score_weight_population"]
