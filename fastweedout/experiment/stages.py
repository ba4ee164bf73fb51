"""The stages of one run: data, the initial network, pretraining, the mask, its score before training, training.

A run is a pure function of its :class:`RunConfig` (on a given device): the initial weights, the
mask and the training derive their seeds from ``RunConfig.seed``, and all arms of one seed share
the initial weights, the validation split and the training data order, so Weedout, the random
control, the pruning-at-initialisation methods and the dense parent differ only in the mask (paired
comparisons). Each run lives in a directory named by the hash of its config (``fastweedout.experiment.runs``);
a finished run is skipped, an interrupted one resumes: the pretraining from its saved parent, the
search from its last generation, the training from its last epoch.

What a run reads and checks before it writes anything (its data, the validation split's two parts,
the memory it needs) is :mod:`fastweedout.experiment.inputs`'.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from fastweedout import atomic
from fastweedout.config import PRUNE_METHODS, RunConfig, Runtime
from fastweedout.data.datasets import Dataset
from fastweedout.engines.scoring import logits as population_logits
from fastweedout.experiment import runs, structure
from fastweedout.experiment.inputs import derive_seed, mask_digest, validation_parts
from fastweedout.experiment.runs import RunDir
from fastweedout.masks import Masks, sample_masks
from fastweedout.model.wrn import WideResNet
from fastweedout.search.member_steps import StepStream
from fastweedout.search.prune_init import prune_at_init
from fastweedout.search.weedout import random_mask, random_search
from fastweedout.spaces.registry import get_space
from fastweedout.training import checkpoint
from fastweedout.training.loop import TrainingDiverged, train

INIT_EVAL_BATCH = 500  # images per BN batch in that evaluation
PARENT_NAME = "parent.pt"  # the dense parent after pretrain_steps


def build_model(cfg: RunConfig, data: Dataset, device: torch.device | None = None) -> WideResNet:
    """The run's initial (He-normal) network; every arm of one seed gets the same weights."""
    model = cfg.model.build(num_classes=data.num_classes, in_channels=data.in_channels)
    model.reset_parameters(torch.Generator().manual_seed(derive_seed(cfg.seed, "init")))
    return model.to(device) if device is not None else model


@torch.no_grad()
def evaluate_mask(model: WideResNet, masks: Masks, images: torch.Tensor, labels: torch.Tensor, bn: str = "batch",
                  granularity: str = "node") -> dict:
    """Loss and accuracy of one mask on held-out validation images, before any training, in BN batches
    of :data:`INIT_EVAL_BATCH` (whole batches only: the statistics of a few images are noise)."""
    n = len(labels)
    b = min(INIT_EVAL_BATCH, n)
    if n == 0:
        return dict(init_val_loss=None, init_val_acc=None, init_eval_images=0, init_bn=bn)
    masks = masks.to("cpu")
    loss_sum = correct = 0.0
    seen = 0
    for start in range(0, n - b + 1, b):
        x, y = images[start:start + b], labels[start:start + b]
        logits = population_logits(model, masks, x, space=granularity, bn=bn)[0].float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        seen += y.shape[0]
    loss = loss_sum / seen
    return dict(init_val_loss=loss if math.isfinite(loss) else None, init_val_acc=correct / seen,
                init_eval_images=seen, init_bn=bn)


@dataclass
class RunOutcome:
    path: str
    config: RunConfig
    summary: dict  # the done-marker's content
    skipped: bool  # it was already complete before this call


def pretrain(rd: RunDir, cfg: RunConfig, model: WideResNet, data: Dataset, runtime: Runtime) -> tuple:
    """The dense parent after ``pretrain_steps`` SGD steps (saved, so a resumed run does not redo them)."""
    path = rd.file(PARENT_NAME)
    if os.path.exists(path):
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
            if st.get("config_hash") == runs.config_hash(cfg):
                model.load_state_dict(st["model"])
                return model, st["phase"]
        except Exception as e:  # noqa: BLE001 - a damaged file is recomputed
            checkpoint.set_aside(path, f"is unreadable ({e})")
    res = train(model, None, data, cfg.training, seed=derive_seed(cfg.seed, "train"),
                device=str(model.stem.weight.device), max_steps=cfg.pretrain_steps, progress=False)
    if res.steps < cfg.pretrain_steps:
        raise ValueError(f"pretrain_steps {cfg.pretrain_steps} exceed the {res.steps} steps of the training config")
    parent = res.model.to(model.stem.weight.device)
    parent.train()
    phase = dict(type="phase", phase="pretrain", steps=res.steps, wall_s=res.phases["training"].wall_s,
                 flops=res.phases["training"].flops, flops_executed=res.phases["training"].flops)
    atomic.atomic_torch_save(dict(config_hash=runs.config_hash(cfg), model=parent.state_dict(), phase=phase), path)
    return parent, phase


