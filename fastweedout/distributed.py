"""Beyond one process: sharded population scoring, DDP training of one run, and the experiment grid
spread over ranks, on ``torch.distributed`` as launched by ``torchrun`` (NCCL on GPUs, gloo on CPU).

Three independent pieces:

* **Sharded scoring** (:func:`shard_range`, :func:`gather_fitness`): under an initialised process
  group :func:`fastweedout.score_population` scores only this rank's contiguous slice of the
  population and all-gathers the fitness, so every rank returns the full ``[P]`` vector and agrees on
  the winner. Every rank must make the same calls with the same masks and batch (the search does:
  the same seed gives the same masks and batches on every rank); a checksum catches ranks that do not.
* **DDP training of one run** (:func:`train_ddp`): each rank takes a disjoint contiguous shard of
  every global batch (the global batch size is ``config.batch_size``), gradients are all-reduced by
  ``DistributedDataParallel``. BN statistics are per rank by default (``bn="local"``, standard DDP);
  ``bn="sync"`` all-reduces them (:class:`GlobalBatchNorm2d`, works on gloo and NCCL, unlike
  ``nn.SyncBatchNorm`` which needs CUDA) and then reproduces single-process training with the same
  global batch up to fp32 rounding.
* **The grid over ranks** (:func:`claim`, :func:`grid_for_rank`, :func:`run_grid`): whole runs per
  rank (one GPU per run), static round-robin plus work stealing, made safe by an atomic claim file
  per run directory (``O_CREAT|O_EXCL``, owner's host/pid inside). A claim whose owner died (same
  host: pid gone; other host: heartbeat older than ``stale_after``) is broken, so a re-run (or a
  surviving rank) finishes the dead rank's runs. The grid needs no process group, only the rank and
  world size that the launcher puts in the environment.

``torchrun --nproc-per-node 2 -m fastweedout.distributed selfcheck`` checks and times the first two.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import dataclasses
import datetime
import json
import math
import os
import socket
import sys
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

DDP_BN_MODES = ("local", "sync")
CLAIM_NAME = ".claim"
DONE_NAME = "done"  # the run directory's done-marker (fastweedout.runs.DONE_NAME)
HEARTBEAT_S = 30.0  # how often a process refreshes the claims it holds
STALE_AFTER_S = 600.0  # a claim from another host whose heartbeat is older than this is dead
_BREAK_GUARD_STALE_S = 60.0


# ------------------------------------------------------------------------------------ world
def _pg_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed(group=None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return _pg_ready() and dist.get_world_size(group) > 1


def env_world() -> tuple[int, int]:
    """(rank, world size) as the launcher set them: torchrun's RANK/WORLD_SIZE, else Slurm's
    SLURM_PROCID/SLURM_NTASKS, else Open MPI's; (0, 1) when none is set."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if r in os.environ and w in os.environ:
            try:
                rank, size = int(os.environ[r]), int(os.environ[w])
            except ValueError:
                raise ValueError(f"{r}={os.environ[r]!r} / {w}={os.environ[w]!r} are not integers") from None
            if not 0 <= rank < size:
                raise ValueError(f"{r}={rank} is not in [0, {w}={size})")
            return rank, size
    return 0, 1


def world(group=None) -> tuple[int, int]:
    """(rank, world size): of the initialised process group, else from the environment
    (:func:`env_world`), else (0, 1)."""
    if _pg_ready():
        return dist.get_rank(group), dist.get_world_size(group)
    return env_world()


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK, Slurm's SLURM_LOCALID; 0 otherwise)."""
    for k in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if k in os.environ:
            return int(os.environ[k])
    return 0


def setup(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise the default process group from the environment torchrun sets (idempotent).

    backend: None picks NCCL when CUDA is available (and binds this process to ``cuda:LOCAL_RANK``),
    gloo otherwise. Returns (rank, world size)."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not _pg_ready():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "nccl" in backend:
            torch.cuda.set_device(local_rank())
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, **kw)
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if _pg_ready():
        dist.destroy_process_group()


def use_distributed(flag: bool | None, group=None) -> bool:
    """Resolve the ``distributed`` argument: None = shard when a process group of more than one rank
    is initialised; True = require one; False = never."""
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"distributed must be True, False or None (auto), got {flag!r}")
    if flag is None:
        return is_distributed(group)
    if flag and not _pg_ready():
        raise ValueError("distributed=True needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group or fastweedout.distributed.setup(), "
                         "e.g. under torchrun)")
    return flag and dist.get_world_size(group) > 1


