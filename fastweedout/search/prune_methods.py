"""The pruning-at-initialisation methods, one registry entry each (:data:`PRUNE_METHODS`): what a
method reads and its one scoring pass. The selection around them (exact live counts, rounds, FLOPs)
is :mod:`fastweedout.search.prune_init`'s; the methods' definitions are documented there.

A scoring pass is ``score(net, fm, x, y, hw, config) -> {node set: float [C]}`` (higher = more
important): ``net`` the network the method scores (:attr:`PruneMethod.prepare` of the model), ``fm``
one member's float masks (the derivatives are taken with respect to them), ``x``/``y`` a validation
batch (methods that read data), ``hw`` the input's height and width (methods that read only the
shape), ``config`` the :class:`fastweedout.config.PruneConfig` (duck-typed: this module sits below
the config, which reads the names from here).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastweedout.model.backend import MaskedBackend

Scores = OrderedDict[str, Tensor]


def _l1_sources(model) -> OrderedDict:
    """The convolution whose filters decide each node set (Li et al. 2017's rule for residual blocks)."""
    src = OrderedDict([(model.stem_set, model.stem)])
    for blk in model.blocks():
        if blk.shortcut is not None:
            src.setdefault(blk.out_set, blk.shortcut)
        src.setdefault(blk.inner_set, blk.conv1)
    return src


def _l1(model, fm, x, y, hw, config) -> Scores:
    src = _l1_sources(model)
    out = OrderedDict()
    with torch.no_grad():
        for name in model.node_layers():
            norms = src[name].weight.detach().abs().sum(dim=(1, 2, 3)).double()
            out[name] = norms / norms.mean().clamp_min(torch.finfo(norms.dtype).tiny) * fm[name].double()
    return out


def _grads(out: Tensor, ms: list[Tensor], create_graph: bool = False) -> list[Tensor]:
    gs = torch.autograd.grad(out, ms, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(m) if g is None else g for g, m in zip(gs, ms)]


def _leaves(fm: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    return OrderedDict((k, v.detach().clone().requires_grad_(True)) for k, v in fm.items())


def _snip(model, fm, x, y, hw, config) -> Scores:
    m = _leaves(fm)
    loss = F.cross_entropy(model.walk(MaskedBackend(m, config.bn, False), x), y)
    gs = _grads(loss, list(m.values()))
    return OrderedDict((k, (g * v).detach().abs()) for (k, v), g in zip(m.items(), gs))


def _grasp(model, fm, x, y, hw, config) -> Scores:
    m = _leaves(fm)
    ms = list(m.values())
    loss = F.cross_entropy(model.walk(MaskedBackend(m, config.bn, False), x) / config.temperature, y)
    gs = _grads(loss, ms, create_graph=True)
    z = sum((g * g.detach()).sum() for g in gs)  # g^T g with one factor held fixed: d z / d m = H g
    hg = _grads(z, ms) if z.requires_grad else [torch.zeros_like(v) for v in ms]
    return OrderedDict((k, (v * h).detach()) for (k, v), h in zip(m.items(), hg))  # importance = -S(-m)


def _linearised(model):
    """A float64 copy with the absolute value of every parameter and BN statistic (the model is untouched)."""
    net = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    return net.requires_grad_(False)


def _synflow_round(net, fm, x, y, hw, config) -> Scores:
    p = net.stem.weight
    m = _leaves({k: v.to(p.device, torch.float64) for k, v in fm.items()})
    ones = torch.ones(1, net.in_channels, *hw, dtype=torch.float64, device=p.device)
    r = net.walk(MaskedBackend(m, "running", False), ones).sum()
    gs = _grads(r, list(m.values()))
    return OrderedDict((k, (g * v).detach().abs()) for (k, v), g in zip(m.items(), gs))


def _same(model):
    return model


@dataclass(frozen=True)
class PruneMethod:
    """One method: its scoring pass and what it needs."""

    name: str
    score: Callable[..., Scores]
    reads: str  # "weights" (nothing else), "batch" (validation images and labels), "shape" (the input's H x W)
    prepare: Callable = _same  # the network the passes run on, from the model (never the model modified)
    float64: bool = False  # masks and passes in float64
    iterative: bool = False  # PruneConfig.iterations rounds, each re-scoring the survivors
    counted: bool = True  # FLOPs counted by FlopCounterMode (False: norms only, 0 FLOPs)


PRUNE_METHODS: dict[str, PruneMethod] = {m.name: m for m in (
    PruneMethod("l1", _l1, "weights", counted=False),
    PruneMethod("snip", _snip, "batch"),
    PruneMethod("grasp", _grasp, "batch"),
    PruneMethod("synflow", _synflow_round, "shape", prepare=_linearised, float64=True, iterative=True),
)}
#: the methods' names, in the order the CLI and the config list them
METHOD_NAMES = tuple(PRUNE_METHODS)


def get_method(name) -> PruneMethod:
    if name not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {METHOD_NAMES}")
    return PRUNE_METHODS[name]


__all__ = ["METHOD_NAMES", "PRUNE_METHODS", "PruneMethod", "Scores", "get_method"]
