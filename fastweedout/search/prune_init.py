"""Node-level pruning at initialisation: the methods Weedout is a baseline for.

Each method scores every node (a channel of a node set, see :meth:`WideResNet.node_layers`) on the
parent's weights; :func:`keep_top` keeps the highest scores at exactly the number of live nodes per
node set that :func:`fastweedout.masks.sample_masks` gives for the same sparsity and mode, so every
method is compared with Weedout at the same sparsity. A node's mask ``m_c`` multiplies its activation
wherever it is read (``m * relu(bn(x))``); the data-driven scores are derivatives with respect to
these multipliers, taken through :meth:`WideResNet.walk` with float masks.

- ``l1`` (Li et al. 2017): L1 norm of the filters that produce a node set. A stage's residual stream
  is decided by the convolution that opens it (the stage's 1x1 projection shortcut, or the stem when
  the stem is part of stage1), their rule for residual blocks; an inner set by the block's conv1.
  Scores are divided by their node set's mean, so ``global`` mode compares relative norms.
- ``snip`` (Lee et al. 2019): connection sensitivity ``|m * dL/dm|`` at m = 1, L the cross-entropy on
  a validation batch (BN: ``config.bn``, batch statistics by default).
- ``grasp`` (Wang et al. 2020): ``S(-m) = -m * Hg`` with ``g = dL/dm`` of the loss on the logits
  divided by ``config.temperature``; the official code removes the highest S and keeps the lowest,
  so importance = -S = ``m * Hg``.
- ``synflow`` (Tanaka et al. 2020): data-free. Absolute values of every parameter and BN statistic
  (a float64 copy; the model is not touched), BN on running statistics, an all-ones input ``[1, C, H, W]``,
  R = sum of the logits, score ``|m * dR/dm|``; ``config.iterations`` rounds, keeping
  ``(1 - eta)^(k/n)`` of the nodes after round k (masked nodes stay masked).

Higher score = more important = kept. Exact ties are broken by a seeded random order (``generator``).
FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and linear layers,
1 multiply-add = 2 FLOPs; ``l1``, norms only, costs 0) on a meta-device copy of the same passes, so the
measured wall time carries no counting overhead.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor

from fastweedout.config import PruneConfig
from fastweedout.cost.flops import counted_flops
from fastweedout.masks import (
    MODES,
    Masks,
    Sparsity,
    as_generator,
    check_mask_names,
    layer_sparsities,
    round_half_up,
)
from fastweedout.search.prune_methods import METHOD_NAMES, PruneMethod, Scores, get_method

METHODS = METHOD_NAMES


# ------------------------------------------------------------------------------------ selection
def off_counts(node_layers: Mapping[str, int], sparsity: Sparsity,
               mode: str = "layerwise") -> OrderedDict[str, int] | int:
    """Nodes switched off, as :func:`sample_masks` does it: per node set (layerwise) or in all (global)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "layerwise":
        return OrderedDict((k, min(round_half_up(s * node_layers[k]), node_layers[k] - 1))
                           for k, s in layer_sparsities(node_layers, sparsity).items())
    if isinstance(sparsity, (Mapping, list, tuple)):
        raise ValueError("global sparsity takes one number (the fraction of all nodes switched off)")
    s = layer_sparsities(node_layers, sparsity)[next(iter(node_layers))]
    total = sum(node_layers.values())
    return min(round_half_up(s * total), total - len(node_layers))


def _order(s: Tensor, g: torch.Generator) -> Tensor:
    """Indices from most to least important: by score, exact ties in a seeded random order."""
    perm = torch.randperm(s.numel(), generator=g)
    return perm[torch.argsort(s[perm], descending=True, stable=True)]


