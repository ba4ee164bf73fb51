"""The paper's experiment: configs, one run (Weedout search or a random mask, then training), the grid.

A run is a pure function of its :class:`RunConfig` (on a given device): the model's initial weights,
the mask and the training all derive their seeds from ``RunConfig.seed``, and the three arms of one
seed share the same initial weights, so Weedout, the random control and the dense parent differ
only in the mask. Each run lives in a directory named by the hash of its config (see
:mod:`fastweedout.runs`); a finished run is skipped, an interrupted one resumes: the search from its
last finished generation, the training from its last finished epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch

from . import distributed, runs
from .data import DATASETS, Dataset, DeviceLoader, SyntheticConfig, load_dataset
from .flops import forward_flops
from .masks import MODES, Masks, sample_masks
from .model import BN_MODES, WideResNet, create_model
from .runs import RunDir, RunError
from .scoring import ENGINES, METRICS, auto_engine, population_logits
from .search import STRATEGIES, random_mask, random_search
from .training import CHECKPOINT_NAME, SCHEDULES, TrainConfig, TrainingDiverged, train

ARMS = ("weedout", "random")  # the grid's arms (eta = 0 is the dense network, run once per seed)
ALL_ARMS = ("weedout", "random", "dense", "given")  # given: a mask from a file (`fastweedout train --mask`)
PIPELINE_VERSION = 1  # enters every config hash: bump when the same config would give different results
INIT_EVAL_BATCH = 500  # images per BN batch when scoring the chosen mask before training
INIT_EVAL_IMAGES = 2000  # validation images scored before training (the first ones of the split)
PREV_CHECKPOINT = "checkpoint.prev.pt"
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
            "fmnist": "fashion-mnist"}
_MODEL_NAME = re.compile(r"^wrn_(\d+)_(\d+)$")


# ------------------------------------------------------------------------------------ configs
def _whole(name: str, v, lo: int, none_ok: bool = False):
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def _set(obj, name, value):  # frozen dataclasses normalise their fields in __post_init__
    object.__setattr__(obj, name, value)


def dataset_key(name: str) -> str:
    """The canonical dataset name (``FashionMNIST`` -> ``fashion-mnist``); ValueError when unknown."""
    key = str(name).lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    return key


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is split (where it lives on disk is not part of a run's identity)."""

    name: str = "fashion-mnist"
    val_size: int | None = None  # images held out of the training set (None: 5000; synthetic: its own)
    split_seed: int = 0  # the validation split is the same for every run seed
    train_subset: int | None = None  # train on the first N images of the training split (quick runs)
    synthetic: dict | None = None  # SyntheticConfig fields, every one (dataset "synthetic" only)

    def __post_init__(self):
        _set(self, "name", dataset_key(self.name))
        _whole("val_size", self.val_size, 0, none_ok=True)
        _whole("split_seed", self.split_seed, 0)
        _whole("train_subset", self.train_subset, 1, none_ok=True)
        if self.name == "synthetic":
            syn = self.synthetic
            cfg = syn if isinstance(syn, SyntheticConfig) else SyntheticConfig(**(syn or {}))
            _set(self, "synthetic", dataclasses.asdict(cfg))  # every field, so defaults enter the hash
        elif self.synthetic is not None:
            raise ValueError("the synthetic config only applies to dataset 'synthetic'")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "wrn_10_1"  # wrn_<depth>_<width>
    dropout: float = 0.0

    def __post_init__(self):
        key = str(self.name).lower().replace("-", "_")
        m = _MODEL_NAME.match(key)
        if m is None:
            raise ValueError(f"unknown model {self.name!r}; use 'wrn_<depth>_<width>', e.g. wrn_10_1, wrn_16_4, "
                             "wrn_28_10")
        depth, width = int(m.group(1)), int(m.group(2))
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise ValueError(f"model {self.name!r}: WRN depth must be 6n+4 >= 10 and width >= 1")
        _set(self, "name", key)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _set(self, "dropout", float(self.dropout))

    def build(self, num_classes: int, in_channels: int) -> WideResNet:
        return create_model(self.name, num_classes=num_classes, in_channels=in_channels, dropout=self.dropout)


