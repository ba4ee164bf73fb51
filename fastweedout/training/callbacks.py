"""What the training loop holds while it runs (:class:`Loop`) and the hooks that read it
(:class:`TrainCallbacks`): checkpointing, the progress log and per-epoch functions are callbacks, so
:func:`fastweedout.training.loop.train` is the SGD loop and nothing else (open_lth's shape)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastweedout.config import TrainConfig
from fastweedout.data.loader import DeviceLoader
from fastweedout.training import checkpoint as ckpt
from fastweedout.world import World


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
    """Compute spent in one phase: wall seconds, FLOPs (analytic, useful), images processed."""

    wall_s: float = 0.0
    flops: float = 0.0
    images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def add(self, wall_s: float, flops: float, images: int) -> None:
        self.wall_s += wall_s
        self.flops += flops
        self.images += images


class TrainCallbacks:
    """Hooks into the loop (open_lth's shape: the loop trains, callbacks do the rest). Their state is
    saved in every checkpoint, so they resume with the run."""

    def before_step(self, step: int, net: nn.Module) -> None:
        """Called before optimizer step ``step`` (0-based, counted over the whole run)."""

    def after_epoch(self, loop: Loop, record: EpochRecord) -> bool | None:
        """Called after each evaluated epoch, in order; returning True stops training after it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Loop:
    """What one call of :func:`train` holds while it runs (what the callbacks see)."""

    config: TrainConfig
    world: World
    device: torch.device
    net: nn.Module  # the trained network (pruned, or the full one under its mask)
    run_net: nn.Module  # what the optimizer steps (the masked wrapper when masked)
    fwd: Callable  # the training forward (DDP, compiled)
    eval_fwd: Callable
    loader: DeviceLoader
    test_loader: DeviceLoader
    test_size: int  # the whole test set
    test_shard: int  # this rank's part of it
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    identity: dict  # what a checkpoint must match to be resumed
    mask: dict | None
    fwd_flops: int  # per image: the network run (executed)
    step_flops: int  # per image: one SGD step
    live_flops: int  # per image: the live sub-network's forward (useful)
    live_params: int
    phases: dict
    records: list
    callbacks: list
    checkpoint_dir: str | None = None
    epoch: int = 0  # epochs done
    global_step: int = 0

    def checkpoint_state(self) -> dict:
        return dict(identity=self.identity, mask=self.mask, epoch=self.epoch, model=self.net.state_dict(),
                    optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                    loader=self.loader.state_dict(), records=[r.to_dict() for r in self.records],
                    phases={k: v.to_dict() for k, v in self.phases.items()},
                    callbacks=[c.state_dict() for c in self.callbacks])

    def load_checkpoint_state(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.records = [EpochRecord(**r) for r in state["records"]]
        self.phases = {k: PhaseStats(**v) for k, v in state["phases"].items()}
        self.epoch = state["epoch"]
        self.global_step = self.epoch * len(self.loader)
        saved = state.get("callbacks", [])
        saved = [saved] if isinstance(saved, dict) else saved  # one callback's state, before the list
        for c, st in zip(self.callbacks, saved):
            c.load_state_dict(st)


class Checkpointer(TrainCallbacks):
    """Writes the loop's state (atomically, rank 0) after every epoch: what a later call resumes from."""

    def __init__(self, directory: str):
        self.directory = directory

    def after_epoch(self, loop: Loop, record: EpochRecord) -> None:
        if loop.world.rank == 0:
            ckpt.save(self.directory, loop.checkpoint_state())

    def resume(self, loop: Loop) -> None:
        """Load the directory's checkpoint into ``loop`` when it holds one of this run (every rank)."""
        found = None
        if loop.world.rank == 0:
            try:
                found = ("ok", ckpt.load(self.directory, loop.identity, loop.mask))
            except ValueError as e:
                found = ("error", str(e))
        found = loop.world.broadcast_object(found)
        if found[0] == "error":
            raise ValueError(found[1])
        if found[1] is not None:
            loop.load_checkpoint_state(found[1])


class ProgressLog(TrainCallbacks):
    """The epoch bar's accuracies."""

    def __init__(self, bar):
        self.bar = bar

    def after_epoch(self, loop: Loop, record: EpochRecord) -> None:
        if hasattr(self.bar, "set_postfix"):
            self.bar.set_postfix(train_acc=f"{record.train_acc:.3f}", test_acc=f"{record.test_acc:.3f}")


class OnEpoch(TrainCallbacks):
    """A plain function of each record (``train(on_epoch=...)``); True stops."""

    def __init__(self, fn: Callable[[EpochRecord], object]):
        self.fn = fn

    def after_epoch(self, loop: Loop, record: EpochRecord) -> bool:
        return self.fn(record) is True


__all__ = ["Checkpointer", "EpochRecord", "Loop", "OnEpoch", "PhaseStats", "ProgressLog", "TrainCallbacks"]
