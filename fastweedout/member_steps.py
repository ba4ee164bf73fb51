"""Weedout after limited training of every member: each member's pruned network is trained a few SGD
steps from the parent's weights before it is scored (fitness = -loss, or accuracy, afterwards).

Every member of every generation trains on the same K training batches (a :class:`StepStream`
drawn once from the search's seed), so members are compared on equal terms and the result is a
pure function of the seed. Execution: one member at a time, on its physically pruned network
(``model.prune``: its FLOPs fall by about (1-eta)^2), SGD with momentum 0.9 and no weight decay at
``SearchConfig.member_lr``; BN in training mode during the steps (running statistics update as in
training), then the search's BN mode for scoring. Cost, counted in the search phase: per member
``K * member_batch * train_step_flops(pruned)`` plus the scoring forward on the validation batch.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from .config import SearchConfig
from .datasets import Split
from .flops import forward_flops, train_step_flops
from .loader import DeviceLoader
from .masks import Masks
from .model import WideResNet
from .scoring import member_losses


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
    fit, flops = [], 0
    torch_state = torch.random.get_rng_state()  # dropout draws must not depend on the population order
    try:
        for i in range(masks.population):
            torch.manual_seed(config.member_steps * 7919 + i)
            net = train_member(model, masks.member(i), stream, config.member_lr)
            with torch.no_grad():
                logits = net(images, bn=config.bn)
            fit.append(member_losses(logits[None], labels, config.metric).cpu())
            flops += stream.steps * stream.batch_size * train_step_flops(net, train_size)
            flops += images.shape[0] * forward_flops(net, size)
    finally:
        torch.random.set_rng_state(torch_state)
    fitness = torch.cat(fit).float()
    fitness = torch.where(torch.isfinite(fitness), fitness, torch.full_like(fitness, -float("inf")))
    return fitness, {"engine": "member-steps", "chunk_size": 1}, {"useful": flops, "executed": flops}


__all__ = ["StepStream", "score_after_steps", "train_member"]