# ------------------------------------------------------------------------------------ sharded scoring
def shard_range(n: int, rank: int | None = None, world_size: int | None = None, group=None) -> tuple[int, int]:
    """This rank's contiguous slice ``[lo, hi)`` of ``n`` items; sizes differ by at most one and
    ranks beyond ``n`` get empty slices."""
    if rank is None or world_size is None:
        r, w = world(group)
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank * n // world_size, (rank + 1) * n // world_size


def _collective_device(group=None) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if any(b in backend for b in ("gloo", "mpi")) or backend.startswith("cpu"):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def population_checksum(masks, labels: Tensor) -> int:
    """crc32 of the masks and the batch's labels: equal on ranks that score the same population."""
    crc = zlib.crc32(repr(sorted(masks.widths.items())).encode())
    for _, m in masks.items():
        crc = zlib.crc32(m.detach().cpu().contiguous().numpy().tobytes(), crc)
    return zlib.crc32(labels.detach().cpu().contiguous().numpy().tobytes(), crc)


def gather_fitness(local: Tensor, masks, labels: Tensor, group=None) -> Tensor:
    """All-gather every rank's fitness slice (``[hi - lo]`` of :func:`shard_range`) into the full
    ``[P]`` float32 CPU vector, identical on every rank. Raises ValueError on every rank when the
    ranks scored different populations or batches (a seed or data mismatch)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    p = masks.population
    lo, hi = shard_range(p, rank, size)
    if local.numel() != hi - lo:
        raise ValueError(f"rank {rank} holds {local.numel()} fitness values for its slice [{lo}, {hi})")
    width = -(-p // size)
    # One fp64 row per rank: [count, checksum, fitness..., padding] (fp64 holds float32 and a crc32 exactly).
    row = torch.full((width + 2,), math.nan, dtype=torch.float64)
    row[0] = float(local.numel())
    row[1] = float(population_checksum(masks, labels))
    row[2:2 + local.numel()] = local.detach().cpu().double()
    dev = _collective_device(group)
    parts = [torch.empty(width + 2, dtype=torch.float64, device=dev) for _ in range(size)]
    dist.all_gather(parts, row.to(dev), group=group)
    rows = torch.stack(parts).cpu()
    if not bool((rows[:, 1] == rows[0, 1]).all()):
        raise ValueError("the ranks scored different populations or batches (their checksums differ): every rank "
                         "must call score_population / random_search with the same masks, data and seed")
    out = []
    for r in range(size):
        a, b = shard_range(p, r, size)
        if int(rows[r, 0]) != b - a:
            raise ValueError(f"rank {r} sent {int(rows[r, 0])} fitness values for its slice [{a}, {b})")
        out.append(rows[r, 2:2 + b - a])
    return torch.cat(out).float()


# ------------------------------------------------------------------------------------ DDP training
class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch over all ranks
    (two all-reduces with autograd: per-channel sums, then squared deviations), on any backend,
    gloo included (``nn.SyncBatchNorm`` needs CUDA). In eval mode or without a process group it is
    plain BatchNorm2d; its state-dict keys are BatchNorm2d's. Running variance gets the unbiased
    global variance, as BatchNorm2d over the whole batch would."""

    process_group = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed(self.process_group)):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), float(x.numel() // c))
        s = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), count]), group=self.process_group)
        n = s[c]
        mean = s[:c] / n
        d = xf - mean.view(1, c, 1, 1)
        var = all_reduce((d * d).sum(dim=(0, 2, 3)), group=self.process_group) / n
        y = d * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y.to(x.dtype)


def _set_batchnorm(net: nn.Module, cls: type, group=None) -> None:
    """Switch every BatchNorm2d between the plain class and :class:`GlobalBatchNorm2d` in place
    (the subclass adds no state, so only the class changes)."""
    for m in net.modules():
        if type(m) in (nn.BatchNorm2d, GlobalBatchNorm2d):
            m.__class__ = cls
            if cls is GlobalBatchNorm2d:
                m.process_group = group
            else:
                m.__dict__.pop("process_group", None)


def _all_reduce_(t: Tensor, size: int) -> Tensor:
    if size > 1:
        dist.all_reduce(t)
    return t


