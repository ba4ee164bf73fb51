"""The Weedout phase: Random Search with elitism over node masks (the paper's Algorithm 1)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .flops import CONVENTION, scoring_flops
from .masks import MODES, Masks, Sparsity, layer_sparsities, sample_masks
from .model import BN_MODES, WideResNet
from .atomic import atomic_torch_save
from .scoring import ENGINES, METRICS, check_batch, score_population

STRATEGIES = ("random", "tournament", "evolution")
EVOLUTION_TOP = 0.2  # truncation selection: parents come from the fittest 20%


def mutate(parent: Masks, n: int, rate: float, g: torch.Generator) -> Masks:
    """``n`` children of a one-member ``parent``: in every node set, swap about ``rate`` of the
    switched-off nodes with live ones (at least one swap where both exist), so each node set keeps
    its live count and the sparsity is unchanged."""
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


def next_generation(strategy: str, pop: Masks, fitness: Tensor, n_new: int, fresh, rate: float,
                    g: torch.Generator) -> Masks | None:
    """The ``n_new`` members that join the elite in the next generation."""
    if n_new == 0:
        return None
    if strategy == "random":
        return fresh(n_new)
    p = pop.population
    if strategy == "tournament":  # binary tournaments: the fitter of two random members is a parent
        a, b = torch.randint(p, (n_new,), generator=g), torch.randint(p, (n_new,), generator=g)
        parents = torch.where(fitness[a] >= fitness[b], a, b)
    else:  # evolution: parents drawn uniformly from the top EVOLUTION_TOP
        top = fitness.argsort(descending=True)[:max(1, int(round(EVOLUTION_TOP * p)))]
        parents = top[torch.randint(len(top), (n_new,), generator=g)]
    return Masks.cat([mutate(pop.select(int(i)), 1, rate, g) for i in parents.tolist()])


@dataclass
class SearchResult:
    winner: Masks                      # population of one: the fittest mask of the last generation
    best_fitness: list[float]          # per generation
    mean_fitness: list[float]          # per generation (finite members)
    fitness: Tensor                    # [generations, population]
    elite_index: list[int]             # per generation, the winner's index in that generation
    wall_time_s: float
    flops_useful: int
    flops_executed: int
    engine: str
    chunk_size: int
    generations: int
    population: int
    flops_convention: str = CONVENTION
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready record (the winner itself is saved separately with ``winner.save``)."""
        d = asdict(self)
        d.pop("winner")
        d["fitness"] = self.fitness.tolist()
        d["winner_sparsity"] = self.winner.sparsity()
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save_state(path: str, state: dict) -> None:
    # Ranks of a sharded search write the same state; each writes its own unique temporary (mkstemp).
    atomic_torch_save(state, path)


