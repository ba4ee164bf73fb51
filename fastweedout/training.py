"""Training of a (sparse) Wide ResNet: SGD with Nesterov momentum, cosine or WRN step schedule.

By default the *pruned* network (``model.prune(mask)``: physically smaller, same function) is
trained; ``masked=True`` trains the full network under its mask instead, which computes the same
function and gives the same updates to the live weights. A checkpoint is written atomically after
every epoch and a later call with the same checkpoint directory resumes from it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Dataset, DeviceLoader
from .flops import forward_flops, train_step_flops
from .backend import MaskedBackend
from .model import WideResNet
from .atomic import atomic_torch_save

SCHEDULES = ("cosine", "step")
STEP_MILESTONES = (0.3, 0.6, 0.8)  # fractions of the epochs (WRN: 60/120/160 of 200)
STEP_GAMMA = 0.2
CHECKPOINT_NAME = "checkpoint.pt"
_FINITE_CHECK_EVERY = 25  # steps between loss checks: each one is a host sync on a GPU


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint (if any) is left in place."""

    def __init__(self, message: str, *, epoch: int, step: int, checkpoint: str | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


@dataclass
class TrainConfig:
    """SGD training settings. ``None`` for compile / amp / channels_last means: on when on CUDA."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" (per step, to 0) | "step" (x0.2 at 30/60/80% of the epochs)
    label_smoothing: float = 0.0
    masked: bool = False  # train the full network under its mask instead of the pruned one
    compile: bool | None = None
    amp: bool | None = None  # bf16 autocast
    channels_last: bool | None = None
    seed: int = 0  # data order, augmentation and dropout
    drop_last: bool = True  # fixed batch shapes (no recompiles, no tiny last batch in BN)
    eval_batch_size: int = 500
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self):
        def whole(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        whole("epochs", 1)
        whole("batch_size", 1)
        whole("eval_batch_size", 1)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def resolved(self, device: torch.device) -> dict:
        """The device-dependent switches as they apply on ``device``."""
        cuda = device.type == "cuda"
        pick = lambda v: cuda if v is None else bool(v)  # noqa: E731
        return dict(compile=pick(self.compile), amp=pick(self.amp), channels_last=pick(self.channels_last))


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    lr: float  # at the epoch's first step
    train_loss: float  # training objective (with label smoothing), mean over the epoch's steps
    train_acc: float  # on the augmented batches as trained, during the epoch
    test_loss: float  # plain cross-entropy, eval mode
    test_acc: float
    train_time_s: float
    eval_time_s: float
    wall_time_s: float  # since the start of this call (a resumed run restarts the clock)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhaseStats:
    """Compute spent in one phase: wall seconds, FLOPs (analytic), images processed."""

    wall_s: float = 0.0
    flops: float = 0.0
    images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    records: list[EpochRecord]
    phases: dict[str, PhaseStats]  # "training", "evaluation"
    model: nn.Module  # the trained network: the pruned WRN, or the full WRN when masked / dense
    mask: dict[str, Tensor] | None
    config: TrainConfig
    device: str
    forward_flops: int  # per image, of the network actually run
    train_step_flops: int  # per image, forward + backward of the network actually run
    live_forward_flops: int  # per image, of the live sub-network (equal unless masked training)
    params: int  # parameters of the network actually trained
    live_params: int
    completed: bool  # all config.epochs done (False when on_epoch stopped it)
    resumed_from: int  # epochs already done when this call started (0: fresh)

    @property
    def final(self) -> EpochRecord:
        if not self.records:
            raise ValueError("no epoch has been trained")
        return self.records[-1]

    def summary(self) -> dict:
        """JSON-friendly: everything but the model and the mask."""
        return dict(records=[r.to_dict() for r in self.records],
                    phases={k: v.to_dict() for k, v in self.phases.items()}, config=asdict(self.config),
                    device=self.device, forward_flops=self.forward_flops, train_step_flops=self.train_step_flops,
                    live_forward_flops=self.live_forward_flops, params=self.params, live_params=self.live_params,
                    completed=self.completed, resumed_from=self.resumed_from)


# ------------------------------------------------------------------------------------ pieces
class MaskedNet(nn.Module):
    """The full network under a fixed mask, validated once (so the forward has no data-dependent checks)."""

    def __init__(self, net: WideResNet, mask: Mapping[str, Tensor]):
        super().__init__()
        self.net = net
        fm = net.check_member_masks(mask)
        for i, (k, v) in enumerate(fm.items()):
            self.register_buffer(f"mask{i}", v)
        self._names = list(fm)

    def masks(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"mask{i}") for i, k in enumerate(self._names)}

    def forward(self, x: Tensor) -> Tensor:
        return self.net.walk(MaskedBackend(self.masks(), None, self.training), x)


def make_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD over every parameter (BN included, as in the WRN reference); the fused kernel on CUDA."""
    params = list(net.parameters())
    fused = all(p.is_cuda for p in params) or None  # one kernel for the whole update instead of many
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay, fused=fused)


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a given optimizer step (the schedules advance per step)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    milestones = [int(round(f * config.epochs)) for f in STEP_MILESTONES]
    return lambda step: STEP_GAMMA ** sum(step // steps_per_epoch >= m for m in milestones)


def make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config, steps_per_epoch))


