"""Weedout after K steps per member: the members trained one at a time against all of a chunk at
once (``torch.func.vmap`` over the stacked pruned weights), on the same population, the same K
training batches and the same validation batch; the fitness of both is checked to agree.

Both are ``fastweedout.search.member_steps`` (the library's two paths); useful FLOPs are the analytic K
training steps of every member's pruned network plus its scoring forward (2 FLOPs per multiply-add).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fastweedout as fw
from fastweedout.search.member_steps import StepStream, batched_fitness, one_at_a_time, score_after_steps

from .common import (
    Env,
    Record,
    append_jsonl,
    device_peak,
    fmt_num,
    fmt_s,
    interleaved,
    load_average,
    precision,
    progress,
    run_id,
)


@dataclass
class MemberStepsConfig:
    model: str = "wrn_10_1"
    etas: tuple[float, ...] = (0.4, 0.8)
    population: int = 20
    steps: int = 5
    member_batch: int = 64
    val_batch: int = 256
    image_size: int = 28
    in_channels: int = 1
    repeats: int = 3
    preset: str = "default"


@dataclass
class MemberStepsRecord(Record):
    model: str = ""
    eta: float = 0.0
    population: int = 0
    steps: int = 0
    member_batch: int = 0
    val_batch: int = 0
    variant: str = ""  # one-at-a-time | batched
    timing: dict | None = None
    useful_flops: int = 0
    useful_flops_per_s: float | None = None
    mfu: float | None = None
    speedup_vs_one_at_a_time: float | None = None
    max_fitness_diff: float | None = None


def run_member_steps(cfg: MemberStepsConfig, device: torch.device, out_path, *, quiet: bool = False) -> list:
    peak = device_peak(device, torch.float32)
    env, rid, rows = Env.capture(device, peak), run_id(), []
    model = fw.create_model(cfg.model, num_classes=10, in_channels=cfg.in_channels).to(device)
    data = fw.load_dataset("synthetic", synthetic=dict(train_size=max(cfg.member_batch * cfg.steps, 64),
                                                       test_size=16, val_size=cfg.val_batch,
                                                       image_size=cfg.image_size, channels=cfg.in_channels))
    stream = StepStream(data.train, steps=cfg.steps, batch_size=cfg.member_batch, mean=data.mean, std=data.std,
                        augment="none", seed=0)
    x = ((data.val.images.float() / 255 - torch.tensor(data.mean).view(1, -1, 1, 1))
         / torch.tensor(data.std).view(1, -1, 1, 1)).to(device)
    y = data.val.labels.to(device)
    search = fw.SearchConfig(member_steps=cfg.steps, member_batch=cfg.member_batch, member_lr=0.05)
    for eta in cfg.etas:
        pop = fw.sample_masks(model, cfg.population, eta, generator=0)
        flops = score_after_steps(model, pop.select([0]), x, y, stream, search)[2]["useful"] * cfg.population
        alone = one_at_a_time(model, pop, x, y, stream, search)
        batched = batched_fitness(model, pop, x, y, stream, search)[0]
        diff = float((alone - batched).abs().max())
        fns = {"one-at-a-time": lambda pop=pop: one_at_a_time(model, pop, x, y, stream, search),
               "batched": lambda pop=pop: batched_fitness(model, pop, x, y, stream, search)}
        load0 = load_average()
        times = interleaved(fns, device, cfg.repeats)
        group = []
        for variant, t in times.items():
            r = MemberStepsRecord(bench="member_steps", preset=cfg.preset, run_id=rid, env=vars(env),
                                  load_avg_before=load0, load_avg_after=load_average(),
                                  precision=precision(torch.float32, device), model=cfg.model, eta=eta,
                                  population=cfg.population, steps=cfg.steps, member_batch=cfg.member_batch,
                                  val_batch=cfg.val_batch, variant=variant, timing=vars(t), useful_flops=flops,
                                  useful_flops_per_s=flops / t.median_s, mfu=flops / t.median_s / peak.flops_per_s,
                                  max_fitness_diff=diff,
                                  speedup_vs_one_at_a_time=times["one-at-a-time"].median_s / t.median_s)
            group.append(r)
            progress(f"  [{cfg.model} eta={eta} P={cfg.population} K={cfg.steps}] {variant}: {fmt_s(t.median_s)}, "
                     f"{fmt_num(r.useful_flops_per_s, 'FLOP/s')}, x{r.speedup_vs_one_at_a_time:.2f}, "
                     f"max |fitness diff| {diff:.1e}", quiet)
        append_jsonl(out_path, group)
        rows += group
    return rows


__all__ = ["MemberStepsConfig", "MemberStepsRecord", "run_member_steps"]
