"""How Weedout draws the members that join the elite in the next generation: one registry entry per
strategy (:data:`STRATEGIES`), so adding one is one function and one line. Every strategy keeps each
node set's live count (a child is a mutation of a parent, or a fresh sample at the same sparsity)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastweedout.masks import Masks

EVOLUTION_TOP = 0.2  # truncation selection: parents come from the fittest 20%


def mutate(parent: Masks, n: int, rate: float, g: torch.Generator) -> Masks:
    """``n`` children of a one-member ``parent``: in every set, swap about ``rate`` of the switched-off
    entries with live ones (at least one swap where both exist), so every set keeps its live count."""
    out = {}
    for name, m in parent.items():
        m = m[0]
        live, dead = m.nonzero().flatten(), (~m).nonzero().flatten()
        k = min(len(live), len(dead), max(1, round(rate * len(dead)))) if len(dead) and len(live) else 0
        rows = m.repeat(n, 1)
        if k:
            on = dead[torch.rand(n, len(dead), generator=g).argsort(1)[:, :k]]
            off = live[torch.rand(n, len(live), generator=g).argsort(1)[:, :k]]
            rows.scatter_(1, on, True)
            rows.scatter_(1, off, False)
        out[name] = rows
    return Masks(out)


def _random(pop: Masks, fitness: Tensor, n_new: int, fresh, rate: float, g: torch.Generator) -> Masks:
    """The paper's: fresh random masks."""
    return fresh(n_new)


def _tournament(pop: Masks, fitness: Tensor, n_new: int, fresh, rate: float, g: torch.Generator) -> Masks:
    """Mutated winners of binary tournaments (the fitter of two random members is a parent)."""
    p = pop.population
    a, b = torch.randint(p, (n_new,), generator=g), torch.randint(p, (n_new,), generator=g)
    return _children(pop, torch.where(fitness[a] >= fitness[b], a, b), rate, g)


def _evolution(pop: Masks, fitness: Tensor, n_new: int, fresh, rate: float, g: torch.Generator) -> Masks:
    """Mutated parents drawn uniformly from the top :data:`EVOLUTION_TOP` (truncation selection)."""
    top = fitness.argsort(descending=True)[:max(1, int(round(EVOLUTION_TOP * pop.population)))]
    return _children(pop, top[torch.randint(len(top), (n_new,), generator=g)], rate, g)


def _children(pop: Masks, parents: Tensor, rate: float, g: torch.Generator) -> Masks:
    return Masks.cat([mutate(pop.select(int(i)), 1, rate, g) for i in parents.tolist()])


#: strategy name -> (population, fitness, n_new, fresh(n) -> Masks, mutation rate, generator) -> n_new members
STRATEGIES: dict[str, Callable[..., Masks]] = {"random": _random, "tournament": _tournament, "evolution": _evolution}
STRATEGY_NAMES = tuple(STRATEGIES)


def next_generation(strategy: str, pop: Masks, fitness: Tensor, n_new: int, fresh, rate: float,
                    g: torch.Generator) -> Masks | None:
    """The ``n_new`` members that join the elite in the next generation."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGY_NAMES}")
    return STRATEGIES[strategy](pop, fitness, n_new, fresh, rate, g) if n_new else None


__all__ = ["EVOLUTION_TOP", "STRATEGIES", "STRATEGY_NAMES", "mutate", "next_generation"]