def choose_mask(rd: RunDir, cfg: RunConfig, model: WideResNet, data: Dataset, runtime: Runtime,
                 given: Masks | None) -> tuple[Masks, dict]:
    """The mask to train, from mask.pt when an earlier attempt got that far, else chosen (and saved);
    returns it with its metadata (the selection's cost and summary, the score before training)."""
    layers = get_space(cfg.granularity).sets(model)
    if os.path.exists(rd.mask_path):
        try:
            m = Masks.load(rd.mask_path, layers)
            if m.meta.get("config_hash") == runs.config_hash(cfg) and m.population == 1:
                return m, m.meta
        except (ValueError, OSError):
            pass
        checkpoint.set_aside(rd.mask_path, "was not this run's mask")
    (ex, ey), (sx, sy) = validation_parts(data)
    mask_seed = derive_seed(cfg.seed, "mask")
    selection = dict(type="phase", phase="search", wall_s=0.0, flops=0, flops_executed=0)
    search_summary = None
    t0 = time.perf_counter()
    if cfg.arm == "weedout":
        s = cfg.search
        stream = None
        if s.member_steps:
            stream = StepStream(data.train, steps=s.member_steps, batch_size=s.member_batch, mean=data.mean,
                                std=data.std, augment=data.augment, seed=derive_seed(cfg.seed, "member-steps"))
        res = random_search(model, sx, sy, s, sparsity=cfg.sparsity, mode=cfg.mode, granularity=cfg.granularity,
                            seed=mask_seed, train_stream=stream, chunk_size=runtime.chunk_size,
                            checkpoint=rd.search_checkpoint, progress=runtime.progress, distributed=False)
        mask, search_summary = res.winner, res.summary()
        selection.update(wall_s=res.wall_time_s, flops=res.flops_useful, flops_executed=res.flops_executed,
                         engine=res.engine, chunk_size=res.chunk_size, population=res.population,
                         generations=res.generations, best_fitness=res.best_fitness, mean_fitness=res.mean_fitness,
                         elite_index=res.elite_index, fitness=search_summary["fitness"])
    elif cfg.arm in PRUNE_METHODS:
        p = cfg.prune
        n = min(p.batch_size, len(sy))
        mask, info = prune_at_init(cfg.arm, model, cfg.sparsity, cfg.mode, sx[:n], sy[:n], config=p,
                                   generator=mask_seed)
        selection.update(wall_s=time.perf_counter() - t0, flops=int(info["flops"]), flops_executed=int(info["flops"]),
                         method=cfg.arm)
    elif cfg.arm == "random":
        mask = random_mask(model, cfg.sparsity, cfg.mode, seed=mask_seed, granularity=cfg.granularity)
    elif cfg.arm == "dense":
        mask = sample_masks(layers, 1, 0.0)  # every node live
    else:
        if given is None or mask_digest(given) != cfg.mask_sha256:
            raise ValueError("the 'given' arm needs the mask whose digest is in its config")
        mask = given
    mask, shuffled = structure.apply_shuffle(cfg, mask, derive_seed(cfg.seed, structure.SHUFFLE_PURPOSE))
    selection.update(shuffled)
    bn = cfg.search.bn if cfg.search is not None else "batch"
    meta = dict(config_hash=runs.config_hash(cfg), arm=cfg.arm, seed=cfg.seed, model=cfg.model.name,
                granularity=cfg.granularity, dataset=cfg.data.name, node_layers=dict(layers),
                model_config=dict(runs.to_jsonable(cfg.model), in_channels=model.in_channels,
                                  num_classes=model.num_classes),
                selection=selection, search=search_summary,
                init=evaluate_mask(model, mask, ex, ey, bn, cfg.granularity))
    mask.save(rd.mask_path, **meta)
    return mask, meta


def mask_record(cfg: RunConfig, model: WideResNet, mask: Masks, meta: dict, image_size: int) -> dict:
    live = {k: int(v.sum()) for k, v in mask.items()}
    flops, params = get_space(cfg.granularity).live(model, mask, image_size)
    return dict(type="mask", arm=cfg.arm, granularity=cfg.granularity, sparsity=mask.sparsity(), live=live,
                params=params, forward_flops=flops, **meta["init"])


def train_run(rd: RunDir, cfg: RunConfig, model: WideResNet, mask, data: Dataset, runtime: Runtime,
              training=None, phase: str = "training"):
    """Train with per-epoch checkpoints in the run directory and one record per epoch; the final
    records when done. ``training``/``phase``: another config and name (the throughout arm's fine-tuning)."""
    training = training or cfg.training
    ckpt_dir = rd.train_dir if phase == "training" else rd.file(phase)
    prefix = "" if phase == "training" else f"{phase}_"

    def on_epoch(rec):
        rd.upsert(dict(type=f"{prefix}epoch", **rec.to_dict()))

    try:
        result = train(model, mask, data, training, seed=derive_seed(cfg.seed, "train"),
                       device=runtime.device, checkpoint_dir=ckpt_dir, on_epoch=on_epoch,
                       progress=runtime.progress, granularity=cfg.granularity)
    except TrainingDiverged as e:
        rd.upsert(dict(type="error", phase=phase, error=str(e)))
        raise
    final = result.final
    rd.upsert(*[dict(type=f"{prefix}epoch", **r.to_dict()) for r in result.records],
              *[dict(type="phase", phase=k if phase == "training" else f"{phase}_{k}", **v.to_dict())
                for k, v in result.phases.items()],
              dict(type="final", phase=phase, epochs=final.epoch, train_acc=final.train_acc, test_acc=final.test_acc,
                   train_loss=final.train_loss, test_loss=final.test_loss, params=result.params,
                   live_params=result.live_params, forward_flops=result.forward_flops,
                   train_step_flops=result.train_step_flops, live_forward_flops=result.live_forward_flops))
    checkpoint.finish(ckpt_dir)
    return result


def strip_search(s: dict | None) -> dict | None:
    """A search summary without the per-member fitness matrix (that stays in results.jsonl)."""
    return None if s is None else {k: v for k, v in s.items() if k != "fitness"}


__all__ = ["RunOutcome", "build_model", "choose_mask", "evaluate_mask", "mask_record", "pretrain", "strip_search",
           "train_run"]
