"""The processes a job runs on: one, or the ranks of a ``torch.distributed`` process group (as
``torchrun`` launches them; NCCL on GPUs, gloo on CPU).

:class:`World` is what the training loop and the scoring ask of it (rank, size, a shard of n items,
all-reduce, broadcast); on one process every operation is the identity, so there is one training
loop for one process and for DDP. Sharded scoring: each rank scores a contiguous slice of the
population and :func:`gather_fitness` all-gathers the fitness (every rank gets all of it, and a
checksum stops ranks that scored different populations). :class:`GlobalBatchNorm2d` normalises
with the statistics of the global batch on any backend (``nn.SyncBatchNorm`` needs CUDA).
"""

from __future__ import annotations

import datetime
import math
import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

DDP_BN_MODES = ("local", "sync")


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


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK, Slurm's SLURM_LOCALID; 0 otherwise)."""
    for k in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if k in os.environ:
            return int(os.environ[k])
    return 0


def setup(backend: str | None = None, timeout_s: float | None = None) -> World:
    """Initialise the default process group from the environment torchrun sets (idempotent).
    backend None: NCCL when CUDA is available (binding this process to ``cuda:LOCAL_RANK``), else gloo."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not _pg_ready():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "nccl" in backend:
            torch.cuda.set_device(local_rank())
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, **kw)
    return World.current()


def teardown() -> None:
    if _pg_ready():
        dist.destroy_process_group()


@dataclass(frozen=True)
class World:
    """Rank and size of the processes a job runs on; a single process is ``World()`` (rank 0 of 1)
    and every collective is then the identity."""

    rank: int = 0
    size: int = 1
    group: object = None

    @classmethod
    def current(cls, group=None) -> World:
        """The initialised process group's world, else a single process."""
        if _pg_ready():
            return cls(dist.get_rank(group), dist.get_world_size(group), group)
        return cls()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice ``[lo, hi)`` of n items."""
        return shard_range(n, self.rank, self.size)

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum over the ranks, in place (the identity on one process)."""
        if self.distributed:
            dist.all_reduce(t, group=self.group)
        return t

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def any(self, flag: bool, device) -> bool:
        """True on every rank when it is True on any (so all ranks stop together)."""
        t = self.all_reduce_(torch.tensor([float(flag)], device=device))
        return bool(t.item() > 0)


def use_distributed(flag: bool | None, group=None) -> bool:
    """Resolve a ``distributed`` argument: None = shard when a process group of more than one rank is
    initialised; True = require one; False = never."""
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"distributed must be True, False or None (auto), got {flag!r}")
    if flag is None:
        return is_distributed(group)
    if flag and not _pg_ready():
        raise ValueError("distributed=True needs an initialised torch.distributed process group "
                         "(fastweedout.world.setup() under torchrun)")
    return flag and dist.get_world_size(group) > 1


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice ``[lo, hi)`` of n items for ``rank``; sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank * n // world_size, (rank + 1) * n // world_size


def population_checksum(masks, labels: Tensor) -> int:
    """crc32 of the masks and the batch's labels: equal on ranks that score the same population."""
    crc = zlib.crc32(repr(sorted(masks.widths.items())).encode())
    for _, m in masks.items():
        crc = zlib.crc32(m.detach().cpu().contiguous().numpy().tobytes(), crc)
    return zlib.crc32(labels.detach().cpu().contiguous().numpy().tobytes(), crc)


def _collective_device(group=None) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if any(b in backend for b in ("gloo", "mpi")) or backend.startswith("cpu"):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def gather_fitness(local: Tensor, masks, labels: Tensor, group=None) -> Tensor:
    """All-gather every rank's fitness slice into the full ``[P]`` float32 CPU vector, identical on
    every rank. ValueError on every rank when the ranks scored different populations or batches."""
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


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the training-mode statistics of the global batch over all ranks (two
    all-reduces with autograd: per-channel sums, then squared deviations), on any backend. In eval
    mode or without a process group it is plain BatchNorm2d; its state-dict keys are BatchNorm2d's."""

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


def set_batchnorm(net: nn.Module, cls: type, group=None) -> None:
    """Switch every BatchNorm2d between the plain class and :class:`GlobalBatchNorm2d` in place (the
    subclass adds no state, so only the class changes)."""
    for m in net.modules():
        if type(m) in (nn.BatchNorm2d, GlobalBatchNorm2d):
            m.__class__ = cls
            if cls is GlobalBatchNorm2d:
                m.process_group = group
            else:
                m.__dict__.pop("process_group", None)


def average_bn_buffers(net: nn.Module, world: World) -> None:
    """Replace every BN running mean/variance by its mean over the ranks (one all-reduce)."""
    if not world.distributed:
        return
    bufs = [b for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var)]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in bufs])
    world.all_reduce_(flat)
    flat /= world.size
    i = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(flat[i:i + b.numel()].view_as(b))
            i += b.numel()


__all__ = ["DDP_BN_MODES", "GlobalBatchNorm2d", "World", "average_bn_buffers", "env_world", "gather_fitness",
           "is_distributed", "local_rank", "population_checksum", "set_batchnorm", "setup", "shard_range",
           "teardown", "use_distributed"]
