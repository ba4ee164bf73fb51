"""Every configuration of a run, declared once (default, help, range, choices per field).

A run is a pure function of its :class:`RunConfig`: its canonical JSON (every field, defaults
included) is hashed into the run directory's name (``fastweedout.experiment.runs``). The command-line flags are
generated from these fields (``fastweedout.flags``); :class:`Runtime` holds what does not change a
run's results (paths, device, progress bars) and never enters the hash.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fastweedout.data.datasets import DATASETS, SyntheticConfig, dataset_key
from fastweedout.engines.registry import all_engine_names, engine_names
from fastweedout.engines.scoring import METRICS
from fastweedout.experiment import structure
from fastweedout.experiment.runs import config_hash, to_jsonable
from fastweedout.fields import check, opt
from fastweedout.masks import MODES
from fastweedout.model.backend import BN_MODES
from fastweedout.model.wrn import WideResNet, parse_model_name
from fastweedout.search.prune_methods import METHOD_NAMES
from fastweedout.search.strategies import STRATEGY_NAMES
from fastweedout.spaces.registry import SPACES

ENGINES_OF = {s: engine_names(s) for s in SPACES}  # mask space -> its engines (auto first)
ENGINES, WEIGHT_ENGINES = ENGINES_OF["node"], ENGINES_OF["weight"]
_ENGINE_HELP = "; ".join(f"{', '.join(e)} for {s} masks" for s, e in ENGINES_OF.items())
STRATEGIES = STRATEGY_NAMES  # the registry's: fastweedout.search.strategies
SCHEDULES = ("cosine", "step")
GRANULARITIES = tuple(SPACES)
PRUNE_METHODS = METHOD_NAMES  # the registry's: fastweedout.search.prune_methods
#: dense: the unmasked parent; given: a mask from a file; throughout: the search runs during training.
ARMS = ("weedout", "random", "dense", "given", "throughout") + PRUNE_METHODS
GRID_ARMS = tuple(a for a in ARMS if a != "given")
SEARCH_ARMS = ("weedout", "throughout")
PIPELINE_VERSION = 2  # enters every hash: bump when the same config would give different results


def _model_name(name: str) -> str:
    depth, width = parse_model_name(name)
    return f"wrn_{depth}_{width}"


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is split (where it lives on disk is a :class:`Runtime` matter)."""

    name: str = opt("fashion-mnist", "dataset: " + ", ".join(DATASETS), flag="--dataset", normalize=dataset_key,
                    choices=DATASETS, metavar="NAME")
    val_size: int | None = opt(None, "images held out of the training set for the search and the before-"
                               "training evaluation (default 5000; synthetic: its own)", min=0)
    split_seed: int = opt(0, "seed of the validation hold-out (the same for every run seed)", min=0)
    train_subset: int | None = opt(None, "train on the first N images of the training split (quick runs)", min=1,
                                   metavar="N")
    synthetic: dict | None = opt(None, "SyntheticConfig fields (dataset 'synthetic' only)", cli=False)

    def __post_init__(self):
        check(self)
        if self.name == "synthetic":
            syn = self.synthetic
            cfg = syn if isinstance(syn, SyntheticConfig) else SyntheticConfig(**(syn or {}))
            object.__setattr__(self, "synthetic", dataclasses.asdict(cfg))  # every field enters the hash
        elif self.synthetic is not None:
            raise ValueError("the synthetic config only applies to dataset 'synthetic'")


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("wrn_10_1", "wrn_<depth>_<width>, e.g. wrn_10_1, wrn_16_4, wrn_28_10", flag="--model",
                    normalize=_model_name, metavar="NAME")
    dropout: float = opt(0.0, "dropout between the two convolutions of each block", min=0.0, max=1.0, max_open=True)

    def __post_init__(self):
        check(self)

    def build(self, num_classes: int, in_channels: int):
        """The (He-normal initialised) network of this config."""
        depth, width = parse_model_name(self.name)
        return WideResNet(depth, width, num_classes=num_classes, in_channels=in_channels, dropout=self.dropout)