def _check_scores(node_layers: Mapping[str, int], scores: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    check_mask_names(node_layers, scores)
    out = OrderedDict()
    for name, c in node_layers.items():
        s = scores[name]
        if not isinstance(s, Tensor) or tuple(s.shape) != (c,):
            raise ValueError(f"scores of {name!r} must be a tensor of shape [{c}], got "
                             f"{list(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
        s = s.detach().to("cpu", torch.float64)
        if bool(s.isnan().any()):
            raise ValueError(f"scores of {name!r} contain NaN")
        out[name] = s
    return out


def keep_top(node_layers: Mapping[str, int], scores: Mapping[str, Tensor], sparsity: Sparsity,
             mode: str = "layerwise", *, generator: torch.Generator | int | None = None) -> Masks:
    """A population of one keeping the highest-scoring nodes, exactly as many as :func:`sample_masks`.

    layerwise: ``C - min(round_half_up(eta*C), C-1)`` live nodes per node set (schedules allowed);
    global: the same total as sample_masks, the best node of every node set always kept, the rest by
    score across node sets. Exact ties (e.g. all-zero scores) are broken by a random order drawn from
    ``generator`` (a CPU generator or a seed; None: seed 0), so the result is deterministic.
    """
    node_layers = OrderedDict(node_layers)
    off = off_counts(node_layers, sparsity, mode)
    sc = _check_scores(node_layers, scores)
    g = as_generator(generator)
    out = OrderedDict()
    if mode == "layerwise":
        for name, c in node_layers.items():
            m = torch.ones(c, dtype=torch.bool)
            m[_order(sc[name], g)[c - off[name]:]] = False
            out[name] = m.view(1, c)
        return Masks(out)
    flat = torch.cat(list(sc.values()))
    forced = torch.zeros(flat.numel(), dtype=torch.bool)
    start = 0
    for name, c in node_layers.items():  # one guaranteed live node per node set: its best
        forced[start + int(_order(sc[name], g)[0])] = True
        start += c
    order = _order(flat, g)
    order = order[torch.argsort(forced[order].to(torch.uint8), descending=True, stable=True)]
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[flat.numel() - off:]] = False
    start = 0
    for name, c in node_layers.items():
        out[name] = keep[start:start + c].clone().view(1, c)
        start += c
    return Masks(out)


# ---------------------------------------------------------------------------------------- input
def _check_model(model) -> None:
    if not (hasattr(model, "node_layers") and hasattr(model, "walk")):
        raise ValueError(f"model must be a fastweedout WideResNet, got {type(model).__name__}")


def _param(model) -> Tensor:
    return model.stem.weight


def _check_method(method) -> PruneMethod:
    return get_method(method)


def _check_config(config) -> PruneConfig:
    if not isinstance(config, PruneConfig):
        raise ValueError(f"config must be a PruneConfig, got {type(config).__name__}")
    return config


def _check_images(model, images) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != model.in_channels:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [B, {model.in_channels}, H, W], got {shape}")
    if images.shape[0] < 1:
        raise ValueError("images hold no image")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    return images


def _batch(method, model, images, labels, config) -> tuple[Tensor, Tensor]:
    """The first ``config.batch_size`` validation images and labels, on the model's device and dtype."""
    if images is None or labels is None:
        raise ValueError(f"{method} scores on a validation batch: give images [B, C, H, W] and labels [B]")
    images = _check_images(model, images)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        shape = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor [{images.shape[0]}] (one per image), got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if bool((labels < 0).any()) or bool((labels >= model.num_classes).any()):
        raise ValueError(f"labels must be in [0, {model.num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    n = min(config.batch_size, images.shape[0])
    p = _param(model)
    return images[:n].to(p.device, p.dtype), labels[:n].to(p.device, torch.long)


def _image_hw(model, images, image_size) -> tuple[int, int]:
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
            raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
        return hw
    if images is None:
        raise ValueError("synflow needs the input's shape: give images (only their shape is read) or image_size")
    return tuple(_check_images(model, images).shape[-2:])


def _float_masks(model, masks, dtype, device) -> OrderedDict[str, Tensor]:
    if masks is None:
        return OrderedDict((k, torch.ones(c, dtype=dtype, device=device)) for k, c in model.node_layers().items())
    fm = model.check_member_masks(masks, device=device, dtype=dtype)
    return OrderedDict((k, fm[k]) for k in model.node_layers())


def node_scores(method: str, model, images: Tensor | None = None, labels: Tensor | None = None, *,
                config: PruneConfig = PruneConfig(), masks: Mapping[str, Tensor] | Masks | None = None,
                image_size: int | tuple[int, int] | None = None) -> Scores:
    """Score of every node of every node set (name -> float ``[C]``); higher = more important.

    ``images``/``labels``: the validation batch (snip, grasp: the first ``config.batch_size``; synflow
    reads only the images' shape, or ``image_size``). ``masks``: one member's current bool masks (the
    point at which the scores are taken; masked nodes score 0); None: every node live. One scoring
    pass: synflow's iterative rounds are :func:`prune_at_init`'s. The model is left unchanged.
    """
    m = _check_method(method)
    _check_model(model)
    config = _check_config(config)
    x, y, hw = _inputs(m, model, images, labels, config, image_size)
    p = _param(model)
    with torch.enable_grad():
        fm = _float_masks(model, masks, torch.float64 if m.float64 else p.dtype, p.device)
        return m.score(m.prepare(model), fm, x, y, hw, config)


def _inputs(m: PruneMethod, model, images, labels, config, image_size):
    """(x, y, hw): what the method reads, checked (None where it reads nothing of it)."""
    if m.reads == "batch":
        return (*_batch(m.name, model, images, labels, config), None)
    if m.reads == "shape":
        return None, None, _image_hw(model, images, image_size)
    return None, None, None


# ------------------------------------------------------------------------------------ the method
def _dense(node_layers: Mapping[str, int]) -> Masks:
    """Every node live (a population of one)."""
    return Masks.from_member({k: torch.ones(c, dtype=torch.bool) for k, c in node_layers.items()})


def _schedule(node_layers, sparsity, mode, k: int, n: int):
    """Sparsity after round k of n: keep (1 - eta)^(k/n), exactly eta at the last round."""
    if k == n:
        return sparsity
    if mode == "global":
        s = float(sparsity)
        return min(1.0 - (1.0 - s) ** (k / n), s)
    return OrderedDict((name, min(1.0 - (1.0 - s) ** (k / n), s))
                       for name, s in layer_sparsities(node_layers, sparsity).items())


def _select(m: PruneMethod, model, sparsity, mode, images, labels, config, g, image_size) -> tuple[Masks, int]:
    layers = model.node_layers()
    if not m.iterative:
        return keep_top(layers, node_scores(m.name, model, images, labels, config=config, image_size=image_size),
                        sparsity, mode, generator=g), 1
    x, y, hw = _inputs(m, model, images, labels, config, image_size)
    net = m.prepare(model)
    dtype = torch.float64 if m.float64 else _param(model).dtype
    mask = _dense(layers)
    n = config.iterations
    for k in range(1, n + 1):
        live = mask.member(0)
        with torch.enable_grad():
            sc = m.score(net, {name: v.to(_param(net).device, dtype) for name, v in live.items()}, x, y, hw, config)
        sc = OrderedDict((name, s.cpu().masked_fill(~live[name], float("-inf"))) for name, s in sc.items())
        mask = keep_top(layers, sc, _schedule(layers, sparsity, mode, k, n), mode, generator=g)
    return mask, n


def _meta_copy(model):
    """The model on the meta device (shapes only, no storage): FLOPs are counted on it, not on the run."""
    memo = {id(p): torch.nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach().to("meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _count(m: PruneMethod, model, x_shape, hw, config) -> int:
    """FlopCounterMode's count of one scoring pass (one round), run on the meta device: the same
    operations as the real pass, so the real pass's wall time carries no counting overhead."""
    if not m.counted:
        return 0
    meta = _meta_copy(model)
    dtype = torch.float64 if m.float64 else _param(model).dtype
    fm = {k: torch.ones(c, dtype=dtype, device="meta") for k, c in model.node_layers().items()}
    x = torch.empty(x_shape, dtype=dtype, device="meta") if x_shape else None
    y = torch.zeros(x_shape[0], dtype=torch.long, device="meta") if x_shape else None
    with torch.enable_grad():
        return counted_flops(m.score, m.prepare(meta), fm, x, y, hw, config)[0]


def prune_at_init(method: str, model, sparsity: Sparsity, mode: str = "layerwise", images: Tensor | None = None,
                  labels: Tensor | None = None, *, config: PruneConfig = PruneConfig(),
                  generator: torch.Generator | int | None = None,
                  image_size: int | tuple[int, int] | None = None) -> tuple[Masks, dict]:
    """The mask (a :class:`Masks` population of one, on the CPU) that ``method`` keeps at ``sparsity``.

    ``sparsity``/``mode`` as :func:`sample_masks` (layerwise schedules allowed), with exactly its
    live counts. ``generator`` (a seed or CPU generator) breaks exact score ties. ``info``: method,
    ``flops`` (FlopCounterMode: conv and linear layers, 1 multiply-add = 2 FLOPs; counted on a meta
    copy of the same passes), ``wall_s`` (the real run), ``images`` (validation images read),
    ``rounds`` (scoring passes). Nothing to prune (every count zero): the dense mask, no scoring.
    The model is left unchanged (parameters, buffers, train/eval mode).
    """
    t0 = time.perf_counter()
    m = _check_method(method)
    _check_model(model)
    config = _check_config(config)
    layers = model.node_layers()
    off = off_counts(layers, sparsity, mode)
    g = as_generator(generator)
    x, _, hw = _inputs(m, model, images, labels, config, image_size)  # validated before any work
    x_shape = tuple(x.shape) if x is not None else None
    if (off if isinstance(off, int) else sum(off.values())) == 0:
        mask, rounds = _dense(layers), 0
    else:
        mask, rounds = _select(m, model, sparsity, mode, images, labels, config, g, image_size)
    wall = time.perf_counter() - t0
    flops = rounds * _count(m, model, x_shape, hw, config) if rounds else 0
    info = dict(method=method, flops=int(flops), wall_s=wall, images=x_shape[0] if x_shape else 0, rounds=rounds)
    return mask, info


__all__ = ["METHODS", "PruneConfig", "keep_top", "node_scores", "off_counts", "prune_at_init"]
