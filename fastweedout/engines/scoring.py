"""Population scoring: fitness of every member of a mask population on one batch."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fastweedout.config import ENGINES, METRICS
from fastweedout.cost.flops import count_forward
from fastweedout.engines import CompactBackend, FoldedBackend
from fastweedout.masks import Masks
from fastweedout.model.backend import BN_MODES
from fastweedout.model.wrn import WideResNet
from fastweedout.world import World, gather_fitness, use_distributed

# Activation memory per member and image, in elements, is about this many copies of the widest
# layer (stream, pre-activation, inner, shortcut, and the op's fp32 temporaries).
_LIVE_COPIES = 8
_CPU_BUDGET_BYTES = 2 << 30
# CPU: a chunk's widest activation tensor (chunk x B x widest channels x H x W) is kept within about
# the L2 caches of the threads that work on it (2 MiB per thread). Measured (bench/results/README.md,
# WRN-16-4, P=16, B=64, 2 threads): larger chunks make every op allocate tensors above glibc's mmap
# threshold (32 MiB), which are mmapped afresh and zero-filled by the kernel on first touch (folded at
# eta=0 with 16 members per chunk: 2.7M page faults, 4.3 s of system time, 1.4x slower than loop;
# with 1: as fast as loop); and oneDNN's grouped convolution is slower per FLOP than one plain
# convolution per member at these sizes (compact at eta=0.8: 0.84 s with 16 members per chunk, 0.42 s
# with 1). Small activations (WRN-16-2, B=16) still batch several members per chunk.
_CPU_CHUNK_BYTES_PER_THREAD = 2 << 20
# GPU, folded: images per chunk (members x B). Measured on an H200 (WRN-28-10, P=100, eta=0.8, bf16,
# bench/results/NOTES.md): 6,400 images per folded convolution ran 1.11x the loop over members,
# 16,896 ran 0.27x (47 GB held). One member's convolution over a few thousand images already fills
# the GPU; folding more only adds memory traffic.
_CUDA_FOLDED_IMAGES = 8192


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


def auto_engine(masks: Masks, device: torch.device) -> str:
    """The fastest engine for this population and device (measured: python -m bench engines)."""
    if device.type == "cuda":
        return "compact" if masks.sparsity() >= 0.2 else "folded"
    # CPU: compacting pays off as soon as a few channels are off; dense masks fold.
    return "compact" if masks.sparsity() >= 0.1 else "folded"


def auto_chunk(model: WideResNet, images: Tensor, engine: str, masks: Masks,
               budget_bytes: float | None = None, device: torch.device | None = None) -> int:
    """Members per chunk so that a chunk's activations (and, for ``compact``, its members' gathered
    conv weights) fit ``budget_bytes`` (default: 60% of the GPU's free memory; on CPU, a chunk whose
    widest activation fits the threads' L2 caches, at least one member; see
    ``_CPU_CHUNK_BYTES_PER_THREAD``); on a GPU a folded chunk holds at most ``_CUDA_FOLDED_IMAGES``
    images. ``device``: where the scoring runs (default: the images' device)."""
    from fastweedout.cost.flops import padded_live
    from fastweedout.engines.compact import pad_multiple

    b, _, h, w = images.shape
    live = None
    if engine == "compact":  # the widths the engine runs: live channels, rounded up where the kernels pad
        live = padded_live(masks, pad_multiple(images.device, images.dtype))
    c = count_forward(model, (h, w), live)
    widest = c.max_activation
    per_member = _LIVE_COPIES * widest * b * max(4, images.element_size())
    if engine == "compact":
        # Every member has its own copy of each conv's weights (gathered per call); the largest conv's,
        # and the next one's, are alive at once. At WRN-28-10 widths this passes 2^31 elements by ~580
        # members and dominates small batches.
        per_member += 2 * c.max_weight * images.element_size()
    device = device or images.device
    if budget_bytes is not None:
        budget = budget_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.6 * free
    else:
        budget = _CPU_BUDGET_BYTES
        if engine != "loop":  # cache-sized chunks (see _CPU_CHUNK_BYTES_PER_THREAD)
            tensor = widest * b * max(4, images.element_size())
            cache = _CPU_CHUNK_BYTES_PER_THREAD * torch.get_num_threads()
            budget = min(budget, per_member * max(1, cache // tensor))
    chunk = int(budget // per_member)
    if engine == "folded" and device.type == "cuda":
        chunk = min(chunk, _CUDA_FOLDED_IMAGES // b)
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
def population_logits(model: WideResNet, masks: Masks, images: Tensor, engine: str, bn: str) -> Tensor:
    """Logits ``[P, B, classes]`` of every member (no validation, one chunk)."""
    p = masks.population
    dev, dt = images.device, images.dtype
    if engine == "loop":
        return torch.stack([model(images, masks.member(i), bn=bn) for i in range(p)])
    if engine == "folded":
        fm = {k: v.to(device=dev, dtype=dt) for k, v in masks.items()}
        return model.walk(FoldedBackend(fm, bn, p, images.shape[0]), images)
    if engine == "compact":
        return model.walk(CompactBackend(masks, bn, dev, dt), images)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


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


def score_population(model: WideResNet, masks, images: Tensor, labels: Tensor, engine: str = "auto",
                     metric: str = "loss", bn: str = "batch", chunk_size: int | None = None,
                     return_info: bool = False, distributed: bool | None = None):
    """Fitness ``[P]`` (float32, CPU) of every member: ``-loss`` (mean cross-entropy) or accuracy.

    engine: ``loop`` (reference: one masked forward per member), ``folded`` (members in the batch,
    shared weights), ``compact`` (live channels only) or ``auto``. bn: ``batch`` (each member's own
    batch statistics) or ``running``. The population is scored in chunks of ``chunk_size`` members
    (auto: what fits the device). The model is left exactly as it was. NaN/inf fitness becomes
    -inf with a warning. With ``return_info`` also returns ``{"engine", "chunk_size"}``.
    distributed: under an initialised process group (None: auto; False: never) each rank scores its
    contiguous slice of the population and the fitness is all-gathered: every rank returns the full
    ``[P]``; every rank must make the same call (see :mod:`fastweedout.world`).
    """
    if not isinstance(model, WideResNet):
        raise ValueError(f"model must be a fastweedout.WideResNet, got {type(model).__name__}")
    masks = as_masks(masks)
    masks.check(model.node_layers())
    check_batch(model, images, labels)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    labels = labels.to(device=param.device, dtype=torch.long)
    if engine == "auto":
        engine = auto_engine(masks, param.device)
    chunk = chunk_size or auto_chunk(model, images, engine, masks)
    sharded = use_distributed(distributed)  # the engine was picked on the whole population: same on every rank
    start, stop = World.current().shard(masks.population) if sharded else (0, masks.population)
    out, chunk = over_member_chunks(
        masks, start, stop, chunk, param.device,
        lambda part: member_losses(population_logits(model, part, images, engine, bn), labels, metric).cpu())
    fitness = gathered_fitness(out, masks, labels, sharded)
    if return_info:
        return fitness, {"engine": engine, "chunk_size": chunk}
    return fitness