def average_bn_buffers(net: nn.Module) -> None:
    """Replace every BN running mean/variance by its mean over the ranks (one all-reduce)."""
    if not is_distributed():
        return
    bufs = [b for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var)]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(flat[i:i + b.numel()].view_as(b))
            i += b.numel()


def _rank_device(config) -> torch.device:
    if config.device is not None:
        dev = torch.device(config.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank())
    else:
        dev = torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _broadcast_from_0(obj, size: int):
    if size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_ddp(model, mask, data, config, *, bn: str = "local", checkpoint_dir: str | os.PathLike | None = None,
              on_epoch: Callable | None = None, on_step: Callable[[int, float], object] | None = None,
              progress: bool = False):
    """Train one run on every rank of the default process group with DistributedDataParallel.

    Call it on every rank with the same arguments. Like :func:`fastweedout.training.train` (pruned
    network unless ``config.masked``, SGD, schedule, bf16/compile/channels_last on CUDA, a checkpoint
    per epoch, resume), but each rank trains on its contiguous shard of every global batch of
    ``config.batch_size`` images (which must divide by the world size), on ``cuda:LOCAL_RANK`` or the
    CPU. The data order is the single-process one (same seed, same global batches).

    bn: ``"local"`` (default, standard DDP) normalises with each rank's shard statistics; running
    statistics are averaged over the ranks after every epoch (before evaluation and checkpoint).
    ``"sync"`` uses the statistics of the whole global batch (:class:`GlobalBatchNorm2d`): the
    losses, accuracies and weights then equal single-process training with the same global batch up
    to fp32 rounding (and dropout noise, which is drawn per rank, seeded by seed, rank and epoch).
    Evaluation is split over the ranks and summed. Rank 0 writes the checkpoint; on resume rank 0
    reads it and broadcasts it, so no shared filesystem is needed (a ``"local"`` checkpoint resumes
    only on the same number of ranks, a ``"sync"`` one on any). ``on_step(step, loss)`` gets the
    global batch's mean loss after each optimizer step (one extra all-reduce per step).
    Without a process group (or with one rank) this is single-process training.
    """
    T = importlib.import_module(".training", __package__)  # (the package's `train` is the function)
    from .data import DeviceLoader
    from .model import WideResNet

    if bn not in DDP_BN_MODES:
        raise ValueError(f"bn must be one of {DDP_BN_MODES}, got {bn!r}")
    if not isinstance(model, WideResNet):
        raise TypeError(f"train_ddp needs a WideResNet, got {type(model).__name__}")
    if model.in_channels != data.in_channels or model.num_classes != data.num_classes:
        raise ValueError(f"the model takes {model.in_channels} channels / {model.num_classes} classes, the dataset "
                         f"{data.name!r} has {data.in_channels} / {data.num_classes}")
    rank, size = (dist.get_rank(), dist.get_world_size()) if _pg_ready() else (0, 1)
    if config.batch_size % size:
        raise ValueError(f"the global batch size {config.batch_size} must be divisible by the world size {size}")
    if not config.drop_last and len(data.train) % config.batch_size and len(data.train) % config.batch_size < size:
        raise ValueError(f"the last partial batch ({len(data.train) % config.batch_size} images) is smaller than "
                         f"the world size {size}; use drop_last=True")
    device = _rank_device(config)
    opts = config.resolved(device)
    mask = T._mask_cpu(mask)

    net, run_net, fwd_flops, step_flops, live_flops, live_params = T.prepare_network(
        model, mask, config.masked, device, opts["channels_last"], data.image_size)
    if bn == "sync":
        _set_batchnorm(net, GlobalBatchNorm2d)

    if data.device != device:
        data = data.to(device)
    train_loader = DeviceLoader(data.train, config.batch_size, mean=data.mean, std=data.std, shuffle=True,
                                augment=data.augment, drop_last=config.drop_last,
                                channels_last=opts["channels_last"], seed=config.seed)
    steps = len(train_loader)
    if steps == 0:
        raise ValueError(f"the training split has {len(data.train)} images, fewer than one batch of "
                         f"{config.batch_size} (drop_last=True)")
    t_lo, t_hi = shard_range(len(data.test), rank, size)
    test_loader = DeviceLoader(data.test.subset(torch.arange(t_lo, t_hi)), config.eval_batch_size,
                               mean=data.mean, std=data.std, channels_last=opts["channels_last"])
    ddp = run_net
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Buffers stay per rank during an epoch (local BN statistics) and are averaged after it.
        # (torch >= 2.11 calls the switch forward_sync_buffers; parameters and buffers are synced at init either way)
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        ddp = DDP(run_net, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    opt = T.make_optimizer(run_net, config)
    sched = T.make_scheduler(opt, config, steps)
    phases = {"training": T.PhaseStats(), "evaluation": T.PhaseStats()}
    records: list = []

    ckpt_path = os.path.join(os.fspath(checkpoint_dir), T.CHECKPOINT_NAME) if checkpoint_dir is not None else None
    # With bn="sync" the run does not depend on the world size: it may resume on another number of ranks.
    identity = {"config": dataclasses.asdict(config), "model": model.config,
                "widths": dict(net.node_layers()), "dataset": data.name, "train_size": len(data.train),
                "train_fingerprint": T._fingerprint(data),
                "distributed": {"bn": bn} if bn == "sync" else {"bn": bn, "world_size": size}}
    start_epoch = 0
    if ckpt_path is not None:
        found = None
        if rank == 0 and os.path.exists(ckpt_path):
            try:
                found = ("ok", T._load_checkpoint(ckpt_path, identity, mask))
            except ValueError as e:
                found = ("error", str(e))
        found = _broadcast_from_0(found, size)
        if found is not None and found[0] == "error":
            raise ValueError(found[1])
        if found is not None:
            state = found[1]
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            train_loader.load_state_dict(state["loader"])
            records = [T.EpochRecord(**r) for r in state["records"]]
            phases = {k: T.PhaseStats(**v) for k, v in state["phases"].items()}
            start_epoch = state["epoch"]
    resumed_from = start_epoch

    cuda_devices = [device.index] if device.type == "cuda" else []
    fwd = torch.compile(ddp) if opts["compile"] else ddp
    # Evaluation runs the bare network: the ranks' test shards may take different numbers of batches.
    eval_fwd = fwd if ddp is run_net else (torch.compile(run_net) if opts["compile"] else run_net)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if opts["amp"] else contextlib.nullcontext()
    completed = start_epoch >= config.epochs
    t_call = time.perf_counter()
    global_step = start_epoch * steps
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for epoch in T._tqdm(range(start_epoch, config.epochs), progress and rank == 0, desc="epochs",
                                 initial=start_epoch, total=config.epochs):
                # Dropout noise: a pure function of (seed, rank, epoch), so a resumed run draws the same.
                torch.manual_seed((config.seed * 1_000_003 + rank) * 10_007 + epoch)
                lr = opt.param_groups[0]["lr"]
                t0 = T._now(device)
                run_net.train()
                stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
                for step, (x, y) in enumerate(train_loader, start=1):
                    b = y.shape[0]
                    lo, hi = shard_range(b, rank, size)
                    x, y = x[lo:hi], y[lo:hi]
                    with amp:
                        logits = fwd(x)
                    local_sum = T.criterion(logits, y, config.label_smoothing, reduction="sum")
                    # DDP averages gradients over the ranks: scale so that the average is d(global mean)/dw.
                    loss = local_sum * (size / b)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    global_step += 1
                    stats[0] += local_sum.detach()
                    stats[1] += (logits.detach().argmax(1) == y).sum()
                    stats[2] += y.shape[0]
                    if on_step is not None:
                        s = _all_reduce_(local_sum.detach().double().reshape(1), size)
                        on_step(global_step, float(s) / b)
                    if step % T._FINITE_CHECK_EVERY == 0 or step == steps:
                        T._check_finite(_all_reduce_(stats[:1].clone(), size), epoch + 1, step, ckpt_path, records)
                tot = _all_reduce_(stats.clone(), size)
                seen = int(tot[2])
                train_loss, train_acc = float(tot[0]) / seen, float(tot[1]) / seen
                t1 = T._now(device)
                if bn == "local":
                    average_bn_buffers(net)
                test_loss, test_acc = T.evaluate(eval_fwd, test_loader, amp=amp)
                n_r = t_hi - t_lo
                ev = _all_reduce_(torch.tensor([test_loss * n_r, round(test_acc * n_r), n_r], dtype=torch.float64,
                                               device=device), size)
                n_test = max(int(ev[2]), 1)
                test_loss, test_acc = float(ev[0]) / n_test, float(ev[1]) / n_test
                t2 = T._now(device)
                phases["training"].wall_s += t1 - t0
                phases["training"].flops += float(step_flops) * seen
                phases["training"].images += seen
                phases["evaluation"].wall_s += t2 - t1
                phases["evaluation"].flops += float(fwd_flops) * len(data.test)
                phases["evaluation"].images += len(data.test)
                rec = T.EpochRecord(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc,
                                    test_loss=test_loss, test_acc=test_acc, train_time_s=t1 - t0,
                                    eval_time_s=t2 - t1, wall_time_s=time.perf_counter() - t_call)
                records.append(rec)
                if ckpt_path is not None and rank == 0:  # (GlobalBatchNorm2d's state dict is BatchNorm2d's)
                    T._save_checkpoint(ckpt_path, identity, mask, net, opt, sched, train_loader, device, records,
                                       phases, epoch + 1)
                if epoch + 1 == config.epochs:
                    completed = True
                stop = on_epoch is not None and on_epoch(rec) is True
                # every rank stops together, whatever each rank's callback said
                if _all_reduce_(torch.tensor([float(stop)], device=device), size).item() > 0:
                    break
    finally:
        _set_batchnorm(net, nn.BatchNorm2d)
    net.eval()
    return T.TrainResult(records=records, phases=phases, model=net, mask=mask, config=config, device=str(device),
                         forward_flops=fwd_flops, train_step_flops=step_flops, live_forward_flops=live_flops,
                         params=T._count(net), live_params=live_params, completed=completed,
                         resumed_from=resumed_from)


# ------------------------------------------------------------------------------------ grid: claims
_held: dict[str, str] = {}  # claim file -> the content we wrote
_held_lock = threading.Lock()
_heartbeat: threading.Thread | None = None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # a zombie: dead, not yet reaped by its parent
            return False
        if start is not None and fields[19] != start:  # the pid was reused by another process
            return False
    except (OSError, IndexError):
        pass
    return True


def _me() -> dict:
    rank, size = world()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "pid": os.getpid(),
            "start": _proc_start(os.getpid()), "rank": rank, "world_size": size, "time": time.time()}


