"""Weedout after limited training of every member: each member's pruned network is trained a few SGD
steps from the parent's weights before it is scored (fitness = -loss, or accuracy, afterwards).

Every member of every generation trains on the same K training batches (a :class:`StepStream`
drawn once from the search's seed), so members are compared on equal terms and the result is a
pure function of the seed. Each member trains its physically pruned network (``model.prune``: its
FLOPs fall by about (1-eta)^2) with SGD, momentum 0.9, no weight decay, at ``SearchConfig.member_lr``,
BN on batch statistics during the steps, then is scored in the search's BN mode.

Execution. *Batched* (on a GPU, for layerwise masks, so that every member's pruned network has the
same shapes, BN scored on batch statistics and no dropout): the members' pruned weights are stacked and
``torch.func.vmap(torch.func.grad(...))`` trains a chunk of members in one call per step (each
convolution becomes one grouped convolution over the chunk), SGD written out on the stacked tensors.
*One member at a time* otherwise (global masks give members different shapes; ``bn="running"``
needs each member's running statistics updated by the steps; dropout draws per member) and on a CPU,
where it is the faster of the two (see :func:`use_batched`). Both give the same fitness to float
rounding (tested). Cost, counted in the search phase: per member
``K * member_batch * train_step_flops(pruned)`` plus the scoring forward on the validation batch.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from fastweedout.config import SearchConfig
from fastweedout.cost.bytes import scoring_bytes
from fastweedout.cost.flops import forward_flops, train_step_flops
from fastweedout.data.datasets import Split
from fastweedout.data.loader import DeviceLoader
from fastweedout.engines.scoring import member_losses
from fastweedout.masks import Masks
from fastweedout.model.wrn import WideResNet


class StepStream:
    """The first ``steps`` training batches of a seeded, shuffled and augmented pass over a split:
    what every member trains on before it is scored (the same batches for every member)."""

    def __init__(self, split: Split, *, steps: int, batch_size: int, mean, std, augment: str, seed: int):
        if steps < 1 or batch_size < 1:
            raise ValueError("a step stream needs steps >= 1 and batch_size >= 1")
        if len(split) < batch_size:
            raise ValueError(f"the training split has {len(split)} images, fewer than one member batch of "
                             f"{batch_size}")
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self._loader = DeviceLoader(split, batch_size, mean=mean, std=std, shuffle=True, augment=augment,
                                    drop_last=True, seed=seed)
        self._batches: list[tuple[Tensor, Tensor]] | None = None
        self._crc = zlib.crc32(split.labels.cpu().numpy().tobytes())

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        if self._batches is None:
            out = []
            while len(out) < self.steps:  # several passes when K * batch exceeds the split
                for b in self._loader:
                    out.append(b)
                    if len(out) == self.steps:
                        break
            self._batches = out
        return self._batches

    def fingerprint(self) -> dict:
        return dict(steps=self.steps, batch_size=self.batch_size, seed=self.seed, labels_crc=self._crc)


def train_member(model: WideResNet, member: dict[str, Tensor], stream: StepStream, lr: float) -> WideResNet:
    """The member's pruned network after the stream's SGD steps (the parent is not modified)."""
    net = model.prune(member)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for x, y in stream.batches():
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


#: memory a chunk of members training at once may take for its activations (on a GPU: a quarter of
#: what is free, if that is more)
_BATCHED_BUDGET_BYTES = 2 << 30


def batched_ok(model: WideResNet, masks: Masks, config: SearchConfig) -> bool:
    """Whether the members can train stacked: same pruned shapes, no running statistics, no dropout."""
    return masks.is_uniform() and config.bn == "batch" and not model.dropout


def use_batched(model: WideResNet, masks: Masks, config: SearchConfig) -> bool:
    """Batched on a GPU, where a member's small steps are bound by kernel launches. On a CPU one member
    at a time is faster: vmap turns each convolution over the chunk into a grouped convolution, which
    oneDNN runs at a lower rate than the members' own dense ones (measured by ``python -m bench
    member-steps``: bench/results/member_steps.jsonl, discussed in bench/results/NOTES.md, "Weedout
    after K steps per member")."""
    return next(model.parameters()).device.type == "cuda" and batched_ok(model, masks, config)