@dataclass(frozen=True)
class SearchConfig:
    """The Weedout phase (the paper: a population of 100 for 5 generations, fitness -loss)."""

    population: int = opt(100, "masks per generation", min=1)
    generations: int = opt(5, "generations (each scores the population on a fresh validation batch)", min=1)
    batch_size: int | None = opt(None, "validation images per generation (default: min(1000, the search's "
                                 "share of the validation split))", min=1, flag="--search-batch", metavar="B")
    metric: str = opt("loss", "fitness: -loss (the paper's choice) or accuracy", choices=METRICS)
    bn: str = opt("batch", "BN statistics while scoring: each member's own batch, or the running ones",
                  choices=BN_MODES)
    engine: str = opt("auto", "scoring engine: " + _ENGINE_HELP, choices=all_engine_names())
    strategy: str = opt("random", "random (the paper: elite + fresh random masks), tournament (elite + mutated "
                        "binary-tournament winners) or evolution (elite + mutated members of the top 20%%)",
                        choices=STRATEGIES)
    mutation_rate: float = opt(0.1, "tournament/evolution: fraction of each node set's off nodes swapped",
                               min=0.0, max=1.0, min_open=True)
    member_steps: int = opt(0, "train every member K SGD steps (its pruned network, from the parent's weights) "
                            "before scoring it; 0 scores the weights as they are (the paper)", min=0, metavar="K")
    member_lr: float = opt(0.05, "learning rate of the member steps (SGD, momentum 0.9, no weight decay)",
                           min=0.0, min_open=True)
    member_batch: int = opt(128, "training images per member step", min=1)

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class PruneConfig:
    """Pruning at initialisation (l1, snip, grasp, synflow), scored on the parent's weights."""

    batch_size: int = opt(1000, "validation images that snip and grasp score on", min=1, flag="--prune-batch")
    iterations: int = opt(100, "synflow: rounds of the iterative schedule", min=1, flag="--synflow-iterations")
    temperature: float = opt(200.0, "grasp: temperature of the logits", min=0.0, min_open=True,
                             flag="--grasp-temperature")
    bn: str = opt("batch", "BN statistics for snip and grasp", choices=BN_MODES, flag="--prune-bn")

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class ThroughoutConfig:
    """Weedout throughout training: the population evolves while the weights train."""

    interval: int = opt(100, "SGD steps between scorings of the population (then elite + refill)", min=1,
                        flag="--search-interval")
    mask_every: int = opt(1, "SGD steps between switching the training mask to another member", min=1)
    finetune_epochs: int = opt(0, "epochs of training the pruned winner after the search ends", min=0)

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class TrainConfig:
    """SGD training. ``None`` for compile / amp / channels_last: on when on CUDA."""

    epochs: int = opt(200, "epochs", min=1)
    batch_size: int = opt(128, "training batch size", min=1)
    lr: float = opt(0.1, "learning rate", min=0.0, min_open=True)
    momentum: float = opt(0.9, "SGD momentum", min=0.0, max=1.0, max_open=True)
    nesterov: bool = opt(True, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "weight decay", min=0.0)
    schedule: str = opt("cosine", "cosine (per step, to 0) or step (x0.2 at 30/60/80%% of the epochs)",
                        choices=SCHEDULES)
    label_smoothing: float = opt(0.0, "label smoothing", min=0.0, max=1.0, max_open=True)
    masked: bool = opt(False, "train the full network under its mask instead of the pruned one (same function)",
                       flag="--masked-training")
    compile: bool | None = opt(None, "torch.compile the network (default: on CUDA)")
    amp: bool | None = opt(None, "bf16 autocast (default: on CUDA)")
    channels_last: bool | None = opt(None, "channels_last memory format (default: on CUDA)")
    drop_last: bool = opt(True, "drop the last partial batch (fixed shapes, no tiny BN batch)")
    eval_batch_size: int = opt(500, "test images per evaluation batch", min=1)

    def __post_init__(self):
        check(self)
        if self.nesterov and self.momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0 (pass --no-nesterov)")

    def resolved(self, device) -> dict:
        """The device-dependent switches as they apply on ``device``."""
        cuda = device.type == "cuda"
        pick = lambda v: cuda if v is None else bool(v)
        return dict(compile=pick(self.compile), amp=pick(self.amp), channels_last=pick(self.channels_last))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's results. Its hash names the run's directory."""

    data: DataConfig = opt(default_factory=DataConfig, help="data", cli=False)
    model: ModelConfig = opt(default_factory=ModelConfig, help="model", cli=False)
    arm: str = opt("weedout", "how the mask is chosen: " + ", ".join(ARMS), choices=ARMS)
    sparsity: float = opt(0.5, "eta: the fraction of nodes (or weights) switched off; 0 is the dense network",
                          min=0.0, max=1.0, max_open=True)
    mode: str | None = opt("layerwise", "layerwise (the paper: eta of every layer) or global (eta of all)",
                           choices=MODES)
    granularity: str = opt("node", "node (channels, structured) or weight (unstructured)", choices=GRANULARITIES)
    seed: int = opt(0, "initial weights, masks and data order", min=0)
    pretrain_steps: int = opt(0, "dense SGD steps before the mask is chosen (Weedout after limited training)",
                              min=0, metavar="K")
    rewind: bool = opt(False, "train the chosen mask from the initial weights instead of the step-K weights")
    reinit: bool = opt(False, "structure alone: train the chosen mask from freshly drawn weights (their seed derived "
                       "from the run's, recorded)", omit_default=True)
    shuffle: bool = opt(False, "structure control: keep the chosen mask's live count per node set, draw which nodes "
                        "at random (meaningful for global masks and per-layer schedules)", omit_default=True)
    search: SearchConfig | None = opt(None, "the search (weedout, throughout)", cli=False)
    prune: PruneConfig | None = opt(None, "pruning at initialisation (l1, snip, grasp, synflow)", cli=False)
    throughout: ThroughoutConfig | None = opt(None, "search during training (throughout)", cli=False)
    training: TrainConfig | None = opt(default_factory=TrainConfig, help="training (None: the search alone)",
                                       cli=False)
    mask_sha256: str | None = opt(None, "given: the digest of the mask file's masks", cli=False)
    version: int = opt(PIPELINE_VERSION, "pipeline version", cli=False)

    def __post_init__(self):
        check(self)
        a = self.arm
        if math.isnan(self.sparsity):
            raise ValueError("sparsity must be a number in [0, 1)")
        if a in ("dense", "given"):
            if self.mode is not None or (a == "dense" and self.sparsity != 0.0):
                raise ValueError(f"arm {a!r} takes no sparsity mode and (dense) sparsity 0")
        else:
            if self.sparsity == 0.0:
                raise ValueError(f"arm {a!r} at sparsity 0 is the dense network: use arm 'dense'")
            if self.mode is None:
                raise ValueError(f"arm {a!r} needs a sparsity mode ({', '.join(MODES)})")
        for name, cls, arms in (("search", SearchConfig, SEARCH_ARMS), ("prune", PruneConfig, PRUNE_METHODS),
                                ("throughout", ThroughoutConfig, ("throughout",))):
            v = getattr(self, name)
            if (a in arms) != (v is not None):
                raise ValueError(f"a {name} config belongs to the arm(s) {list(arms)} only (arm {a!r})")
            if v is not None and not isinstance(v, cls):
                raise ValueError(f"{name} must be a {cls.__name__}")
        if self.search is not None:
            engines = ENGINES_OF[self.granularity]
            if self.search.engine not in engines:
                raise ValueError(f"{self.granularity} masks are scored by the engines {list(engines)}, "
                                 f"not {self.search.engine!r}")
        if self.granularity == "weight" and a not in ("weedout", "random"):
            raise ValueError(f"weight granularity is supported by the weedout and random arms, not {a!r}")
        if a == "throughout" and (self.pretrain_steps or self.rewind):
            raise ValueError("the throughout arm trains from the start: no pretrain_steps or rewind")
        structure.check(self)
        if self.rewind and not self.pretrain_steps:
            raise ValueError("rewind needs pretrain_steps > 0 (without them the weights are the initial ones)")
        if (a == "given") != (self.mask_sha256 is not None):
            raise ValueError("mask_sha256 belongs to the 'given' arm only (a mask from a file)")
        if self.training is None and a not in ("weedout", *PRUNE_METHODS):
            raise ValueError(f"only a mask-choosing arm can run without training (arm {a!r})")
        if self.training is not None and not isinstance(self.training, TrainConfig):
            raise ValueError("training must be a TrainConfig")
        if not isinstance(self.data, DataConfig) or not isinstance(self.model, ModelConfig):
            raise ValueError("data and model must be a DataConfig and a ModelConfig")

    @property
    def hash(self) -> str:
        """The run's identity: sha256 of the canonical JSON of the whole config (``fastweedout.experiment.runs``)."""
        return config_hash(self)

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @property
    def name(self) -> str:
        """Human-readable prefix of the run directory's name (the hash makes it unique)."""
        parts = [self.data.name, self.model.name, self.arm]
        if self.arm != "dense":
            parts.append(f"eta{self.sparsity:g}")
        if self.granularity != "node":
            parts.append(self.granularity)
        if self.pretrain_steps:
            parts.append(f"k{self.pretrain_steps}" + ("r" if self.rewind else ""))
        parts += [p for p, on in (("reinit", self.reinit), ("shuffled", self.shuffle)) if on]
        parts.append(f"seed{self.seed}")
        if self.training is None:
            parts.append("search")
        return "-".join(parts)

    @classmethod
    def from_dict(cls, d) -> RunConfig:
        """Inverse of the canonical JSON (config.json); unknown fields are an error."""
        subs = {"data": DataConfig, "model": ModelConfig, "search": SearchConfig, "prune": PruneConfig,
                "throughout": ThroughoutConfig, "training": TrainConfig}

        def build(klass, value):
            if not isinstance(value, dict):
                raise ValueError(f"{klass.__name__} must be a JSON object, got {value!r}")
            extra = set(value) - {f.name for f in dataclasses.fields(klass)}
            if extra:
                raise ValueError(f"unknown {klass.__name__} fields {sorted(extra)}")
            return klass(**value)

        d = dict(d)
        for k, klass in subs.items():
            if d.get(k) is not None:
                d[k] = build(klass, d[k])
        return build(cls, d)