def _claim_path(run_dir) -> str:
    return os.path.join(os.fspath(run_dir), CLAIM_NAME)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def claim_owner(run_dir) -> dict | None:
    """The owner record of a run's claim (host, pid, rank, ...), None when unclaimed; ``{}`` when
    the file is there but not (yet) readable as JSON."""
    text = _read(_claim_path(run_dir))
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _stale(path: str, text: str, stale_after: float | None) -> bool:
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    try:
        owner = json.loads(text)
    except ValueError:  # created but never written: its creator died in between (or is writing now)
        return age > _BREAK_GUARD_STALE_S
    me = _me()
    if all(owner.get(k) == me[k] for k in ("host", "boot_id", "pid_ns")):  # pids we can see: check it
        return not _pid_alive(int(owner.get("pid", -1)), owner.get("start"))
    return stale_after is not None and age > stale_after


def _break(path: str, text: str) -> bool:
    """Remove a stale claim, unless someone replaced it meanwhile (breakers are serialised by a guard file)."""
    guard = path + ".break"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - os.stat(guard).st_mtime > _BREAK_GUARD_STALE_S:  # its breaker died
                os.unlink(guard)
        return False
    try:
        if _read(path) != text:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(guard)


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _held_lock:
            paths = list(_held)
        for p in paths:
            with contextlib.suppress(OSError):
                os.utime(p)