def _member_chunk(model: WideResNet, masks: Masks, batch: int, size) -> int:
    # The activation bytes one member's forward moves (analytic, fp32) stand for what its step keeps
    # for the backward pass (the same tensors, give or take the BN/ReLU intermediates).
    per_member = scoring_bytes(model, masks.select([0]), batch, size, "loop")["activations"]
    device = next(model.parameters()).device
    budget = max(_BATCHED_BUDGET_BYTES, torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 0)
    return max(1, int(budget // max(1, per_member)))


def batched_fitness(model: WideResNet, masks: Masks, images: Tensor, labels: Tensor, stream: StepStream,
                    config: SearchConfig) -> tuple[Tensor, int]:
    """Fitness ``[P]`` after every member's steps, the members trained together (``torch.func.vmap`` over
    their pruned networks, a chunk of members at a time); returns (fitness, the chunk size). Only for
    populations whose pruned networks share their shapes (:func:`batched_ok`)."""
    base = model.prune(masks.member(0))  # every member's pruned network has these shapes (batched_ok)
    names = [n for n, _ in base.named_parameters()]

    def loss(params, x, y):
        return torch.nn.functional.cross_entropy(functional_call(base, params, (x,), {"bn": "batch"}).float(), y)

    def logits(params):
        return functional_call(base, params, (images,), {"bn": "batch"})

    step = vmap(grad(loss), in_dims=(0, None, None))
    chunk = _member_chunk(model, masks, stream.batch_size, tuple(stream.batches()[0][0].shape[2:]))
    out = []
    for lo in range(0, masks.population, chunk):  # prune a chunk at a time: P pruned copies may not fit
        part = [dict(model.prune(masks.member(i)).named_parameters())
                for i in range(lo, min(lo + chunk, masks.population))]
        params = {n: torch.stack([p[n].detach() for p in part]) for n in names}
        del part
        bufs: dict[str, Tensor] = {}
        for x, y in stream.batches():  # torch.optim.SGD(momentum=0.9): buf = 0.9 buf + g; p -= lr buf
            g = step(params, x, y)
            for n in names:
                bufs[n] = g[n] if n not in bufs else bufs[n].mul_(0.9).add_(g[n])
                params[n] = params[n] - config.member_lr * bufs[n]
        with torch.no_grad():
            out.append(member_losses(vmap(logits)(params), labels, config.metric).cpu())
    return torch.cat(out), min(chunk, masks.population)


def score_after_steps(model: WideResNet, masks: Masks, images: Tensor, labels: Tensor, stream: StepStream,
                      config: SearchConfig) -> tuple[Tensor, dict, dict]:
    """Fitness ``[P]`` of every member after its steps; returns (fitness, info, FLOPs of the steps and
    of the scoring forward: ``{"useful", "executed"}``, equal, since pruned networks run)."""
    if stream.steps != config.member_steps or stream.batch_size != config.member_batch:
        raise ValueError(f"the step stream ({stream.steps} x {stream.batch_size}) does not match member_steps "
                         f"{config.member_steps} x member_batch {config.member_batch}")
    masks.check(model.node_layers())
    size = tuple(images.shape[2:])
    train_size = tuple(stream.batches()[0][0].shape[2:])
    flops = 0
    for i in range(masks.population):
        net = model.prune(masks.member(i))
        flops += stream.steps * stream.batch_size * train_step_flops(net, train_size)
        flops += images.shape[0] * forward_flops(net, size)
    if use_batched(model, masks, config):
        engine = "member-steps-batched"
        fitness, chunk = batched_fitness(model, masks, images, labels, stream, config)
    else:
        fitness, chunk, engine = one_at_a_time(model, masks, images, labels, stream, config), 1, "member-steps"
    fitness = fitness.float()
    fitness = torch.where(torch.isfinite(fitness), fitness, torch.full_like(fitness, -float("inf")))
    return fitness, {"engine": engine, "chunk_size": chunk}, {"useful": flops, "executed": flops}


def one_at_a_time(model: WideResNet, masks: Masks, images: Tensor, labels: Tensor, stream: StepStream,
                  config: SearchConfig) -> Tensor:
    """Fitness ``[P]`` after every member's steps, one member trained and scored at a time (the reference)."""
    fit = []
    torch_state = torch.random.get_rng_state()  # dropout draws must not depend on the population order
    try:
        for i in range(masks.population):
            torch.manual_seed(config.member_steps * 7919 + i)
            net = train_member(model, masks.member(i), stream, config.member_lr)
            with torch.no_grad():
                logits = net(images, bn=config.bn)
            fit.append(member_losses(logits[None], labels, config.metric).cpu())
    finally:
        torch.random.set_rng_state(torch_state)
    return torch.cat(fit)


__all__ = ["StepStream", "batched_fitness", "batched_ok", "one_at_a_time", "score_after_steps", "train_member",
           "use_batched"]