def random_search(model: WideResNet, images: Tensor, labels: Tensor, population: int = 100,
                  generations: int = 5, sparsity: Sparsity = 0.5, mode: str = "layerwise",
                  batch_size: int | None = 1000, metric: str = "loss", bn: str = "batch",
                  engine: str = "auto", seed: int = 0, strategy: str = "random",
                  chunk_size: int | None = None, checkpoint: str | os.PathLike | None = None,
                  progress: bool = False, distributed: bool | None = None,
                  mutation_rate: float = 0.1) -> SearchResult:
    """Weedout: score ``population`` random masks, keep the fittest, refill with ``population-1``
    new random masks, for ``generations`` generations; each generation draws a fresh batch of
    ``batch_size`` validation images (the elite is re-scored on it). The winner is the fittest of
    the last generation. ``images``/``labels`` are the validation split (never the test set).

    ``strategy``: ``random`` (the paper: elite + fresh random masks), ``tournament`` (elite + mutated
    winners of binary tournaments) or ``evolution`` (elite + mutated members of the fittest 20%);
    mutation swaps about ``mutation_rate`` of each node set's off nodes with live ones.

    ``checkpoint``: a file written atomically after every generation; a search started again with
    the same file resumes after the last finished generation and returns the same result.

    ``distributed``: passed to :func:`score_population` (None: shard the population over the ranks
    of an initialised process group); every rank draws the same masks and batches from the seed,
    gets the full fitness and picks the same winner.
    """
    if not isinstance(model, WideResNet):
        raise ValueError(f"model must be a fastweedout.WideResNet, got {type(model).__name__}")
    for name, v, lo in (("population", population, 1), ("generations", generations, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not 0.0 < mutation_rate <= 1.0:
        raise ValueError(f"mutation_rate must be in (0, 1], got {mutation_rate}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if engine not in ENGINES or metric not in METRICS or bn not in BN_MODES:
        raise ValueError(f"engine/metric/bn must be in {ENGINES}/{METRICS}/{BN_MODES}, "
                         f"got {engine!r}/{metric!r}/{bn!r}")
    layer_sparsities(model.node_layers(), sparsity)  # validates before any work
    check_batch(model, images, labels)
    n = images.shape[0]
    batch_size = min(n, 1000) if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer in [1, {n}] (the validation set's size), got {batch_size!r}")

    mask_gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed + 0x5EED)
    fitness_rows: list[Tensor] = []
    elite_index: list[int] = []
    elite: Masks | None = None
    pop: Masks | None = None  # the last scored generation (parents for tournament/evolution)
    wall = 0.0
    flops_u = flops_e = 0
    info = {"engine": engine, "chunk_size": chunk_size or 0}
    start_gen = 0
    fingerprint = dict(population=population, generations=generations, mode=mode, batch_size=batch_size,
                       metric=metric, bn=bn, seed=seed, strategy=strategy, n_val=n, mutation_rate=mutation_rate,
                       node_layers=dict(model.node_layers()), sparsity=repr(sparsity))
    if checkpoint is not None and os.path.exists(checkpoint):
        try:
            st = torch.load(checkpoint, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"search checkpoint {checkpoint} is unreadable ({e}); delete it to start over") from e
        if st.get("fingerprint") != fingerprint:
            raise ValueError(f"search checkpoint {checkpoint} belongs to a different search configuration")
        start_gen = st["generation"]
        mask_gen.set_state(st["mask_gen"])
        data_gen.set_state(st["data_gen"])
        fitness_rows = list(st["fitness"])
        elite_index = list(st["elite_index"])
        elite = Masks(st["elite"]) if st["elite"] is not None else None
        pop = Masks(st["pop"]) if st.get("pop") is not None else None
        wall, flops_u, flops_e, info = st["wall"], st["flops_u"], st["flops_e"], st["info"]

    device = next(model.parameters()).device
    bar = tqdm(range(start_gen, generations), desc="weedout", unit="gen", disable=not progress,
               initial=start_gen, total=generations)
    for g in bar:
        t0 = time.perf_counter()
        if elite is None:
            pop = sample_masks(model, population, sparsity, mode, mask_gen)
        else:
            new = next_generation(strategy, pop, fitness_rows[-1], population - 1,
                                  lambda k: sample_masks(model, k, sparsity, mode, mask_gen), mutation_rate, mask_gen)
            pop = elite if new is None else Masks.cat([elite, new])
        idx = torch.randperm(n, generator=data_gen)[:batch_size]
        xb, yb = images[idx.to(images.device)], labels[idx.to(labels.device)]
        fit, info = score_population(model, pop, xb, yb, engine=engine, metric=metric, bn=bn,
                                     chunk_size=chunk_size, return_info=True, distributed=distributed)
        if not bool(torch.isfinite(fit).any()):
            raise ValueError(f"generation {g}: every member's fitness is NaN/inf (diverged network or bad data)")
        best = int(torch.argmax(fit))  # -inf members (NaN fitness) are never selected
        elite = pop.select(best)
        _sync(device)
        wall += time.perf_counter() - t0
        fl = scoring_flops(model, pop, batch_size, tuple(images.shape[2:]), info["engine"])
        flops_u += fl["useful"]
        flops_e += fl["executed"]
        fitness_rows.append(fit)
        elite_index.append(best)
        bar.set_postfix(best=f"{float(fit[best]):.4f}")
        if checkpoint is not None:
            _save_state(os.fspath(checkpoint), dict(
                fingerprint=fingerprint, generation=g + 1, mask_gen=mask_gen.get_state(),
                data_gen=data_gen.get_state(), fitness=fitness_rows, elite_index=elite_index,
                elite=dict(elite.items()), pop=dict(pop.items()), wall=wall, flops_u=flops_u, flops_e=flops_e, info=info))

    fitness = torch.stack(fitness_rows)
    finite = torch.where(torch.isfinite(fitness), fitness, torch.nan)
    return SearchResult(
        winner=elite, best_fitness=fitness.max(1).values.tolist(),
        mean_fitness=[float(x) for x in torch.nanmean(finite, 1)],
        fitness=fitness, elite_index=elite_index, wall_time_s=wall, flops_useful=flops_u,
        flops_executed=flops_e, engine=info["engine"], chunk_size=info["chunk_size"],
        generations=generations, population=population)


def random_mask(model: WideResNet, sparsity: Sparsity, mode: str = "layerwise", seed: int = 0) -> Masks:
    """The control arm: one random mask of the same sparsity (no search)."""
    return sample_masks(model, 1, sparsity, mode, torch.Generator().manual_seed(seed))


__all__ = ["random_search", "random_mask", "mutate", "SearchResult", "STRATEGIES"]
