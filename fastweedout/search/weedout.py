"""The Weedout phase: Random Search with elitism over masks (the paper's Algorithm 1); how each next
generation is drawn (random, tournament, evolution) is :mod:`fastweedout.search.strategies`'.

A mask population is a :class:`fastweedout.masks.Masks` over a *space*: the model's node sets
(``granularity="node"``, structured) or its weight tensors (``"weight"``, unstructured, see
``fastweedout.spaces.weight``); sampling, selection, mutation and checkpoints are the same for both, only
scoring differs.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastweedout.atomic import atomic_torch_save
from fastweedout.config import SearchConfig
from fastweedout.cost.flops import CONVENTION
from fastweedout.engines.scoring import check_batch, score
from fastweedout.masks import MODES, Masks, Sparsity, layer_sparsities, sample_masks
from fastweedout.model.wrn import WideResNet
from fastweedout.search.member_steps import StepStream, score_after_steps
from fastweedout.search.strategies import next_generation
from fastweedout.spaces.registry import get_space


@dataclass
class SearchResult:
    winner: Masks                      # population of one: the fittest mask of the last generation
    best_fitness: list[float]          # per generation
    mean_fitness: list[float]          # per generation (finite members)
    fitness: Tensor                    # [generations, population]
    elite_index: list[int]             # per generation, the winner's index in that generation (0: the elite)
    wall_time_s: float
    flops_useful: int
    flops_executed: int
    engine: str
    chunk_size: int
    generations: int
    population: int
    granularity: str = "node"
    flops_convention: str = CONVENTION
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready record (the winner itself is saved separately with ``winner.save``)."""
        d = asdict(self)
        d.pop("winner")
        d["fitness"] = self.fitness.tolist()
        d["winner_sparsity"] = self.winner.sparsity()
        return d