@dataclass(frozen=True)
class SearchConfig:
    """The Weedout phase (the paper: a population of 100 for 5 generations, fitness -loss)."""

    population: int = 100
    generations: int = 5
    batch_size: int | None = None  # validation images per generation (None: min(1000, validation size))
    metric: str = "loss"
    bn: str = "batch"
    engine: str = "auto"
    strategy: str = "random"

    def __post_init__(self):
        _whole("population", self.population, 1)
        _whole("generations", self.generations, 1)
        _whole("search batch_size", self.batch_size, 1, none_ok=True)
        for name, v, allowed in (("metric", self.metric, METRICS), ("bn", self.bn, BN_MODES),
                                 ("engine", self.engine, ENGINES), ("strategy", self.strategy, STRATEGIES)):
            if v not in allowed:
                raise ValueError(f"search {name} must be one of {list(allowed)}, got {v!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """:class:`fastweedout.training.TrainConfig` without ``seed`` (derived from the run's seed) and
    ``device`` (where a run executes is not what it is)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    masked: bool = False
    compile: bool | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    drop_last: bool = True
    eval_batch_size: int = 500

    def __post_init__(self):
        for f in ("lr", "momentum", "weight_decay", "label_smoothing"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{f} must be a number, got {v!r}")
            _set(self, f, float(v))  # 0 and 0.0 must hash alike
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        self.to_train_config(seed=0)  # TrainConfig validates the rest

    def to_train_config(self, seed: int, device: str | None = None) -> TrainConfig:
        return TrainConfig(seed=seed, device=device, **dataclasses.asdict(self))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's results. Its hash names the run's directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    arm: str = "weedout"  # weedout | random | dense | given
    sparsity: float = 0.5  # eta: the fraction of nodes switched off (0 for dense)
    mode: str | None = "layerwise"  # layerwise | global (None for dense and given masks)
    seed: int = 0  # initial weights, masks, data order
    search: SearchConfig | None = field(default_factory=SearchConfig)  # weedout only
    training: TrainingConfig | None = field(default_factory=TrainingConfig)  # None: the search alone
    mask_sha256: str | None = None  # given only: the digest of the mask file's masks
    version: int = PIPELINE_VERSION

    def __post_init__(self):
        if self.arm not in ALL_ARMS:
            raise ValueError(f"unknown arm {self.arm!r}; choose one of {list(ARMS)}")
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0 or math.isnan(s):
            raise ValueError(f"sparsity must be a number in [0, 1), got {s!r}")
        _set(self, "sparsity", float(s))
        _whole("seed", self.seed, 0)
        a = self.arm
        if a in ("weedout", "random"):
            if self.sparsity == 0.0:
                raise ValueError(f"arm {a!r} at sparsity 0 is the dense network: use arm 'dense'")
            if self.mode not in MODES:
                raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        elif self.mode is not None:
            raise ValueError(f"arm {a!r} takes no sparsity mode (mode=None)")
        if (a == "weedout") != (self.search is not None):
            raise ValueError("a search config belongs to the weedout arm only")
        if a == "dense" and self.sparsity != 0.0:
            raise ValueError("the dense arm has sparsity 0")
        if (a == "given") != (self.mask_sha256 is not None):
            raise ValueError("mask_sha256 belongs to the 'given' arm only (a mask from a file)")
        if self.training is None and a != "weedout":
            raise ValueError("only a weedout run can be a search alone (training=None)")
        if not isinstance(self.data, DataConfig) or not isinstance(self.model, ModelConfig):
            raise ValueError("data and model must be DataConfig and ModelConfig")

    @property
    def hash(self) -> str:
        return runs.config_hash(self)

    @property
    def name(self) -> str:
        """Human-readable prefix of the run directory's name (the hash makes it unique)."""
        parts = [self.data.name, self.model.name, self.arm]
        if self.arm != "dense":
            parts.append(f"eta{self.sparsity:g}")
        parts.append(f"seed{self.seed}")
        if self.training is None:
            parts.append("search")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return runs.to_jsonable(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunConfig":
        """Inverse of :meth:`to_dict` (config.json); unknown fields are an error."""
        d = dict(d)

        def sub(klass, value):
            if value is None:
                return None
            if not isinstance(value, Mapping):
                raise ValueError(f"{klass.__name__} must be a JSON object, got {value!r}")
            names = {f.name for f in dataclasses.fields(klass)}
            extra = set(value) - names
            if extra:
                raise ValueError(f"unknown {klass.__name__} fields {sorted(extra)}")
            return klass(**value)

        extra = set(d) - {f.name for f in dataclasses.fields(cls)}
        if extra:
            raise ValueError(f"unknown RunConfig fields {sorted(extra)}")
        for key, klass in (("data", DataConfig), ("model", ModelConfig), ("search", SearchConfig),
                           ("training", TrainingConfig)):
            if key in d:
                d[key] = sub(klass, d[key])
        return cls(**d)


def make_run_config(arm: str, sparsity: float, *, data: DataConfig, model: ModelConfig, seed: int = 0,
                    mode: str = "layerwise", search: SearchConfig | None = None,
                    training: TrainingConfig | None = None) -> RunConfig:
    """A normalised config: sparsity 0 is the dense network whatever the arm; only weedout keeps a
    search config and only masked arms keep a mode, so equal experiments hash alike."""
    if arm not in ARMS + ("dense",):
        raise ValueError(f"unknown arm {arm!r}; choose one of {list(ARMS)}")
    if arm == "dense" and sparsity != 0:
        raise ValueError("the dense arm has sparsity 0")
    if sparsity == 0:
        return RunConfig(data=data, model=model, arm="dense", sparsity=0.0, mode=None, seed=seed, search=None,
                         training=training)
    return RunConfig(data=data, model=model, arm=arm, sparsity=sparsity, mode=mode, seed=seed,
                     search=(search or SearchConfig()) if arm == "weedout" else None, training=training)


def derive_seed(seed: int, purpose: str) -> int:
    """Independent 31-bit seeds for the initial weights, the masks and the training of one run seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:4], "big") >> 1


def mask_digest(masks: Masks) -> str:
    h = hashlib.sha256()
    for name, m in masks.items():
        h.update(name.encode() + b"\0" + repr(tuple(m.shape)).encode() + b"\0")
        h.update(m.to(torch.uint8).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ runtime
@dataclass
class Runtime:
    """Where and how runs execute; none of it enters a run's identity."""

    data_root: str | None = None
    download: bool = False
    device: str | None = None  # None: CUDA when available, else CPU
    chunk_size: int | None = None  # search: members scored at once (None: what fits)
    progress: bool = True

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {self.device!r} (use cpu, cuda or cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available here")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: only cpu and cuda are supported")
        return dev


def set_deterministic() -> None:
    """Ask for deterministic kernels (``fastweedout ... --deterministic``): run-to-run bitwise equal
    results on the same GPU and software, at some speed cost. CPU runs are deterministic without it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS: fixed workspace, fixed reduction order
    os.environ["FASTWEEDOUT_AUTOTUNE"] = "0"  # Triton conv: the heuristic block sizes, not the fastest-timed ones
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def load_data(cfg: DataConfig, runtime: Runtime | None = None) -> Dataset:
    """The dataset of a config, on the runtime's device, its training split cut to ``train_subset``."""
    runtime = runtime or Runtime()
    data = load_dataset(cfg.name, root=runtime.data_root, val_size=cfg.val_size, seed=cfg.split_seed,
                        download=runtime.download, synthetic=cfg.synthetic)
    if cfg.train_subset is not None:
        n = len(data.train)
        if cfg.train_subset > n:
            raise ValueError(f"train_subset {cfg.train_subset} exceeds the {n} images of the training split")
        data = replace(data, train=data.train.subset(torch.arange(cfg.train_subset)))
    return data.to(runtime.resolved_device())


def check_against_data(cfg: RunConfig, data: Dataset) -> None:
    """What can only be checked once the data is known (before any run directory is written)."""
    if cfg.search is not None and cfg.search.batch_size is not None and cfg.search.batch_size > len(data.val):
        raise ValueError(f"search batch size {cfg.search.batch_size} exceeds the validation split's "
                         f"{len(data.val)} images")
    if cfg.search is not None and len(data.val) == 0:
        raise ValueError("the search needs a validation split (val_size > 0)")
    if cfg.training is not None and cfg.training.drop_last and len(data.train) < cfg.training.batch_size:
        raise ValueError(f"the training split has {len(data.train)} images, fewer than one batch of "
                         f"{cfg.training.batch_size}")


def build_model(cfg: RunConfig, data: Dataset, device: torch.device | None = None) -> WideResNet:
    """The run's initial (He-normal) network; every arm of one seed gets the same weights."""
    model = cfg.model.build(num_classes=data.num_classes, in_channels=data.in_channels)
    model.reset_parameters(torch.Generator().manual_seed(derive_seed(cfg.seed, "init")))
    return model.to(device) if device is not None else model


def normalized_val(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split as the search scores it: float, normalised exactly as the loader does."""
    loader = DeviceLoader(data.val, 1, mean=data.mean, std=data.std)
    return loader.normalize(data.val.images), data.val.labels


# ------------------------------------------------------------------------------------ one run
@dataclass
class RunOutcome:
    path: str
    config: RunConfig
    summary: dict  # the done-marker's content
    skipped: bool  # it was already complete before this call


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _loads(path: str) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:
        return False


def _set_aside(path: str, why: str) -> None:
    dst = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(dst):  # never overwrite an earlier one: it may be the evidence someone needs
        dst = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    os.replace(path, dst)
    _warn(f"{path} {why}; moved to {dst}")


@torch.no_grad()
def evaluate_at_init(model: WideResNet, masks: Masks, images: torch.Tensor, labels: torch.Tensor,
                     bn: str = "batch") -> dict:
    """Validation loss and accuracy of one mask before any training (the search's signal), over
    the first :data:`INIT_EVAL_IMAGES` images in BN batches of :data:`INIT_EVAL_BATCH`."""
    n = min(len(labels), INIT_EVAL_IMAGES)
    b = min(INIT_EVAL_BATCH, n)
    if n == 0:
        return dict(init_val_loss=None, init_val_acc=None, init_eval_images=0, init_bn=bn)
    masks = masks.to("cpu")
    engine = auto_engine(masks, images.device)
    loss_sum = correct = 0.0
    seen = 0
    for start in range(0, n - b + 1, b):  # whole batches only: BN statistics of a few images are noise
        x, y = images[start:start + b], labels[start:start + b]
        logits = population_logits(model, masks, x, engine, bn)[0].float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        seen += y.shape[0]
    loss = loss_sum / seen
    return dict(init_val_loss=loss if math.isfinite(loss) else None, init_val_acc=correct / seen,
                init_eval_images=seen, init_bn=bn)


def _obtain_mask(rd: RunDir, cfg: RunConfig, model: WideResNet, data: Dataset, runtime: Runtime,
                 given: Masks | None) -> tuple[Masks, dict]:
    """The mask to train, from mask.pt when an earlier attempt got that far, else computed (and
    saved, last); returns it with its metadata (search summary, pre-training score)."""
    layers = model.node_layers()
    if os.path.exists(rd.mask_path):
        try:
            m = Masks.load(rd.mask_path, layers)
            if m.meta.get("config_hash") == cfg.hash and m.population == 1:
                return m, m.meta
            _warn(f"{rd.mask_path} belongs to another run")
        except (ValueError, OSError) as e:
            _warn(f"{rd.mask_path} is unreadable ({e})")
        _set_aside(rd.mask_path, "was not this run's mask")

    search_summary = None
    vx, vy = normalized_val(data)
    if cfg.arm == "weedout":
        s = cfg.search
        ck = rd.search_checkpoint
        if os.path.exists(ck) and not _loads(ck):  # a search restarted from scratch gives the same result
            _set_aside(ck, "is unreadable")
        res = random_search(model, vx, vy, population=s.population, generations=s.generations,
                            sparsity=cfg.sparsity, mode=cfg.mode, batch_size=s.batch_size, metric=s.metric,
                            bn=s.bn, engine=s.engine, seed=derive_seed(cfg.seed, "mask"), strategy=s.strategy,
                            chunk_size=runtime.chunk_size, checkpoint=ck, progress=runtime.progress,
                            distributed=False)  # a run is one rank's: never shard its search over the grid's ranks
        mask = res.winner
        search_summary = res.summary()
    elif cfg.arm == "random":
        mask = random_mask(model, cfg.sparsity, cfg.mode, seed=derive_seed(cfg.seed, "mask"))
    elif cfg.arm == "dense":
        mask = sample_masks(model, 1, 0.0)  # every node live
    else:
        if given is None or mask_digest(given) != cfg.mask_sha256:
            raise ValueError("the 'given' arm needs the mask whose digest is in its config")
        mask = given
    bn = cfg.search.bn if cfg.search is not None else "batch"
    meta = dict(config_hash=cfg.hash, arm=cfg.arm, seed=cfg.seed, model=cfg.model.name,
                model_config=dict(runs.to_jsonable(cfg.model), in_channels=model.in_channels,
                                  num_classes=model.num_classes),
                dataset=cfg.data.name, node_layers=dict(layers), search=search_summary,
                init=evaluate_at_init(model, mask, vx, vy, bn))
    mask.save(rd.mask_path, **meta)
    return mask, meta


def _mask_records(cfg: RunConfig, model: WideResNet, mask: Masks, meta: dict, image_size: int) -> list[dict]:
    s = meta.get("search")
    if s is not None:
        search = dict(type="phase", phase="search", wall_s=s["wall_time_s"], flops=s["flops_useful"],
                      flops_executed=s["flops_executed"], engine=s["engine"], chunk_size=s["chunk_size"],
                      population=s["population"], generations=s["generations"], best_fitness=s["best_fitness"],
                      mean_fitness=s["mean_fitness"], elite_index=s["elite_index"], fitness=s["fitness"],
                      flops_convention=s.get("flops_convention"))
    else:  # the control and the dense parent spend nothing on search
        search = dict(type="phase", phase="search", wall_s=0.0, flops=0, flops_executed=0)
    live = {k: int(v.sum()) for k, v in mask.items()}
    pruned = model.prune(mask.member(0))
    info = dict(type="mask", arm=cfg.arm, sparsity=mask.sparsity(), live=live,
                params=sum(p.numel() for p in pruned.parameters()),
                forward_flops=forward_flops(pruned, image_size), **meta["init"])
    return [search, info]


def _train_checkpoint_ready(train_dir: str) -> None:
    """A training checkpoint that does not load is set aside and the copy of the last good one takes
    its place (or training restarts from scratch when there is none): never a crash on resume."""
    ck = os.path.join(train_dir, CHECKPOINT_NAME)
    prev = os.path.join(train_dir, PREV_CHECKPOINT)
    if os.path.exists(ck) and not _loads(ck):
        _set_aside(ck, "is unreadable")
        if os.path.exists(prev) and _loads(prev):
            runs.atomic_copy(prev, ck)
            _warn(f"resuming from the previous good checkpoint {prev}")
    elif not os.path.exists(ck) and os.path.exists(prev) and _loads(prev):
        runs.atomic_copy(prev, ck)


def _epoch_record(rec) -> dict:
    return dict(type="epoch", **rec.to_dict())


def environment(device: torch.device) -> dict:
    env = dict(device=str(device), torch=torch.__version__, python=platform.python_version(),
               platform=platform.platform(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def execute_run(cfg: RunConfig, results: str | os.PathLike, runtime: Runtime | None = None, *,
                data: Dataset | None = None, given_mask: Masks | None = None) -> RunOutcome:
    """Run one config in its directory under ``results``: skipped when done, resumed when interrupted.

    Order of writes (each atomic): config.json, search checkpoints, mask.pt, results.jsonl records,
    training checkpoints with per-epoch records, the final records, and the ``done`` marker last.
    Raises :class:`fastweedout.training.TrainingDiverged` on a NaN loss (the last good checkpoint stays).
    """
    runtime = runtime or Runtime()
    device = runtime.resolved_device()
    path = os.path.join(os.fspath(results), runs.run_dir_name(cfg.name, cfg))
    if os.path.exists(os.path.join(path, runs.DONE_NAME)):
        rd = RunDir.open(results, cfg.name, cfg)  # verifies its config
        return RunOutcome(rd.path, cfg, rd.done_summary(), skipped=True)
    # Bad data or a config that does not fit it fails here, before a run directory is written.
    if data is None:
        data = load_data(cfg.data, runtime)
    elif data.device != device:
        data = data.to(device)
    check_against_data(cfg, data)
    rd = RunDir.open(results, cfg.name, cfg)
    with rd:
        if rd.is_done():  # finished by another process meanwhile
            return RunOutcome(rd.path, cfg, rd.done_summary(), skipped=True)
        rd.remove_temporaries()  # left by a kill mid-write; safe, since we hold the run's lock
        try:
            rd.records()
        except RunError as e:  # every record is re-derived below from the checkpoints and mask.pt
            _set_aside(rd.results_path, f"is corrupt ({e})")
        model = build_model(cfg, data, device)
        mask, meta = _obtain_mask(rd, cfg, model, data, runtime, given_mask)
        rd.upsert(*_mask_records(cfg, model, mask, meta, data.image_size))
        env = environment(device)
        summary = dict(config_hash=cfg.hash, name=rd.name, arm=cfg.arm, sparsity=cfg.sparsity, mode=cfg.mode,
                       seed=cfg.seed, dataset=cfg.data.name, model=cfg.model.name, environment=env,
                       search=strip_search(meta.get("search")), init=meta["init"],
                       mask_sparsity=mask.sparsity())
        if cfg.training is None:  # the search alone: its full summary beside the mask
            runs.atomic_write_json(rd.file("summary.json"), runs.clean_json(dict(meta["search"], init=meta["init"])))
            summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            rd.mark_done(summary)
            return RunOutcome(rd.path, cfg, summary, skipped=False)

        _train_checkpoint_ready(rd.train_dir)
        tcfg = cfg.training.to_train_config(seed=derive_seed(cfg.seed, "train"), device=str(device))

        def on_epoch(rec):
            # train() has just written this epoch's checkpoint: keep a copy as the fallback, then log.
            ck = os.path.join(rd.train_dir, CHECKPOINT_NAME)
            if os.path.exists(ck):
                runs.atomic_copy(ck, os.path.join(rd.train_dir, PREV_CHECKPOINT))
            rd.upsert(_epoch_record(rec))

        try:
            result = train(model, None if cfg.arm == "dense" else mask.member(0), data, tcfg,
                           checkpoint_dir=rd.train_dir, on_epoch=on_epoch, progress=runtime.progress)
        except TrainingDiverged as e:
            rd.upsert(dict(type="error", phase="training", error=str(e), epoch=None))
            raise
        final = result.final
        rd.upsert(*[_epoch_record(r) for r in result.records],
                  *[dict(type="phase", phase=k, **v.to_dict()) for k, v in result.phases.items()],
                  dict(type="final", epochs=final.epoch, train_acc=final.train_acc, test_acc=final.test_acc,
                       train_loss=final.train_loss, test_loss=final.test_loss, params=result.params,
                       live_params=result.live_params, forward_flops=result.forward_flops,
                       train_step_flops=result.train_step_flops, live_forward_flops=result.live_forward_flops))
        summary.update(final=final.to_dict(), phases={k: v.to_dict() for k, v in result.phases.items()},
                       params=result.params, live_params=result.live_params,
                       finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        rd.mark_done(summary)
        return RunOutcome(rd.path, cfg, summary, skipped=False)


def strip_search(s: dict | None) -> dict | None:
    """A search summary without the per-member fitness matrix (that stays in results.jsonl)."""
    if s is None:
        return None
    return {k: v for k, v in s.items() if k != "fitness"}


# ------------------------------------------------------------------------------------ the grid
def grid_configs(*, data: DataConfig, model: ModelConfig, search: SearchConfig, training: TrainingConfig,
                 sparsities: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8), arms: Sequence[str] = ARMS,
                 seeds: Sequence[int] = (0, 1, 2), mode: str = "layerwise") -> list[RunConfig]:
    """The paper's grid, seed by seed (so early seeds complete the whole picture first): every
    sparsity for every arm, except sparsity 0, the dense network, which runs once per seed."""
    if not sparsities or not arms or not seeds:
        raise ValueError("the grid needs at least one sparsity, one arm and one seed")
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"unknown arm {a!r}; choose from {list(ARMS)}")
    out: list[RunConfig] = []
    seen: set[str] = set()
    for seed in seeds:
        for eta in sparsities:
            for arm in arms:
                c = make_run_config(arm, eta, data=data, model=model, seed=seed, mode=mode, search=search,
                                    training=training)
                if c.hash not in seen:
                    seen.add(c.hash)
                    out.append(c)
    return out


@dataclass
class GridOutcome:
    outcomes: list[RunOutcome]
    failures: list[tuple[RunConfig, str]]  # runs that stopped with an error (e.g. a diverged training)
    # Distributed grid (under torchrun/srun): this rank's place, and the runs it left to other ranks
    # (held by a live rank when it came to them). Every count here is this rank's own.
    rank: int = 0
    world_size: int = 1
    elsewhere: list[RunConfig] = field(default_factory=list)

    @property
    def ran(self) -> int:
        return sum(not o.skipped for o in self.outcomes)

    @property
    def skipped(self) -> int:
        return sum(o.skipped for o in self.outcomes)


def precheck_results(results: str | os.PathLike) -> None:
    """Check an existing results directory (a file, unwritable, tampered runs) before the slow
    data loading; a missing one is created only once the rest of the input has been checked."""
    if os.path.lexists(results):
        runs.check_results_dir(results)


def run_grid(configs: Sequence[RunConfig], results: str | os.PathLike, runtime: Runtime | None = None,
             *, on_run: Callable[[RunOutcome], None] | None = None) -> GridOutcome:
    """Run every config (finished ones are skipped). Data is loaded once per data config and
    checked against every config before the first run directory is written."""
    runtime = runtime or Runtime()
    precheck_results(results)
    cache: dict[str, Dataset] = {}
    for c in configs:
        key = runs.canonical_json(c.data)
        if key not in cache:
            cache[key] = load_data(c.data, runtime)
        check_against_data(c, cache[key])
    runs.check_results_dir(results)  # creates it, now that the input is known to be good
    outcomes: list[RunOutcome] = []
    failures: list[tuple[RunConfig, str]] = []
    elsewhere: list[RunConfig] = []
    from tqdm.auto import tqdm

    # --- distributed grid (fastweedout.distributed): under torchrun/srun each rank takes whole runs.
    rank, world = distributed.world()
    if world > 1:
        configs = distributed.grid_for_rank(list(configs), rank, world)  # own share first, then steal
        if runtime.resolved_device().type == "cuda":
            torch.cuda.set_device(distributed.local_rank())  # one GPU per rank
    # --- end distributed grid
    bar = tqdm(configs, desc="runs", unit="run", disable=not runtime.progress, file=sys.stderr)
    for c in bar:
        bar.set_postfix_str(c.name)
        try:
            # --- distributed grid: run only what this rank claims (released after the run, also on errors)
            if world > 1:
                path = RunDir.open(results, c.name, c).path
                with distributed.claimed(path) as mine:
                    if not mine and not os.path.exists(os.path.join(path, runs.DONE_NAME)):
                        elsewhere.append(c)
                        continue  # being run by a live rank
                    out = execute_run(c, results, runtime, data=cache[runs.canonical_json(c.data)])
            else:  # --- end distributed grid
                out = execute_run(c, results, runtime, data=cache[runs.canonical_json(c.data)])
        except TrainingDiverged as e:
            failures.append((c, str(e)))
            continue
        outcomes.append(out)
        if on_run is not None:
            on_run(out)
    return GridOutcome(outcomes, failures, rank=rank, world_size=world, elsewhere=elsewhere)


def read_mask_file(path: str | os.PathLike) -> Masks:
    """A mask file for ``train --mask``: one member, readable (its fit to the model is checked later)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"mask file {path} does not exist")
    m = Masks.load(path)
    if m.population != 1:
        raise ValueError(f"{path} holds a population of {m.population} masks; train takes one")
    return m


def given_config(mask: Masks, *, data: DataConfig, model: ModelConfig, seed: int,
                 training: TrainingConfig) -> RunConfig:
    return RunConfig(data=data, model=model, arm="given", sparsity=mask.sparsity(), mode=None, seed=seed,
                     search=None, training=training, mask_sha256=mask_digest(mask))


def check_mask_fits(mask: Masks, cfg: RunConfig, data: Dataset, path: str) -> None:
    with torch.device("meta"):  # only the shapes matter: no memory, no initialisation cost
        layers = cfg.model.build(num_classes=data.num_classes, in_channels=data.in_channels).node_layers()
    try:
        mask.check(layers)
    except ValueError as e:
        raise ValueError(f"mask file {path} does not fit model {cfg.model.name}: {e}") from None


__all__ = ["ALL_ARMS", "ARMS", "DataConfig", "GridOutcome", "ModelConfig", "RunConfig", "RunOutcome", "Runtime",
           "SearchConfig", "TrainingConfig", "build_model", "check_against_data", "check_mask_fits",
           "dataset_key", "derive_seed", "evaluate_at_init", "execute_run", "given_config", "grid_configs",
           "load_data", "make_run_config", "mask_digest", "precheck_results", "normalized_val", "read_mask_file", "run_grid",
           "set_deterministic"]
