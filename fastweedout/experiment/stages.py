"""The stages of one run: data, the initial network, pretraining, the mask, its score before training, training.

A run is a pure function of its :class:`RunConfig` (on a given device): the initial weights, the
mask and the training derive their seeds from ``RunConfig.seed``, and all arms of one seed share
the initial weights, the validation split and the training data order, so Weedout, the random
control, the pruning-at-initialisation methods and the dense parent differ only in the mask (paired
comparisons). Each run lives in a directory named by the hash of its config (``fastweedout.experiment.runs``);
a finished run is skipped, an interrupted one resumes: the pretraining from its saved parent, the
search from its last generation, the training from its last epoch.

The validation split (held out of the training set, never the test set) is cut in two: its first
:data:`INIT_EVAL_IMAGES` images score every arm's mask before training (the search never sees them),
the rest is what the search and the data-driven pruning methods draw their batches from.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, replace

import torch

from fastweedout import atomic
from fastweedout.config import PRUNE_METHODS, DataConfig, RunConfig, Runtime
from fastweedout.data.datasets import Dataset, load_dataset
from fastweedout.data.loader import DeviceLoader
from fastweedout.engines.scoring import logits as population_logits
from fastweedout.experiment import runs, structure
from fastweedout.experiment.runs import RunDir
from fastweedout.experiment.runtime import ResolvedRuntime, available_bytes, resolve_runtime
from fastweedout.masks import Masks, sample_masks
from fastweedout.model.wrn import WideResNet
from fastweedout.search.member_steps import StepStream
from fastweedout.search.prune_init import prune_at_init
from fastweedout.search.weedout import random_mask, random_search
from fastweedout.spaces.registry import get_space
from fastweedout.training import checkpoint
from fastweedout.training.loop import TrainingDiverged, train

INIT_EVAL_IMAGES = 2000  # validation images reserved for the before-training evaluation of every arm
INIT_EVAL_BATCH = 500  # images per BN batch in that evaluation
PARENT_NAME = "parent.pt"  # the dense parent after pretrain_steps


def derive_seed(seed: int, purpose: str) -> int:
    """Independent 31-bit seeds for the initial weights, the masks and the training of one run seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:4], "big") >> 1


def mask_digest(masks: Masks) -> str:
    h = hashlib.sha256()
    for name, m in masks.items():
        h.update(name.encode() + b"\0" + repr(tuple(m.shape)).encode() + b"\0")
        h.update(m.to(torch.uint8).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_data(cfg: DataConfig, runtime: Runtime | ResolvedRuntime | None = None) -> Dataset:
    """The dataset of a config, on the runtime's device, its training split cut to ``train_subset``."""
    runtime = resolve_runtime(runtime)
    data = load_dataset(cfg.name, root=runtime.data_root, val_size=cfg.val_size, seed=cfg.split_seed,
                        download=runtime.download, synthetic=cfg.synthetic)
    if cfg.train_subset is not None:
        n = len(data.train)
        if cfg.train_subset > n:
            raise ValueError(f"train_subset {cfg.train_subset} exceeds the {n} images of the training split")
        data = replace(data, train=data.train.subset(torch.arange(cfg.train_subset)))
    return data.to(runtime.device)


def search_pool_size(data: Dataset) -> int:
    """Validation images the search may draw from (all when the split is too small to reserve any)."""
    n = len(data.val)
    return n - INIT_EVAL_IMAGES if n > 2 * INIT_EVAL_IMAGES else n


def check_against_data(cfg: RunConfig, data: Dataset) -> None:
    """What can only be checked once the data is known (before any run directory is written)."""
    pool = search_pool_size(data)
    if (cfg.search is not None or cfg.prune is not None) and pool == 0:
        raise ValueError("choosing a mask needs a validation split (val_size > 0)")
    if cfg.search is not None and cfg.search.batch_size is not None and cfg.search.batch_size > pool:
        raise ValueError(f"search batch size {cfg.search.batch_size} exceeds the {pool} validation images the "
                         "search draws from")
    t = cfg.training
    if t is not None and t.drop_last and len(data.train) < t.batch_size:
        raise ValueError(f"the training split has {len(data.train)} images, fewer than one batch of {t.batch_size}")
    if cfg.search is not None and cfg.search.member_steps and len(data.train) < cfg.search.member_batch:
        raise ValueError(f"the training split has fewer images than one member batch ({cfg.search.member_batch})")


def check_resources(cfg: RunConfig, data: Dataset, device: torch.device) -> None:
    """A ValueError, before anything is written, when the run cannot fit in memory: the model (with
    gradients and momentum) and one generation's masks with their sampling temporaries."""
    with torch.device("meta"):
        model = cfg.model.build(num_classes=data.num_classes, in_channels=data.in_channels)
    params = sum(p.numel() for p in model.parameters())
    need = 16 * params  # weights, gradients, momentum, a copy
    sets = get_space(cfg.granularity).sets(model)
    if cfg.search is not None:
        need += 24 * cfg.search.population * sum(sets.values())  # bool masks, float keys, int64 argsort
    avail = available_bytes(device)
    if need > 0.8 * avail:
        raise ValueError(f"this run needs about {need / 2**30:.1f} GiB of {device.type} memory for the model and "
                         f"one generation of masks; {avail / 2**30:.1f} GiB are available (use a smaller population "
                         "or model)")


def build_model(cfg: RunConfig, data: Dataset, device: torch.device | None = None) -> WideResNet:
    """The run's initial (He-normal) network; every arm of one seed gets the same weights."""
    model = cfg.model.build(num_classes=data.num_classes, in_channels=data.in_channels)
    model.reset_parameters(torch.Generator().manual_seed(derive_seed(cfg.seed, "init")))
    return model.to(device) if device is not None else model


def validation_parts(data: Dataset) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((evaluation images, labels), (search images, labels)), normalised exactly as the loader does."""
    x = DeviceLoader(data.val, 1, mean=data.mean, std=data.std).normalize(data.val.images)
    y = data.val.labels
    n = len(y)
    k = n - search_pool_size(data)
    held = (x[:k], y[:k]) if k else (x[:min(n, INIT_EVAL_IMAGES)], y[:min(n, INIT_EVAL_IMAGES)])
    return held, (x[k:], y[k:])


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


def read_mask_file(path: str | os.PathLike) -> Masks:
    """A mask file for ``train --mask``: one member, readable (its fit to the model is checked later)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"mask file {path} does not exist")
    m = Masks.load(path)
    if m.population != 1:
        raise ValueError(f"{path} holds a population of {m.population} masks; train takes one")
    return m


def given_config(mask: Masks, *, data: DataConfig, model, seed: int, training) -> RunConfig:
    return RunConfig(data=data, model=model, arm="given", sparsity=mask.sparsity(), mode=None, seed=seed,
                     training=training, mask_sha256=mask_digest(mask))


def check_mask_fits(mask: Masks, cfg: RunConfig, data: Dataset, path: str) -> None:
    with torch.device("meta"):  # only the shapes matter: no memory, no initialisation cost
        layers = cfg.model.build(num_classes=data.num_classes, in_channels=data.in_channels).node_layers()
    try:
        mask.check(layers)
    except ValueError as e:
        raise ValueError(f"mask file {path} does not fit model {cfg.model.name}: {e}") from None


__all__ = ["INIT_EVAL_IMAGES", "RunOutcome", "build_model", "check_against_data", "check_mask_fits",
           "check_resources", "choose_mask", "derive_seed", "evaluate_mask", "given_config",
           "load_data", "mask_digest", "mask_record", "pretrain", "read_mask_file", "train_run",
           "validation_parts"]