def criterion(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy in fp32 (module-level so tests can inject a diverging loss)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction=reduction)


def _resolve_device(config: TrainConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _mask_cpu(mask) -> dict[str, Tensor] | None:
    if mask is None:
        return None
    if hasattr(mask, "population") and hasattr(mask, "member"):  # a Masks of one member
        if mask.population != 1:
            raise ValueError(f"train takes one member's mask; got a population of {mask.population}")
        mask = mask.member(0)
    return {k: v.detach().to("cpu", torch.bool) for k, v in mask.items()}


def _fingerprint(data: Dataset) -> int:
    """A cheap checksum of the training split (labels and a strided sample of images), so a checkpoint
    is never resumed on a different split of the data."""
    sample = data.train.images[::97].reshape(-1)[::7]
    return zlib.crc32(data.train.labels.cpu().numpy().tobytes()) ^ zlib.crc32(sample.cpu().numpy().tobytes())


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def prepare_network(model: WideResNet, mask, masked: bool, device: torch.device, channels_last: bool,
                    image_size) -> tuple:
    """The network actually trained, a copy (the caller's model stays as it was): the pruned network,
    the full one under its mask (``masked``), or the dense one. Returns ``(net, run_net, forward
    FLOPs, train-step FLOPs, live forward FLOPs, live parameters)``, FLOPs per image; ``run_net`` is
    what the forward calls (``net`` itself unless masked)."""
    if mask is None:
        net = copy.deepcopy(model)
        live = run_net = net
    elif masked:
        net = copy.deepcopy(model)
        run_net = MaskedNet(net, mask)
        live = model.prune(mask)
    else:
        net = model.prune(mask)
        live = run_net = net
    net.train()
    run_net.to(device)
    if channels_last:
        run_net.to(memory_format=torch.channels_last)
    return (net, run_net, forward_flops(net, image_size), train_step_flops(net, image_size),
            forward_flops(live, image_size), _count(live))


# ------------------------------------------------------------------------------------ train
def train(model: WideResNet, mask: Mapping[str, Tensor] | None, data: Dataset, config: TrainConfig, *,
          checkpoint_dir: str | os.PathLike | None = None, on_epoch: Callable[[EpochRecord], object] | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``model`` under ``mask`` (one member: name -> bool ``[C]``; None: dense) on ``data``.

    The caller's model is not modified. Trains the pruned network unless ``config.masked``.
    Evaluates on the test set after every epoch. With ``checkpoint_dir``, a checkpoint is written
    atomically after every epoch and an existing one is resumed (it must belong to the same
    config and mask); a finished checkpoint returns its result without training. ``on_epoch`` gets
    each :class:`EpochRecord`; returning True stops training after that epoch.
    Raises :class:`TrainingDiverged` on a NaN/inf loss.
    """
    if not isinstance(model, WideResNet):
        raise TypeError(f"train needs a WideResNet, got {type(model).__name__}")
    if model.in_channels != data.in_channels or model.num_classes != data.num_classes:
        raise ValueError(f"the model takes {model.in_channels} channels / {model.num_classes} classes, the dataset "
                         f"{data.name!r} has {data.in_channels} / {data.num_classes}")
    device = _resolve_device(config)
    opts = config.resolved(device)
    mask = _mask_cpu(mask)

    net, run_net, fwd_flops, step_flops, live_flops, live_params = prepare_network(
        model, mask, config.masked, device, opts["channels_last"], data.image_size)

    if data.device != device:
        data = data.to(device)
    train_loader = DeviceLoader(data.train, config.batch_size, mean=data.mean, std=data.std, shuffle=True,
                                augment=data.augment, drop_last=config.drop_last,
                                channels_last=opts["channels_last"], seed=config.seed)
    if len(train_loader) == 0:
        raise ValueError(f"the training split has {len(data.train)} images, fewer than one batch of "
                         f"{config.batch_size} (drop_last=True)")
    test_loader = DeviceLoader(data.test, config.eval_batch_size, mean=data.mean, std=data.std,
                               channels_last=opts["channels_last"])
    steps = len(train_loader)
    opt = make_optimizer(run_net, config)
    sched = make_scheduler(opt, config, steps)
    phases = {"training": PhaseStats(), "evaluation": PhaseStats()}
    records: list[EpochRecord] = []

    ckpt_path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME) if checkpoint_dir is not None else None
    identity = {"config": asdict(config), "model": model.config, "widths": dict(net.node_layers()),
                "dataset": data.name, "train_size": len(data.train), "train_fingerprint": _fingerprint(data)}
    cuda_devices = ([device.index if device.index is not None else torch.cuda.current_device()]
                    if device.type == "cuda" else [])
    start_epoch = 0
    with torch.random.fork_rng(devices=cuda_devices):  # dropout draws from the global RNG: keep the caller's intact
        torch.manual_seed(config.seed)
        if ckpt_path is not None and os.path.exists(ckpt_path):
            state = _load_checkpoint(ckpt_path, identity, mask)
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            train_loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["rng_cpu"])
            if cuda_devices and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
            records = [EpochRecord(**r) for r in state["records"]]
            phases = {k: PhaseStats(**v) for k, v in state["phases"].items()}
            start_epoch = state["epoch"]
        resumed_from = start_epoch

        fwd = torch.compile(run_net) if opts["compile"] else run_net
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if opts["amp"]
               else contextlib.nullcontext())
        bench = torch.backends.cudnn.benchmark
        if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        t_call = time.perf_counter()
        completed = start_epoch >= config.epochs
        try:
            epochs = range(start_epoch, config.epochs)
            bar = _tqdm(epochs, progress, desc="epochs", initial=start_epoch, total=config.epochs)
            for epoch in bar:
                lr = opt.param_groups[0]["lr"]
                # ---- training phase
                t0 = _now(device)
                run_net.train()
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.long)
                seen = 0
                batches = _tqdm(train_loader, progress, desc=f"epoch {epoch + 1}", leave=False, total=steps)
                for step, (x, y) in enumerate(batches, start=1):
                    with amp:
                        logits = fwd(x)
                    loss = criterion(logits, y, config.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    loss_sum += loss.detach() * y.shape[0]
                    correct += (logits.detach().argmax(1) == y).sum()
                    seen += y.shape[0]
                    if step % _FINITE_CHECK_EVERY == 0 or step == steps:
                        _check_finite(loss_sum, epoch + 1, step, ckpt_path, records)
                        if progress:
                            batches.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
                train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
                t1 = _now(device)
                # ---- evaluation phase
                test_loss, test_acc = evaluate(fwd, test_loader, amp=amp)
                t2 = _now(device)
                phases["training"].wall_s += t1 - t0
                phases["training"].flops += float(step_flops) * seen
                phases["training"].images += seen
                phases["evaluation"].wall_s += t2 - t1
                phases["evaluation"].flops += float(fwd_flops) * len(data.test)
                phases["evaluation"].images += len(data.test)
                rec = EpochRecord(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc,
                                  test_loss=test_loss, test_acc=test_acc, train_time_s=t1 - t0,
                                  eval_time_s=t2 - t1, wall_time_s=time.perf_counter() - t_call)
                records.append(rec)
                if ckpt_path is not None:
                    _save_checkpoint(ckpt_path, identity, mask, net, opt, sched, train_loader, device, records,
                                     phases, epoch + 1)
                if progress:
                    bar.set_postfix(train_acc=f"{train_acc:.3f}", test_acc=f"{test_acc:.3f}")
                if epoch + 1 == config.epochs:
                    completed = True
                if on_epoch is not None and on_epoch(rec) is True:
                    break
        finally:
            torch.backends.cudnn.benchmark = bench
    net.eval()
    return TrainResult(records=records, phases=phases, model=net, mask=mask, config=config, device=str(device),
                       forward_flops=fwd_flops, train_step_flops=step_flops, live_forward_flops=live_flops,
                       params=_count(net), live_params=live_params, completed=completed, resumed_from=resumed_from)


@torch.no_grad()
def evaluate(net: Callable[[Tensor], Tensor], loader: DeviceLoader, *, amp=None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``net`` in eval mode over ``loader``; restores the mode after."""
    module = getattr(net, "_orig_mod", net)
    was_training = module.training if isinstance(module, nn.Module) else False
    if isinstance(module, nn.Module):
        module.eval()
    amp = amp if amp is not None else contextlib.nullcontext()
    dev = loader.device
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    n = 0
    for x, y in loader:
        with amp:
            logits = net(x)
        loss_sum += criterion(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
    if isinstance(module, nn.Module):
        module.train(was_training)
    return loss_sum.item() / max(n, 1), correct.item() / max(n, 1)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time what ran, not what was queued
    return time.perf_counter()


def _tqdm(it, enabled: bool, **kw):
    if not enabled:
        return _Quiet(it)
    from tqdm.auto import tqdm
    return tqdm(it, **kw)


class _Quiet:
    """What the loops need of a tqdm bar, without the bar."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return iter(self._it)

    def set_postfix(self, **kw):
        pass


def _check_finite(loss_sum: Tensor, epoch: int, step: int, ckpt_path: str | None, records) -> None:
    v = loss_sum.item()
    if math.isfinite(v):
        return
    if ckpt_path is not None and os.path.exists(ckpt_path):
        kept = f"the last good checkpoint (epoch {len(records)}) is kept at {ckpt_path}"
    else:
        kept = "no checkpoint was written"
    raise TrainingDiverged(f"training diverged: the loss became {v} in epoch {epoch} by step {step}; {kept}. "
                           "Lower the learning rate or check the data.", epoch=epoch, step=step,
                           checkpoint=ckpt_path if ckpt_path and os.path.exists(ckpt_path) else None)


# ------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(path, identity, mask, net, opt, sched, loader, device, records, phases, epoch) -> None:
    state = {
        "format": "fastweedout.training/1",
        "identity": identity,
        "mask": mask,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": _to_cpu(opt.state_dict()),
        "scheduler": sched.state_dict(),
        "loader": loader.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "records": [r.to_dict() for r in records],
        "phases": {k: v.to_dict() for k, v in phases.items()},
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_torch_save(state, path)  # temporary + fsync + rename: a crash mid-write leaves the previous checkpoint intact


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _load_checkpoint(path: str, identity: dict, mask) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e}); "
                         "delete it to start over") from e
    if not isinstance(state, dict) or state.get("format") != "fastweedout.training/1":
        raise ValueError(f"{path}: not a fastweedout training checkpoint")
    old = state["identity"]
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in identity.items() if old.get(k) != v]
    if old.get("config") != identity["config"]:
        diff = [f"config.{k}: {old['config'].get(k)!r} -> {v!r}" for k, v in identity["config"].items()
                if old["config"].get(k) != v] + [d for d in diff if not d.startswith("config")]
    old_mask = state.get("mask")
    if (old_mask is None) != (mask is None) or (mask is not None and (
            set(old_mask) != set(mask) or any(not torch.equal(old_mask[k], mask[k]) for k in mask))):
        diff.append("the mask differs")
    if diff:
        raise ValueError(f"{path} belongs to a different training run ({'; '.join(diff)}); "
                         "use another checkpoint directory or delete it")
    return state


__all__ = ["TrainConfig", "TrainResult", "EpochRecord", "PhaseStats", "TrainingDiverged", "train", "evaluate",
           "make_optimizer", "make_scheduler", "prepare_network", "lr_factor", "criterion", "MaskedNet",
           "CHECKPOINT_NAME", "SCHEDULES"]