def make_run_config(arm: str, sparsity: float, *, data: DataConfig | None = None, model: ModelConfig | None = None,
                    seed: int = 0, mode: str = "layerwise", granularity: str = "node", pretrain_steps: int = 0,
                    rewind: bool = False, search: SearchConfig | None = None, prune: PruneConfig | None = None,
                    throughout: ThroughoutConfig | None = None,
                    training: TrainConfig | None = TrainConfig(), reinit: bool = False,
                    shuffle: bool = False) -> RunConfig:
    """A normalised config, so that equal experiments hash alike: sparsity 0 is the dense network
    whatever the arm; each sub-config is kept only by the arms it applies to (the throughout arm
    trains from the start: it drops pretrain_steps and reinit; the dense arm drops reinit and shuffle, the
    random arm shuffle, so a grid with them keeps its dense and random controls). A dense run that
    rewinds, and a random run that rewinds or re-initialises, never use the step-K weights (a random
    mask is drawn from the seed alone): they are the runs without pretraining, not copies of them."""
    if arm not in GRID_ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {list(GRID_ARMS)}")
    base = dict(data=data or DataConfig(), model=model or ModelConfig(), seed=seed, training=training,
                pretrain_steps=pretrain_steps, rewind=rewind, reinit=reinit, shuffle=shuffle)
    if pretrain_steps and ((rewind and (sparsity == 0 or arm == "dense")) or (arm == "random" and (rewind or reinit))):
        base.update(pretrain_steps=0, rewind=False)
    if sparsity == 0 or arm == "dense":
        if sparsity != 0:
            raise ValueError("the dense arm has sparsity 0")
        return RunConfig(arm="dense", sparsity=0.0, mode=None, **dict(base, reinit=False, shuffle=False))
    if arm == "throughout":
        base.update(pretrain_steps=0, rewind=False, reinit=False)
    if arm in ("random", "throughout"):  # a shuffled random mask is a random mask: the grid's control
        base.update(shuffle=False)
    return RunConfig(arm=arm, sparsity=sparsity, mode=mode, granularity=granularity,
                     search=(search or SearchConfig()) if arm in SEARCH_ARMS else None,
                     prune=(prune or PruneConfig()) if arm in PRUNE_METHODS else None,
                     throughout=(throughout or ThroughoutConfig()) if arm == "throughout" else None, **base)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "search": SearchConfig, "prune": PruneConfig,
            "throughout": ThroughoutConfig, "training": TrainConfig}