def random_search(model: WideResNet, images: Tensor, labels: Tensor, config: SearchConfig = SearchConfig(), *,
                  sparsity: Sparsity = 0.5, mode: str = "layerwise", granularity: str = "node", seed: int = 0,
                  train_stream: StepStream | None = None, chunk_size: int | None = None,
                  checkpoint: str | os.PathLike | None = None, progress: bool = False,
                  distributed: bool | None = None) -> SearchResult:
    """Weedout: score ``config.population`` random masks, keep the fittest, refill with
    ``population - 1`` new masks (the strategy's), for ``config.generations`` generations; each
    generation draws a fresh batch of ``config.batch_size`` validation images (the elite is re-scored
    on it). The winner is the fittest of the last generation. ``images``/``labels`` are the search's
    validation images (never the test set), normalised as the training loader normalises.

    ``train_stream``: the training batches every member is trained on before it is scored when
    ``config.member_steps > 0`` (:class:`fastweedout.search.member_steps.StepStream`). ``checkpoint``: a
    file written atomically after every generation; a search started again with the same file
    resumes after the last finished generation and returns the same result. ``distributed``: passed
    to the scoring (None: shard the population over the ranks of an initialised process group; every
    rank draws the same masks and batches from the seed and picks the same winner).
    """
    if not isinstance(model, WideResNet):
        raise ValueError(f"model must be a fastweedout.WideResNet, got {type(model).__name__}")
    if not isinstance(config, SearchConfig):
        raise ValueError(f"config must be a SearchConfig, got {type(config).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    space = get_space(granularity)
    if config.member_steps and train_stream is None:
        raise ValueError("member_steps > 0 needs a train_stream of training batches")
    if config.member_steps and granularity != "node":
        raise ValueError("member_steps are supported for node masks only")
    layers = space.sets(model)
    layer_sparsities(layers, sparsity)  # validates before any work
    check_batch(model, images, labels)
    n = images.shape[0]
    batch_size = min(n, 1000) if config.batch_size is None else config.batch_size
    if not 1 <= batch_size <= n:
        raise ValueError(f"the search batch ({batch_size}) must be in [1, {n}] (the validation images given)")
    c = config
    mask_gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed + 0x5EED)
    fitness_rows: list[Tensor] = []
    elite_index: list[int] = []
    elite: Masks | None = None
    pop: Masks | None = None  # the last scored generation (parents for tournament/evolution)
    wall = 0.0
    flops_u = flops_e = 0
    info = {"engine": c.engine, "chunk_size": chunk_size or 0}
    start_gen = 0
    fingerprint = dict(config=asdict(c), sparsity=repr(sparsity), mode=mode, granularity=granularity, seed=seed,
                       batch_size=batch_size, n_val=n, layers=dict(layers),
                       stream=None if train_stream is None else train_stream.fingerprint())
    if checkpoint is not None and os.path.exists(checkpoint):
        try:
            st = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"search checkpoint {checkpoint} is unreadable ({e}); delete it to start over") from e
        if st.get("fingerprint") != fingerprint:
            raise ValueError(f"search checkpoint {checkpoint} belongs to a different search configuration")
        start_gen = st["generation"]
        mask_gen.set_state(st["mask_gen"])
        data_gen.set_state(st["data_gen"])
        fitness_rows, elite_index = list(st["fitness"]), list(st["elite_index"])
        elite = Masks(st["elite"]) if st["elite"] is not None else None
        pop = Masks(st["pop"]) if st.get("pop") is not None else None
        wall, flops_u, flops_e, info = st["wall"], st["flops_u"], st["flops_e"], st["info"]

    device = next(model.parameters()).device
    fresh = lambda k: sample_masks(layers, k, sparsity, mode, mask_gen)
    bar = tqdm(range(start_gen, c.generations), desc="weedout", unit="gen", disable=not progress,
               initial=start_gen, total=c.generations)
    for g in bar:
        t0 = time.perf_counter()
        if elite is None:
            pop = fresh(c.population)
        else:
            new = next_generation(c.strategy, pop, fitness_rows[-1], c.population - 1, fresh, c.mutation_rate,
                                  mask_gen)
            pop = elite if new is None else Masks.cat([elite, new])
        idx = torch.randperm(n, generator=data_gen)[:batch_size]
        xb, yb = images[idx.to(images.device)], labels[idx.to(labels.device)]
        if c.member_steps:
            fit, info, fl = score_after_steps(model, pop, xb, yb, train_stream, c)
        else:
            fit, info = score(model, pop, xb, yb, space=granularity, engine=c.engine, metric=c.metric, bn=c.bn,
                              chunk_size=chunk_size, return_info=True, distributed=distributed)
            fl = info.pop("flops")
        if not bool(torch.isfinite(fit).any()):
            raise ValueError(f"generation {g}: every member's fitness is NaN/inf (diverged network or bad data)")
        best = int(torch.argmax(fit))  # -inf members (NaN fitness) are never selected
        elite = pop.select(best)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - t0
        flops_u += fl["useful"]
        flops_e += fl["executed"]
        fitness_rows.append(fit)
        elite_index.append(best)
        bar.set_postfix(best=f"{float(fit[best]):.4f}")
        if checkpoint is not None:  # ranks of a sharded search write the same state (mkstemp temporaries)
            atomic_torch_save(dict(
                fingerprint=fingerprint, generation=g + 1, mask_gen=mask_gen.get_state(),
                data_gen=data_gen.get_state(), fitness=fitness_rows, elite_index=elite_index,
                elite=dict(elite.items()), pop=dict(pop.items()), wall=wall, flops_u=flops_u, flops_e=flops_e,
                info=info), os.fspath(checkpoint))

    fitness = torch.stack(fitness_rows)
    finite = torch.where(torch.isfinite(fitness), fitness, torch.nan)
    return SearchResult(
        winner=elite, best_fitness=fitness.max(1).values.tolist(),
        mean_fitness=[float(x) for x in torch.nanmean(finite, 1)], fitness=fitness, elite_index=elite_index,
        wall_time_s=wall, flops_useful=flops_u, flops_executed=flops_e, engine=info["engine"],
        chunk_size=info["chunk_size"], generations=c.generations, population=c.population, granularity=granularity)


def random_mask(model: WideResNet, sparsity: Sparsity, mode: str = "layerwise", seed: int = 0,
                granularity: str = "node") -> Masks:
    """The control arm: one random mask of the same sparsity (no search)."""
    return get_space(granularity).sample(model, 1, sparsity, mode, torch.Generator().manual_seed(seed))


__all__ = ["SearchResult", "random_mask", "random_search"]
