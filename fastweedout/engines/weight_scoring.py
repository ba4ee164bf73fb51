"""Unstructured (weight-level) sparsity: masks over the individual weights of every convolution and of the
linear layer, sampled, scored, counted and trained with the same machinery as node masks.

**The mask space.** A weight-mask population is a :class:`fastweedout.masks.Masks` whose entries are
the maskable weight tensors, flattened: parameter name -> bool ``[P, numel]``
(:func:`weight_sets`: ``stem.weight``, every block's ``conv1``/``conv2``/``shortcut`` weight and
``fc.weight``; BN parameters and the linear bias are never masked). ``sample_masks`` over these sets
gives exactly round(eta*numel) weights off per tensor (``layerwise``) or round(eta*total) overall
(``global``), at least one live weight per tensor; selection, concatenation, save/load and the search's
mutation (which swaps off/on entries within a row) work unchanged.

**Scoring** (:func:`score_weight_population`): the semantics of
:func:`fastweedout.engines.scoring.score_population` — fitness ``[P]`` (float32, CPU, higher is better: -mean
cross-entropy or accuracy), BN ``batch`` (each member's own batch statistics) or ``running``, the
model left exactly as it was, non-finite fitness -> -inf with a warning, chunking never changes the
fitness — with a masked weight standing for a deleted connection: member i computes the network
with ``torch.where(mask_i, weight, 0)`` (a masked weight is an exact zero, whatever its value). Engines:

* ``loop`` (the reference): one forward per member through :func:`torch.func.functional_call` with the
  masked weights. Cost per member: one dense forward (unstructured sparsity is not exploited by dense
  kernels), plus building its masked weights (one elementwise pass over the maskable parameters).
* ``grouped``: members folded into the channel dimension, ``[B, P*C, H, W]``; every convolution is one
  grouped convolution (groups = P) over the per-member masked weights ``[P*C_out, C_in, kh, kw]``, BN
  per (member, channel) is plain per-channel BN in that layout, the head an einsum (see
  :mod:`fastweedout.engines.grouped_weights`). One launch per layer for the whole chunk instead of P; the same
  dense FLOPs as ``loop`` (the stem cannot be shared: its weights differ per member), and P masked
  copies of every weight in memory (4 bytes per weight and member in fp32, plus its 1-byte mask).
* ``auto``: ``grouped`` on a GPU (one launch per layer instead of P; not yet measured there), ``loop`` on
  a CPU. Measured on the 2-core development CPU (shared with other jobs, torch 2.14, fp32, 1 thread,
  WRN-10-1, P=10, 64 images 1x28x28, eta=0.5, 12.0 GFLOP executed per call, median of 9 interleaved
  repeats): loop 0.39 s, as fast as P unmasked dense forwards (0.37 s: masking the weights costs little);
  grouped 0.40 s with cache-sized chunks (1 member per pass here), 0.53 s with 5 and 0.59 s with all 10
  members in one pass: oneDNN's grouped convolution is slower per FLOP than P plain ones at these sizes.
  For comparison, node masks at the same eta: loop 0.40 s, folded 0.39 s, compact 0.19 s (structured
  sparsity halves the work; unstructured sparsity does not reduce the work of dense kernels at all).

FLOPs (:func:`weight_scoring_flops`, FlopCounterMode's convention, 1 multiply-add = 2 FLOPs, conv and
linear only): *useful* = the live weights' FLOPs (a live conv weight costs 2*H_out*W_out per image, a
live linear weight 2); *executed* = P dense forwards per image for both engines.

**Training** (:class:`WeightMaskedNet`): the full network under one member's fixed mask, masked weights
zeroed at construction and held at exactly zero (their gradients are zero); :func:`weight_training_flops`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastweedout.config import METRICS
from fastweedout.cost.flops import CONVENTION, count_forward, train_step_flops
from fastweedout.engines.grouped_weights import (
    WEIGHT_ENGINES,
    GroupedWeightBackend,
    weight_population_logits,
    weight_uses,
)
from fastweedout.engines.scoring import (
    auto_chunk,
    check_batch,
    gathered_fitness,
    member_losses,
    over_member_chunks,
)
from fastweedout.masks import Masks
from fastweedout.model.backend import BN_MODES
from fastweedout.model.masked import WeightMaskedNet
from fastweedout.model.wrn import WideResNet
from fastweedout.spaces.weight import (
    check_weight_masks,
    member_weights,
    sample_weight_masks,
    shaped_member,
    weight_sets,
    weight_shapes,
)
from fastweedout.world import World, use_distributed

_CPU_WEIGHT_BUDGET_BYTES = 1 << 30


def auto_weight_engine(device: torch.device) -> str:
    """The faster weight-mask engine on ``device`` (see the module docstring for the measurement)."""
    return "grouped" if torch.device(device).type == "cuda" else "loop"


def weight_chunk(model: WideResNet, images: Tensor, engine: str, masks: Masks,
                 budget_bytes: float | None = None) -> int:
    """Members per chunk: the activation rule of :func:`fastweedout.engines.scoring.auto_chunk` (the folded
    engine's for ``grouped``: same dense widths, members in one tensor), and for ``grouped`` at most what
    fits the members' masked weight copies (budgeted at 8 bytes per weight and member: the fp32 copy,
    its bool mask and headroom) in the budget (default: 30% of the free GPU memory, 1 GiB on a CPU)."""
    chunk = auto_chunk(model, images, "folded" if engine == "grouped" else "loop", masks, budget_bytes)
    if engine != "grouped":
        return chunk
    per_member = 2 * sum(weight_sets(model).values()) * max(4, images.element_size())
    if budget_bytes is not None:
        budget = budget_bytes
    elif images.device.type == "cuda":
        budget = 0.3 * torch.cuda.mem_get_info(images.device)[0]
    else:
        budget = _CPU_WEIGHT_BUDGET_BYTES
    return max(1, min(chunk, int(budget // per_member)))


def _check_args(model, engine: str, bn: str, chunk_size) -> None:
    if not isinstance(model, WideResNet):
        raise ValueError(f"model must be a fastweedout.WideResNet, got {type(model).__name__}")
    if engine not in WEIGHT_ENGINES:
        raise ValueError(f"weight masks are scored by the engines {WEIGHT_ENGINES}, got {engine!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _chunked(model, masks: Masks, images: Tensor, engine: str, bn: str, chunk: int, start: int, stop: int,
             fn) -> tuple[list, int]:
    """``fn(logits)`` of members [start, stop) in chunks of ``chunk`` (halved on out-of-memory), and the
    chunk size used last."""
    return over_member_chunks(masks, start, stop, chunk, images.device,
                              lambda part: fn(weight_population_logits(model, part, images, engine, bn)))


def _prepare(model: WideResNet, masks, images: Tensor, engine: str):
    masks = check_weight_masks(model, masks)
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    return masks, images, auto_weight_engine(param.device) if engine == "auto" else engine


def weight_logits(model: WideResNet, masks, images: Tensor, bn: str = "batch", engine: str = "auto",
                  chunk_size: int | None = None) -> Tensor:
    """Logits ``[P, B, classes]`` of every member of a weight-mask population (validated masks; no
    labels needed). Same engines, BN modes and chunking as :func:`score_weight_population`."""
    _check_args(model, engine, bn, chunk_size)
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != model.in_channels:
        raise ValueError(f"images must be a tensor [B, {model.in_channels}, H, W]")
    masks, images, engine = _prepare(model, masks, images, engine)
    out, _ = _chunked(model, masks, images, engine, bn, chunk_size or weight_chunk(model, images, engine, masks),
                      0, masks.population, lambda t: t)
    return torch.cat(out)


def score_weight_population(model: WideResNet, masks, images: Tensor, labels: Tensor, *, metric: str = "loss",
                            bn: str = "batch", engine: str = "auto", chunk_size: int | None = None,
                            return_info: bool = False, distributed: bool | None = None):
    """Fitness ``[P]`` (float32, CPU; higher is better: -mean cross-entropy, or accuracy) of every member
    of a weight-mask population (name -> bool ``[P, numel]``, see :func:`weight_sets`) on one batch.

    engine: ``loop`` (reference), ``grouped`` or ``auto`` (module docstring: how each runs, what it
    costs). bn: ``batch`` (each member's own batch statistics) or ``running``. ``chunk_size`` members
    per pass (None: what fits; never changes the fitness). The model is left exactly as it was; NaN/inf
    fitness becomes -inf with a warning. With ``return_info`` also returns ``{"engine", "chunk_size"}``.
    ``distributed``: as :func:`fastweedout.engines.scoring.score_population` (each rank scores its slice).
    """
    _check_args(model, engine, bn, chunk_size)
    check_batch(model, images, labels)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    masks, images, engine = _prepare(model, masks, images, engine)
    labels = labels.to(device=images.device, dtype=torch.long)
    chunk = chunk_size or weight_chunk(model, images, engine, masks)
    sharded = use_distributed(distributed)
    start, stop = World.current().shard(masks.population) if sharded else (0, masks.population)
    out, chunk = _chunked(model, masks, images, engine, bn, chunk, start, stop,
                          lambda t: member_losses(t, labels, metric).cpu())
    fitness = gathered_fitness(out, masks, labels, sharded)
    if return_info:
        return fitness, {"engine": engine, "chunk_size": chunk}
    return fitness


# ------------------------------------------------------------------------------------------------- FLOPs
def _live(model: WideResNet, member) -> dict[str, int]:
    return {k: int(v.sum()) for k, v in shaped_member(model, member).items()}


def _forward(model: WideResNet, live: dict[str, int], image_size) -> tuple[int, int]:
    """(forward FLOPs per image of ``live`` weights per tensor, of which the stem's)."""
    uses = weight_uses(model, image_size)
    per = {k: 2 * uses[k] * n for k, n in live.items()}
    return sum(per.values()), per["stem.weight"]


def weight_forward_flops(model: WideResNet, member, image_size) -> int:
    """Useful forward FLOPs per image of one member's live weights (``member``: name -> bool tensor,
    shaped like the parameter or flat, or a weight-mask Masks of one member)."""
    return _forward(model, _live(model, member), image_size)[0]


def weight_scoring_flops(model: WideResNet, masks, batch: int, image_size, engine: str) -> dict:
    """Useful and executed FLOPs of scoring a weight-mask population on ``batch`` images.

    useful: every member's live weights (a live conv weight costs 2*H_out*W_out per image, a live linear
    weight 2); executed: what the engine ran, P dense forwards per image for ``loop`` and ``grouped``
    alike (dense kernels do not exploit unstructured sparsity; the grouped stem cannot be shared)."""
    if engine not in WEIGHT_ENGINES[1:]:
        raise ValueError(f"engine must be one of {WEIGHT_ENGINES[1:]} (the one that ran), got {engine!r}")
    masks = check_weight_masks(model, masks)
    live = {k: int(v.sum()) for k, v in masks.items()}  # summed over members
    useful = batch * _forward(model, live, image_size)[0]
    executed = batch * masks.population * count_forward(model, image_size).total
    return {"useful": int(useful), "executed": int(executed), "convention": CONVENTION}


def weight_training_flops(model: WideResNet, member, image_size) -> dict:
    """Useful and executed FLOPs per image of one training step of :class:`WeightMaskedNet`.

    A step is 3x the forward (grad-input and grad-weight each cost a forward), less the stem's
    grad-input, which nothing needs (as :func:`fastweedout.cost.flops.train_step_flops`). useful: the live
    weights only; executed: the dense step (the masked weights are multiplied as zeros)."""
    total, stem = _forward(model, _live(model, member), image_size)
    return {"useful": int(3 * total - stem), "executed": int(train_step_flops(model, image_size)),
            "convention": CONVENTION}


__all__ = ["WEIGHT_ENGINES", "GroupedWeightBackend", "WeightMaskedNet", "auto_weight_engine", "check_weight_masks",
           "member_weights", "sample_weight_masks", "score_weight_population", "shaped_member", "weight_chunk",
           "weight_forward_flops", "weight_logits", "weight_scoring_flops", "weight_sets", "weight_shapes",
           "weight_training_flops"]
