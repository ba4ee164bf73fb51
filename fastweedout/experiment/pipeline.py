"""One run of the experiment, start to finish: (pretraining) -> the mask -> its score before training
-> training, in a run directory named by the config's hash (see ``fastweedout.experiment.stages`` for the stages
and the data protocol). Finished runs are skipped, interrupted ones resume.
"""

from __future__ import annotations

import copy
import os
import time

from fastweedout import atomic
from fastweedout.config import RunConfig, Runtime
from fastweedout.data.datasets import Dataset
from fastweedout.experiment import records, runs, structure
from fastweedout.experiment.during_training import run_throughout
from fastweedout.experiment.inputs import check_against_data, check_resources, derive_seed, load_data
from fastweedout.experiment.records import RunError
from fastweedout.experiment.runs import RunDir
from fastweedout.experiment.runtime import ResolvedRuntime, environment, resolve_runtime
from fastweedout.experiment.stages import (
    RunOutcome,
    build_model,
    choose_mask,
    mask_record,
    pretrain,
    strip_search,
    train_run,
)
from fastweedout.masks import Masks
from fastweedout.training import checkpoint


def _records_readable(rd: RunDir) -> bool:
    try:
        recs = rd.records()
    except RunError:
        return False
    return any(r.get("type") == "final" for r in recs) or rd.config.get("training") is None


def execute_run(cfg: RunConfig, results: str | os.PathLike, runtime: Runtime | ResolvedRuntime | None = None, *,
                data: Dataset | None = None, given_mask: Masks | None = None, checked: bool = False) -> RunOutcome:
    """Run one config in its directory under ``results``: skipped when done, resumed when interrupted.

    Order of writes (each atomic): config.json, the parent after pretraining, search checkpoints,
    mask.pt, results.jsonl records, training checkpoints with per-epoch records, the final records,
    and the ``done`` marker last. A finished run whose results.jsonl is damaged is rebuilt from its
    checkpoints. Raises :class:`fastweedout.training.loop.TrainingDiverged` on a NaN loss.
    ``checked``: ``data`` was already checked against this config and the memory (the grid does that
    for every run before the first starts).
    """
    runtime = resolve_runtime(runtime)
    device = runtime.device
    path = os.path.join(os.fspath(results), runs.run_dir_name(cfg.name, cfg))
    if os.path.exists(os.path.join(path, runs.DONE_NAME)):
        rd = RunDir.open(results, cfg.name, cfg)  # verifies its config
        if _records_readable(rd):
            rd.tidy_finished()
            return RunOutcome(rd.path, cfg, rd.done_summary(), skipped=True)
    # Bad data, a config that does not fit it, or one that cannot fit in memory fails here, before
    # a run directory is written.
    if data is None:
        data = load_data(cfg.data, runtime)
    elif data.device != device:
        data = data.to(device)
    if not checked:
        check_against_data(cfg, data)
        check_resources(cfg, data, device)
    rd = RunDir.open(results, cfg.name, cfg)
    with rd:
        if rd.is_done():
            if _records_readable(rd):  # finished by another process meanwhile
                return RunOutcome(rd.path, cfg, rd.done_summary(), skipped=True)
            rd.reopen("its results.jsonl is damaged or incomplete; rebuilding it from the checkpoints")
        rd.remove_temporaries()
        try:
            rd.records()
        except RunError as e:  # every record is re-derived below from the checkpoints and mask.pt
            checkpoint.set_aside(rd.results_path, f"is corrupt ({e})")
        initial = build_model(cfg, data, device)
        model = initial
        if cfg.pretrain_steps:
            model, phase = pretrain(rd, cfg, copy.deepcopy(initial), data, runtime)
            rd.upsert(phase)
        if cfg.arm == "throughout":
            return run_throughout(rd, cfg, model, data, runtime, environment(device))
        mask, meta = choose_mask(rd, cfg, model, data, runtime, given_mask)
        rd.upsert(meta["selection"], mask_record(cfg, model, mask, meta, data.image_size))
        summary = dict(config_hash=runs.config_hash(cfg), name=rd.name, arm=cfg.arm, sparsity=cfg.sparsity,
                       mode=cfg.mode, granularity=cfg.granularity, seed=cfg.seed, dataset=cfg.data.name,
                       model=cfg.model.name, environment=environment(device), search=strip_search(meta.get("search")),
                       selection={k: v for k, v in meta["selection"].items() if k != "fitness"},
                       init=meta["init"], mask_sparsity=mask.sparsity())
        if cfg.training is None:  # the mask alone: its full summary beside it
            atomic.atomic_write_json(rd.file("summary.json"), records.clean_json(dict(meta.get("search") or {},
                                                                                 init=meta["init"])))
            summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            rd.mark_done(summary)
            return RunOutcome(rd.path, cfg, summary, skipped=False)
        start = initial if (cfg.rewind or not cfg.pretrain_steps) else model
        start, fresh = structure.fresh_weights(cfg, start, derive_seed(cfg.seed, structure.REINIT_PURPOSE))
        if fresh:
            summary.update(fresh)
            rd.upsert(dict(type="structure", **fresh))
        result = train_run(rd, cfg, start, None if cfg.arm == "dense" else mask, data, runtime)
        summary.update(final=result.final.to_dict(), phases={k: v.to_dict() for k, v in result.phases.items()},
                       params=result.params, live_params=result.live_params,
                       finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.mark_done(summary)
        return RunOutcome(rd.path, cfg, summary, skipped=False)


__all__ = ["execute_run"]