_TOP = ("arm", "sparsity", "seed", "mode", "granularity", "pretrain_steps", "rewind", "reinit", "shuffle")


def build_run_config(values) -> RunConfig:
    """A normalised :class:`RunConfig` from field paths (``"sparsity"``, ``"search.population"``,
    ``"training.epochs"``, ...; ``"training": None`` for a run without training); what is not given
    takes its default. Unknown paths are a ValueError."""
    parts: dict[str, dict] = {k: {} for k in SECTIONS}
    top: dict = {}
    no_training = False
    for path, v in values.items():
        sec, _, name = path.partition(".")
        if name:
            if sec not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[sec])}:
                raise ValueError(f"unknown config field {path!r}")
            parts[sec][name] = v
        elif path == "training" and v is None:
            no_training = True
        elif path in _TOP:
            top[path] = v
        else:
            raise ValueError(f"unknown config field {path!r}")
    built = {k: cls(**parts[k]) for k, cls in SECTIONS.items()}
    return make_run_config(top.pop("arm", "weedout"), top.pop("sparsity", 0.5), data=built["data"],
                           model=built["model"], search=built["search"], prune=built["prune"],
                           throughout=built["throughout"], training=None if no_training else built["training"], **top)


@dataclass
class Runtime:
    """Where and how runs execute; none of it enters a run's identity."""

    results: str = opt("runs", "results directory; one sub-directory per run", metavar="DIR")
    data_root: str | None = opt(None, "dataset root (torchvision layout or a flat directory of IDX files); default: "
                                "$FASTWEEDOUT_DATA, ./data, and for Fashion-MNIST /usr/share/datasets/fashion-mnist",
                                metavar="DIR")
    download: bool = opt(False, "download the dataset through torchvision if it is missing")
    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda when available)")
    threads: int | None = opt(None, "CPU threads for torch (default: torch's choice)", min=1, max=1024)
    chunk_size: int | None = opt(None, "members scored at once (default: what fits in memory)", min=1)
    progress: bool = opt(True, "progress bars")
    deterministic: bool = opt(False, "deterministic GPU kernels (torch.use_deterministic_algorithms, cudnn."
                              "deterministic, no benchmark or autotuning; slower; CPU runs are deterministic anyway)")

    def __post_init__(self):
        check(self)


__all__ = ["ARMS", "DataConfig", "ENGINES", "GRANULARITIES", "GRID_ARMS", "METRICS", "ModelConfig", "PIPELINE_VERSION",
           "PRUNE_METHODS", "PruneConfig", "RunConfig", "Runtime", "SCHEDULES", "SEARCH_ARMS", "SECTIONS", "STRATEGIES",
           "SearchConfig", "ThroughoutConfig", "TrainConfig", "WEIGHT_ENGINES", "build_run_config", "make_run_config"]
