"""What a run reads and checks before it writes anything: its data (and the two parts of the
validation split), whether it fits the data and the memory, a mask file given to ``train --mask``;
and the seeds derived from a run's seed.

The validation split (held out of the training set, never the test set) is cut in two: its first
:data:`INIT_EVAL_IMAGES` images score every arm's mask before training (the search never sees them),
the rest is what the search and the data-driven pruning methods draw their batches from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import torch

from fastweedout.config import DataConfig, RunConfig, Runtime
from fastweedout.data.datasets import Dataset, load_dataset
from fastweedout.data.loader import DeviceLoader
from fastweedout.experiment.runtime import ResolvedRuntime, available_bytes, resolve_runtime
from fastweedout.masks import Masks
from fastweedout.spaces.registry import get_space

INIT_EVAL_IMAGES = 2000  # validation images reserved for the before-training evaluation of every arm


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


def validation_parts(data: Dataset) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((evaluation images, labels), (search images, labels)), normalised exactly as the loader does."""
    x = DeviceLoader(data.val, 1, mean=data.mean, std=data.std).normalize(data.val.images)
    y = data.val.labels
    n = len(y)
    k = n - search_pool_size(data)
    held = (x[:k], y[:k]) if k else (x[:min(n, INIT_EVAL_IMAGES)], y[:min(n, INIT_EVAL_IMAGES)])
    return held, (x[k:], y[k:])


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


__all__ = ["INIT_EVAL_IMAGES", "check_against_data", "check_mask_fits", "check_resources", "derive_seed",
           "given_config", "load_data", "mask_digest", "read_mask_file", "search_pool_size", "validation_parts"]
