"""Training of a (sparse) Wide ResNet: one loop for one process and for DDP.

By default the *pruned* network (``model.prune(mask)``: physically smaller, same function) is
trained; ``TrainConfig.masked`` trains the full network under its mask instead (same function, same
updates to the live weights). Under a :class:`fastweedout.world.World` of N ranks every rank takes a
contiguous shard of every global batch and DistributedDataParallel averages the gradients; on one
process the world is the identity. A checkpoint (``fastweedout.training.checkpoint``) is written atomically
after every epoch and a later call with the same directory resumes from it.

Randomness: the data order and augmentation come from the loader's generator (seeded by ``seed``,
saved in the checkpoint); dropout noise is reseeded at every epoch from (seed, rank, epoch), inside
``torch.random.fork_rng`` so the caller's generators are left alone. A resumed run is therefore the
same function of its seed as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastweedout.config import TrainConfig
from fastweedout.data.datasets import Dataset
from fastweedout.data.loader import DeviceLoader
from fastweedout.model.wrn import WideResNet
from fastweedout.spaces.node import count_params
from fastweedout.training.callbacks import (
    Checkpointer,
    EpochRecord,
    Loop,
    OnEpoch,
    PhaseStats,
    ProgressLog,
    TrainCallbacks,
)
from fastweedout.training.network import member_mask, prepare_network
from fastweedout.world import (
    DDP_BN_MODES,
    GlobalBatchNorm2d,
    World,
    average_bn_buffers,
    local_rank,
    set_batchnorm,
)

STEP_MILESTONES = (0.3, 0.6, 0.8)  # fractions of the epochs (WRN: 60/120/160 of 200)
STEP_GAMMA = 0.2
_FINITE_CHECK_EVERY = 25  # steps between loss checks: each one is a host sync on a GPU


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint (if any) is left in place."""

    def __init__(self, message: str, *, epoch: int, step: int, checkpoint: str | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


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
    steps: int  # optimizer steps done in all (resumed runs included)
    completed: bool  # all config.epochs done (False when on_epoch or max_steps stopped it)
    resumed_from: int  # epochs already done when this call started (0: fresh)

    @property
    def final(self) -> EpochRecord:
        if not self.records:
            raise ValueError("no epoch has been trained")
        return self.records[-1]


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


def criterion(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy in fp32 (module-level so tests can inject a diverging loss)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction=reduction)


def data_fingerprint(data: Dataset) -> int:
    """A cheap checksum of the training split, so a checkpoint is never resumed on other data."""
    sample = data.train.images[::97].reshape(-1)[::7]
    return zlib.crc32(data.train.labels.cpu().numpy().tobytes()) ^ zlib.crc32(sample.cpu().numpy().tobytes())


@torch.no_grad()
def evaluate(net: Callable[[Tensor], Tensor], loader: DeviceLoader, *, amp=None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``net`` in eval mode over ``loader``; restores the mode after."""
    module = getattr(net, "_orig_mod", net)
    module = getattr(module, "module", module)  # DDP
    was = module.training if isinstance(module, nn.Module) else False
    if isinstance(module, nn.Module):
        module.eval()
    amp = amp if amp is not None else contextlib.nullcontext()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    n = 0
    for x, y in loader:
        with amp:
            logits = net(x)
        loss_sum += criterion(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += y.shape[0]
    if isinstance(module, nn.Module):
        module.train(was)
    return loss_sum.item() / max(n, 1), correct.item() / max(n, 1)


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time what ran, not what was queued
    return time.perf_counter()


def resolve_device(device, world: World) -> torch.device:
    if device is None:
        dev = torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank() if world.distributed else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def progress_bar(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, **kw)


def _diverged(v: float, epoch: int, step: int, loop: Loop) -> TrainingDiverged:
    ckpt_dir, records = loop.checkpoint_dir, loop.records
    where = (f"the last good checkpoint (epoch {len(records)}) is kept in {ckpt_dir}" if ckpt_dir and records
             else "no checkpoint was written")
    return TrainingDiverged(f"training diverged: the loss became {v} in epoch {epoch} by step {step}; {where}. "
                            "Lower the learning rate or check the data.", epoch=epoch, step=step,
                            checkpoint=ckpt_dir if records else None)


def train(model: WideResNet, mask, data: Dataset, config: TrainConfig = TrainConfig(), *, seed: int = 0,
          device=None, world: World | None = None, ddp_bn: str = "local", checkpoint_dir=None,
          on_epoch: Callable[[EpochRecord], object] | None = None,
          on_step: Callable[[int, float], object] | None = None,
          callbacks: TrainCallbacks | list[TrainCallbacks] | None = None, max_steps: int | None = None,
          granularity: str = "node", progress: bool = True) -> TrainResult:
    """Train ``model`` under ``mask`` (one member: name -> bool ``[C]``, or a Masks of one; None: dense).

    The caller's model is not modified. Evaluates on the test set after every epoch. ``world``: the
    ranks to train on (default: the initialised process group, else one process); every rank calls
    with the same arguments; ``config.batch_size`` is the global batch. ``ddp_bn``: ``local`` (each
    rank's shard statistics; running statistics averaged after every epoch) or ``sync`` (the global
    batch's statistics: the same result as one process up to fp32 rounding). ``on_epoch`` gets each
    record; returning True stops after that epoch. ``on_step(step, loss)`` gets the global batch's
    mean loss after each step (one extra all-reduce and host sync per step). ``callbacks``: hooks
    (:class:`TrainCallbacks`) called in order, their state checkpointed. ``max_steps`` stops after
    that many optimizer steps in all (no evaluation of a partial epoch). ``granularity="weight"``: the
    mask is over weights (``fastweedout.spaces.weight``) and the full network trains with the masked weights
    held at zero. Raises :class:`TrainingDiverged`.
    """
    world = world or World.current()
    _check_train_inputs(model, data, config, ddp_bn, world)
    device = resolve_device(device, world)
    user = [] if callbacks is None else ([callbacks] if isinstance(callbacks, TrainCallbacks) else list(callbacks))
    loop = _build_loop(model, member_mask(mask), data, config, seed, device, world, ddp_bn, granularity, user)
    saver = Checkpointer(str(checkpoint_dir)) if checkpoint_dir is not None else None
    if saver is not None:
        loop.checkpoint_dir = saver.directory
        saver.resume(loop)
    resumed_from = loop.epoch
    bar = progress_bar(range(loop.epoch, config.epochs), progress and world.rank == 0, desc="epochs",
                       initial=loop.epoch, total=config.epochs)
    after = user + [c for c in (saver, ProgressLog(bar) if progress and world.rank == 0 else None,
                                OnEpoch(on_epoch) if on_epoch is not None else None) if c is not None]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if config.resolved(device)["amp"] \
        else contextlib.nullcontext()
    completed = loop.epoch >= config.epochs
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    t_call = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for epoch in bar:
                torch.manual_seed((seed * 1_000_003 + world.rank) * 10_007 + epoch)  # dropout noise
                lr = loop.opt.param_groups[0]["lr"]
                t0 = now(device)
                tot, whole = _train_epoch(loop, epoch, amp, on_step, max_steps, progress)
                t1 = now(device)
                seen = int(tot[2])
                loop.phases["training"].add(t1 - t0, float(loop.step_flops) * seen, seen)
                if not whole:
                    break  # a partial epoch (max_steps): no evaluation, no record
                if ddp_bn == "local":
                    average_bn_buffers(loop.net, world)
                test_loss, test_acc = _evaluate_epoch(loop, amp)
                t2 = now(device)
                loop.phases["evaluation"].add(t2 - t1, float(loop.fwd_flops) * loop.test_size, loop.test_size)
                rec = EpochRecord(epoch=epoch + 1, lr=lr, train_loss=float(tot[0]) / seen,
                                  train_acc=float(tot[1]) / seen, test_loss=test_loss, test_acc=test_acc,
                                  train_time_s=t1 - t0, eval_time_s=t2 - t1, wall_time_s=time.perf_counter() - t_call)
                loop.records.append(rec)
                loop.epoch = epoch + 1
                completed = loop.epoch == config.epochs
                stop = [c.after_epoch(loop, rec) is True for c in after]  # every callback, in order
                if world.any(any(stop) or (max_steps is not None and loop.global_step >= max_steps), device):
                    break
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        set_batchnorm(loop.net, nn.BatchNorm2d)
    net = loop.net.eval()
    return TrainResult(records=loop.records, phases=loop.phases, model=net, mask=loop.mask, config=config,
                       device=str(device), forward_flops=loop.fwd_flops, train_step_flops=loop.step_flops,
                       live_forward_flops=loop.live_flops, params=count_params(net), live_params=loop.live_params,
                       steps=loop.global_step, completed=completed, resumed_from=resumed_from)


def _check_train_inputs(model, data, config, ddp_bn, world) -> None:
    if not isinstance(model, WideResNet):
        raise TypeError(f"train needs a WideResNet, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if model.in_channels != data.in_channels or model.num_classes != data.num_classes:
        raise ValueError(f"the model takes {model.in_channels} channels / {model.num_classes} classes, the dataset "
                         f"{data.name!r} has {data.in_channels} / {data.num_classes}")
    if ddp_bn not in DDP_BN_MODES:
        raise ValueError(f"ddp_bn must be one of {DDP_BN_MODES}, got {ddp_bn!r}")
    if config.batch_size % world.size:
        raise ValueError(f"the global batch size {config.batch_size} must be divisible by the world size {world.size}")


def _build_loop(model, mask, data, config, seed, device, world, ddp_bn, granularity, callbacks) -> Loop:
    """The network for the mask, its loaders, optimizer and schedule, on ``device``."""
    opts = config.resolved(device)
    net, run_net, fwd_flops, step_flops, live_flops, live_params = prepare_network(
        model, mask, config.masked, device, opts["channels_last"], data.image_size, granularity)
    if ddp_bn == "sync" and world.distributed:
        set_batchnorm(net, GlobalBatchNorm2d, world.group)
    if data.device != device:
        data = data.to(device)
    loader = DeviceLoader(data.train, config.batch_size, mean=data.mean, std=data.std, shuffle=True,
                          augment=data.augment, drop_last=config.drop_last, channels_last=opts["channels_last"],
                          seed=seed)
    if len(loader) == 0:
        raise ValueError(f"the training split has {len(data.train)} images, fewer than one batch of "
                         f"{config.batch_size} (drop_last)")
    t_lo, t_hi = world.shard(len(data.test))
    test_loader = DeviceLoader(data.test.subset(torch.arange(t_lo, t_hi)), config.eval_batch_size,
                               mean=data.mean, std=data.std, channels_last=opts["channels_last"])
    fwd_net = run_net
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Buffers stay per rank during an epoch (local BN statistics) and are averaged after it.
        # (newer torch calls the switch forward_sync_buffers; parameters and buffers are synced at init either way)
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        fwd_net = DDP(run_net, device_ids=[device.index] if device.type == "cuda" else None,
                      process_group=world.group, **no_sync)
    opt = make_optimizer(run_net, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config, len(loader)))
    identity = {"config": asdict(config), "seed": seed, "model": model.config, "widths": dict(net.node_layers()),
                "dataset": data.name, "train_size": len(data.train), "train_fingerprint": data_fingerprint(data),
                # a "sync" run does not depend on the world size, so it may resume on another one
                "distributed": {"bn": ddp_bn} if ddp_bn == "sync" or world.size == 1
                else {"bn": ddp_bn, "world_size": world.size}}
    fwd = torch.compile(fwd_net) if opts["compile"] else fwd_net
    eval_fwd = fwd if fwd_net is run_net else (torch.compile(run_net) if opts["compile"] else run_net)
    return Loop(config=config, world=world, device=device, net=net, run_net=run_net, fwd=fwd, eval_fwd=eval_fwd,
                loader=loader, test_loader=test_loader, test_size=len(data.test), test_shard=t_hi - t_lo, opt=opt,
                sched=sched, identity=identity, mask=mask, fwd_flops=fwd_flops, step_flops=step_flops,
                live_flops=live_flops, live_params=live_params,
                phases={"training": PhaseStats(), "evaluation": PhaseStats()}, records=[], callbacks=callbacks)


def _train_epoch(loop: Loop, epoch: int, amp, on_step, max_steps, progress) -> tuple[Tensor, bool]:
    """One epoch of SGD steps: (the global [loss sum, correct, images], whether the epoch was whole)."""
    world, device, size = loop.world, loop.device, loop.world.size
    steps = len(loop.loader)
    loop.run_net.train()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
    batches = progress_bar(loop.loader, progress and world.rank == 0, desc=f"epoch {epoch + 1}", leave=False,
                           total=steps)
    step = 0
    for step, (x, y) in enumerate(batches, start=1):
        for c in loop.callbacks:
            c.before_step(loop.global_step, loop.run_net)
        b = y.shape[0]
        lo, hi = shard_range_of(b, world)
        x, y = x[lo:hi], y[lo:hi]
        with amp:
            logits = loop.fwd(x)
        local_sum = criterion(logits, y, loop.config.label_smoothing, reduction="sum")
        # DDP averages gradients over the ranks: scale so that the average is d(global mean)/dw.
        loss = local_sum * (size / b)
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.opt.step()
        loop.sched.step()
        loop.global_step += 1
        stats[0] += local_sum.detach()
        stats[1] += (logits.detach().argmax(1) == y).sum()
        stats[2] += y.shape[0]
        if on_step is not None:
            s = world.all_reduce_(local_sum.detach().double().reshape(1))
            on_step(loop.global_step, float(s) / b)
        capped = max_steps is not None and loop.global_step >= max_steps
        if step % _FINITE_CHECK_EVERY == 0 or step == steps or capped:
            v = world.all_reduce_(stats[:1].clone()).item()
            if not math.isfinite(v):
                raise _diverged(v, epoch + 1, step, loop)
        if capped:
            break
    return world.all_reduce_(stats.clone()), not (max_steps is not None and loop.global_step >= max_steps
                                                  and step < steps)


def _evaluate_epoch(loop: Loop, amp) -> tuple[float, float]:
    """(test loss, test accuracy) over every rank's shard of the test set."""
    test_loss, test_acc = evaluate(loop.eval_fwd, loop.test_loader, amp=amp)
    n_r = loop.test_shard
    ev = loop.world.all_reduce_(torch.tensor([test_loss * n_r, round(test_acc * n_r), n_r], dtype=torch.float64,
                                             device=loop.device))
    n_test = max(int(ev[2]), 1)
    return float(ev[0]) / n_test, float(ev[1]) / n_test


def shard_range_of(n: int, world: World) -> tuple[int, int]:
    return world.shard(n) if world.distributed else (0, n)


__all__ = ["TrainResult", "TrainingDiverged",
           "criterion", "data_fingerprint", "evaluate", "lr_factor", "make_optimizer", "train"]
