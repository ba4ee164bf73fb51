"""The experiment grid: every combination of the axes (sparsity x arm x seed x any config field),
run by one process or spread over many (``torchrun``, ``srun``, or several shells on one machine).

Each process takes whole runs: it claims a run directory (``fastweedout.experiment.claims``) before running
it, so two processes never run the same run; a run that another live process holds is skipped and
waited for at the end (work stealing, on one machine as across nodes). Finished runs are skipped,
interrupted ones resume, so running the same command again after a crash finishes the grid.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastweedout.config import RunConfig, Runtime, build_run_config
from fastweedout.data.datasets import Dataset
from fastweedout.experiment import claims, runs
from fastweedout.experiment.inputs import check_against_data, check_resources, load_data
from fastweedout.experiment.pipeline import execute_run
from fastweedout.experiment.runs import RunDir
from fastweedout.experiment.runtime import ResolvedRuntime, resolve_runtime
from fastweedout.experiment.stages import RunOutcome
from fastweedout.training.loop import TrainingDiverged
from fastweedout.world import env_world

WAIT_POLL_S = 5.0


def grid_configs(axes: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None) -> list[RunConfig]:
    """The configs of every combination of ``axes`` (field path -> values, e.g. ``{"sparsity": [0, .2],
    "arm": ["weedout", "random"], "seed": [0, 1], "search.population": [10, 100]}``) over ``fixed``
    values, seed-major (early seeds complete the whole picture first). Sparsity 0 is the dense network,
    run once per combination of the other axes; duplicates (equal hashes) are dropped."""
    fixed = dict(fixed or {})
    axes = {k: list(v) for k, v in axes.items()}
    for k, v in axes.items():
        if not v:
            raise ValueError(f"the grid axis {k!r} has no values")
    names = sorted(axes, key=lambda k: (k != "seed", list(axes).index(k)))
    out: list[RunConfig] = []
    seen: set[str] = set()
    for combo in itertools.product(*(axes[k] for k in names)):
        cfg = build_run_config({**fixed, **dict(zip(names, combo))})
        h = runs.config_hash(cfg)
        if h not in seen:
            seen.add(h)
            out.append(cfg)
    return out


@dataclass
class GridOutcome:
    outcomes: list[RunOutcome]
    failures: list[tuple[RunConfig, str]]  # runs that stopped with an error (e.g. a diverged training)
    rank: int = 0
    world_size: int = 1
    elsewhere: list[RunConfig] = field(default_factory=list)  # still held by another live process at the end

    @property
    def ran(self) -> int:
        return sum(not o.skipped for o in self.outcomes)

    @property
    def skipped(self) -> int:
        return sum(o.skipped for o in self.outcomes)


def precheck_results(results: str | os.PathLike) -> None:
    """Check an existing results directory (a file, unwritable, tampered runs) before the slow data
    loading; a missing one is created only once the rest of the input has been checked."""
    if os.path.lexists(results):
        runs.check_results_dir(results)


def prepare(configs: Sequence[RunConfig], results: str | os.PathLike,
            runtime: Runtime | ResolvedRuntime) -> dict[str, Dataset]:
    """Load every data config once and check every run against its data and the memory, before the
    first run directory is written; returns the datasets by canonical data config."""
    precheck_results(results)
    runtime = resolve_runtime(runtime)
    device = runtime.device
    cache: dict[str, Dataset] = {}
    for c in configs:
        key = runs.canonical_json(c.data)
        if key not in cache:
            cache[key] = load_data(c.data, runtime)
        check_against_data(c, cache[key])
        check_resources(c, cache[key], device)
    runs.check_results_dir(results)  # created now that the input is known to be good
    return cache


def run_grid(configs: Sequence[RunConfig], results: str | os.PathLike,
             runtime: Runtime | ResolvedRuntime | None = None, *, on_run: Callable[[RunOutcome], None] | None = None,
             wait: bool = True, poll_s: float = WAIT_POLL_S) -> GridOutcome:
    """Run every config that no process has done or is doing; then, with ``wait``, wait for the runs
    other processes hold and take over any whose owner dies. Under torchrun/srun each rank tries its
    round-robin share first, then steals the others' (``fastweedout.experiment.claims.order_for_rank``)."""
    runtime = resolve_runtime(runtime)  # once: device (a GPU per rank), threads, determinism
    cache = prepare(configs, results, runtime)
    rank, size = env_world()
    outcomes: list[RunOutcome] = []
    failures: list[tuple[RunConfig, str]] = []
    from tqdm.auto import tqdm

    def attempt(c: RunConfig) -> bool:
        """Run (or skip) c if no live process holds it; False when one does."""
        path = RunDir.open(results, c.name, c).path
        data = cache[runs.canonical_json(c.data)]
        with claims.claimed(path) as mine:
            if not mine and not os.path.exists(os.path.join(path, runs.DONE_NAME)):
                return False
            try:
                out = execute_run(c, results, runtime, data=data, checked=True)
            except TrainingDiverged as e:
                failures.append((c, str(e)))
                return True
        outcomes.append(out)
        if on_run is not None:
            on_run(out)
        return True

    busy = []
    bar = tqdm(claims.grid_for_rank(list(configs), rank, size), desc="runs", unit="run",
               disable=not runtime.progress, file=sys.stderr)
    for c in bar:
        bar.set_postfix_str(c.name)
        if not attempt(c):
            busy.append(c)
    while busy and wait:
        time.sleep(poll_s)
        busy = [c for c in busy if not attempt(c)]
    return GridOutcome(outcomes, failures, rank=rank, world_size=size, elsewhere=busy)


__all__ = ["GridOutcome", "grid_configs", "precheck_results", "prepare", "run_grid"]