def _is_done(run_dir: str, done) -> bool:
    if callable(done):
        return bool(done(run_dir))
    return os.path.exists(os.path.join(run_dir, done))


def claim(run_dir, *, done: str | Callable[[str], bool] = DONE_NAME, stale_after: float | None = STALE_AFTER_S) -> bool:
    """Try to take ``run_dir`` for this process: True when it is now ours and not done yet.

    Atomic: the claim file ``run_dir/.claim`` is created with ``O_CREAT|O_EXCL`` and holds the
    owner's host, boot id, pid namespace, pid (and its start time), rank and time; of any number of
    processes on any number of hosts sharing the filesystem, at most one gets True. The done-marker
    (``done``: a file name in the run directory, or a predicate) is checked again after the claim is
    taken, so a run finished by another rank meanwhile is never redone. A claim is broken when its
    owner is dead: on this machine (same host name, boot id and pid namespace), its pid is gone (or
    reused, or a zombie); from anywhere else (another host or container), its heartbeat (refreshed
    every :data:`HEARTBEAT_S` seconds while held) is older than ``stale_after`` seconds (None:
    never). Release with :func:`release` (or use :func:`claimed`). Re-claiming a run this process
    already holds returns True.
    """
    run_dir = os.fspath(run_dir)
    if _is_done(run_dir, done):
        return False
    path = _claim_path(run_dir)
    with _held_lock:
        if path in _held and _read(path) == _held[path]:
            return True
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = _read(path)
            if text is None:
                continue  # released meanwhile: try again
            if _stale(path, text, stale_after) and _break(path, text):
                continue
            return False
        text = json.dumps(_me(), sort_keys=True)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        global _heartbeat
        with _held_lock:
            _held[path] = text
            if _heartbeat is None:
                _heartbeat = threading.Thread(target=_beat, name="fastweedout-claims", daemon=True)
                _heartbeat.start()
        if _is_done(run_dir, done):
            release(run_dir)
            return False
        return True
    return False


def release(run_dir) -> None:
    """Give up this process's claim on ``run_dir`` (a claim held by someone else is left alone)."""
    path = _claim_path(run_dir)
    with _held_lock:
        text = _held.pop(path, None)
    if text is not None and _read(path) == text:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def claimed(run_dir, **kw) -> Iterator[bool]:
    """``with claimed(d) as mine: if mine: run(d)`` -- released on exit, also on an exception."""
    mine = claim(run_dir, **kw)
    try:
        yield mine
    finally:
        if mine:
            release(run_dir)


# ------------------------------------------------------------------------------------ grid: order
def order_for_rank(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Indices ``0..n-1`` in the order this rank tries them: its own round-robin share
    (``i % world == rank``) first, then the other ranks' shares, last-first (stealing the runs their
    owners would reach last)."""
    if rank is None or world_size is None:
        r, w = world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    own = list(range(rank, n, world_size))
    others = [i for i in range(n - 1, -1, -1) if i % world_size != rank]
    return own + others


def grid_for_rank(configs: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """``configs`` in the order this rank should try them (:func:`order_for_rank`); a rank runs a
    config only once :func:`claim` gives it its run directory. Rank and world size default to
    :func:`world` (the launcher's environment: no process group is needed)."""
    return [configs[i] for i in order_for_rank(len(configs), rank, world_size)]


def run_grid(items: Sequence, run_dir: Callable[[Any], str], run: Callable[[Any, str], object], *,
             rank: int | None = None, world_size: int | None = None, done: str | Callable[[str], bool] = DONE_NAME,
             stale_after: float | None = STALE_AFTER_S) -> dict:
    """Run every item of the grid that no rank has done or is doing: for each item in
    :func:`grid_for_rank` order, ``run(item, dir)`` while holding the claim on ``dir =
    run_dir(item)``. ``run`` must write the done-marker when it finishes. Returns ``{"ran": [...],
    "skipped": [...]}`` (items; skipped = done or held by a live rank). An exception in ``run``
    releases the claim (a re-run tries again) and propagates."""
    ran, skipped = [], []
    for item in grid_for_rank(list(items), rank, world_size):
        d = run_dir(item)
        with claimed(d, done=done, stale_after=stale_after) as mine:
            if not mine:
                skipped.append(item)
                continue
            run(item, d)
            ran.append(item)
    return {"ran": ran, "skipped": skipped}


def pending(run_dirs: Iterable[str], done: str | Callable[[str], bool] = DONE_NAME) -> list[str]:
    """The run directories that are not done (held by a live rank, or waiting for a re-run)."""
    return [d for d in run_dirs if not _is_done(os.fspath(d), done)]


# ------------------------------------------------------------------------------------ selfcheck
def _selfcheck(args) -> dict:
    """Sharded scoring == single-process scoring, the same search winner, and DDP step timing."""
    from .data import load_dataset
    from .masks import sample_masks
    from .model import WideResNet
    from .scoring import score_population
    from .search import random_search
    from .training import TrainConfig

    rank, size = setup("gloo" if args.cpu else None)
    dev = torch.device("cuda", local_rank()) if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    model = WideResNet(args.depth, args.width, num_classes=10, in_channels=1)
    model.reset_parameters(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 1, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    masks = sample_masks(model, args.population, args.sparsity, generator=torch.Generator().manual_seed(2))

    def timed(fn, reps):
        fn()  # warm-up
        if size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if size > 1:
            dist.barrier()
        return out, (time.perf_counter() - t0) / reps

    kw = dict(engine=args.engine, chunk_size=args.chunk)
    full, t_full = timed(lambda: score_population(model, masks, x, y, distributed=False, **kw), args.reps)
    shard, t_shard = timed(lambda: score_population(model, masks, x, y, **kw), args.reps)
    lo, hi = shard_range(args.population, rank, size)
    local = shard[lo:hi]
    gather_s = float("nan")
    if size > 1:
        _, gather_s = timed(lambda: gather_fitness(local, masks, y), 20)
    s_kw = dict(population=args.population, generations=2, sparsity=args.sparsity, batch_size=args.batch // 2,
                seed=3, **kw)
    win_1 = random_search(model, x, y, distributed=False, **s_kw).winner
    win_n = random_search(model, x, y, **s_kw).winner
    data = load_dataset("synthetic", synthetic=dict(train_size=args.train_size, test_size=64, val_size=32,
                                                    image_size=args.image_size))
    cfg = TrainConfig(epochs=1, batch_size=args.train_batch, lr=0.05, device="cpu" if args.cpu else None)
    mask = masks.select(0)
    t0 = time.perf_counter()
    res = train_ddp(model, mask, data, cfg, bn=args.bn)
    t_train = time.perf_counter() - t0
    out = {"world_size": size, "backend": str(dist.get_backend()), "device": str(dev), "population": args.population,
           "batch": args.batch, "model": f"wrn_{args.depth}_{args.width}", "image_size": args.image_size,
           "engine": args.engine, "threads": torch.get_num_threads(),
           "scoring_equal": bool(torch.equal(full, shard)),
           "scoring_max_abs_diff": float((full - shard).abs().max()),
           "same_winner": win_1 == win_n,
           "score_s_single_process": t_full, "score_s_sharded": t_shard,
           "scoring_speedup": t_full / t_shard, "gather_fitness_ms": 1e3 * gather_s,
           "train_images_per_s": res.phases["training"].images / res.phases["training"].wall_s,
           "train_epoch_s": t_train, "train_loss": res.final.train_loss, "bn": args.bn}
    gathered = [None] * size if size > 1 else None
    if size > 1:
        dist.all_gather_object(gathered, out)
    teardown()
    return {"rank0": out, "all_ranks_agree": gathered is None or all(
        o["scoring_equal"] and o["same_winner"] for o in gathered)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastweedout.distributed",
                                description="Checks and times sharded scoring and DDP training; run it under "
                                            "torchrun --nproc-per-node N")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("selfcheck")
    s.add_argument("--depth", type=int, default=10)
    s.add_argument("--width", type=int, default=1)
    s.add_argument("--population", type=int, default=16)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--image-size", type=int, default=16)
    s.add_argument("--sparsity", type=float, default=0.5)
    s.add_argument("--engine", default="compact")
    s.add_argument("--chunk", type=int, default=None)
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--train-size", type=int, default=256)
    s.add_argument("--train-batch", type=int, default=32)
    s.add_argument("--bn", default="local", choices=DDP_BN_MODES)
    s.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads per process")
    s.add_argument("--json", default=None, help="also write the result (rank 0) to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = _selfcheck(args)
    if world()[0] == 0:
        text = json.dumps(res, indent=2)
        print(text)
        if args.json:
            from .runs import atomic_write_text
            atomic_write_text(args.json, text + "\n")
    return 0 if res["all_ranks_agree"] else 1


__all__ = ["is_distributed", "world", "env_world", "local_rank", "setup", "teardown", "use_distributed",
           "shard_range", "gather_fitness", "population_checksum", "GlobalBatchNorm2d", "average_bn_buffers",
           "train_ddp", "claim", "release", "claimed", "claim_owner", "order_for_rank", "grid_for_rank",
           "run_grid", "pending", "DDP_BN_MODES", "CLAIM_NAME"]

if __name__ == "__main__":
    sys.exit(main())
