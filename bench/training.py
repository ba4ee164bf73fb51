"""Training-step benchmark: images/s of one SGD step, dense vs pruned (vs masked) at each sparsity,
eager vs ``torch.compile``, fp32 vs bf16 autocast (GPU), with model FLOPs utilisation.

A step is what ``fastweedout.training.loop`` runs: forward (under bf16 autocast when asked), fp32
cross-entropy, backward, SGD with Nesterov momentum and weight decay (``fastweedout.training.loop.make_optimizer``),
on a batch resident on the device, in each layout of ``layouts`` (default: the one ``TrainConfig``
picks on that device: channels_last on a GPU, NCHW on a CPU; ``--layouts nchw,channels_last`` times
both side by side). Variants:

* ``dense``: the full network (eta = 0);
* ``pruned``: ``model.prune(mask)``, the physically smaller network ``train()`` trains by default;
* ``masked``: the full network under the mask (``fastweedout.model.masked.MaskedNet``, ``TrainConfig(masked=True)``).

MFU = useful FLOPs of the step (forward + backward of the live sub-network,
``fastweedout.cost.flops.training_flops``; 2 FLOPs per multiply-add) per second / the device's peak;
``executed`` FLOPs are what the variant computes (masked: the dense step).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

import fastweedout as fw
from fastweedout.cost.flops import training_flops
from fastweedout.model.masked import MaskedNet
from fastweedout.training.loop import TrainConfig, criterion, make_optimizer

from .common import (
    Env,
    PeakMemory,
    Record,
    append_jsonl,
    cold_compile,
    device_peak,
    fmt_num,
    fmt_s,
    interleaved,
    load_average,
    precision,
    progress,
    run_id,
    sync,
)

VARIANTS = ("dense", "pruned", "masked")
LAYOUTS = ("nchw", "channels_last")


@dataclass
class TrainingConfig:
    models: list[str]
    etas: list[float]
    batch: int = 64
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    variants: list[str] | None = None  # None: dense (eta 0), pruned and masked (eta > 0)
    compile_modes: list[bool] | None = None  # [False, True]
    compile_etas: list[float] | None = None  # compile only at these etas (None: all)
    dtypes: list[str] | None = None  # None: float32 on CPU; float32 and bfloat16 on GPU
    layouts: list[str] | None = None  # "nchw" / "channels_last"; None: TrainConfig's default on the device
    repeats: int = 5
    warmup: int = 2
    compile_backend: str = "inductor"  # aot_eager: checks the compiled path quickly (dry runs)
    seed: int = 0
    preset: str = "custom"


@dataclass
class TrainingRecord(Record):
    model: str = ""
    depth: int = 0
    width: int = 0
    batch: int = 0
    image_size: int = 0
    in_channels: int = 3
    eta: float = 0.0
    variant: str = ""  # dense | pruned | masked
    compiled: bool = False
    dtype: str = "float32"  # float32, or bfloat16 (autocast)
    channels_last: bool = False
    params: int = 0  # of the network run
    timing: dict | None = None
    compile_s: float | None = None
    first_step_s: float | None = None
    images_per_s: float | None = None
    useful_flops_per_image: int = 0  # one step (forward + backward), live sub-network
    executed_flops_per_image: int = 0
    useful_flops_per_s: float | None = None
    mfu: float | None = None  # useful FLOP/s / peak
    executed_fraction_of_peak: float | None = None
    peak_mem_bytes: int | None = None
    mem_kind: str = ""
    speedup_vs_dense: float | None = None  # dense step time (same dtype, same compile) / this one


def _make_step(net, device, amp_dtype, compiled, channels_last, lr=0.05, backend="inductor"):
    cfg = TrainConfig(epochs=1, lr=lr)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    opt = make_optimizer(net, cfg)
    if compiled:
        cold_compile()
    fwd = torch.compile(net, backend=backend) if compiled else net
    amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())

    def step(x, y):
        with amp:
            logits = fwd(x)
        loss = criterion(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, net


def run_training(cfg: TrainingConfig, device: torch.device, out_path, *, quiet: bool = False,
                 deadline: float | None = None) -> list[TrainingRecord]:
    """Every (model, dtype, eta) group; rows appended to ``out_path`` after each group. Groups not
    started by ``deadline`` (``time.monotonic()``) are left out (the summary says so)."""
    cuda = device.type == "cuda"
    dtypes = cfg.dtypes or (["float32", "bfloat16"] if cuda else ["float32"])
    compile_modes = cfg.compile_modes if cfg.compile_modes is not None else [False, True]
    layouts = cfg.layouts or ([LAYOUTS[1]] if TrainConfig(epochs=1).resolved(device)["channels_last"] else [LAYOUTS[0]])
    bad = sorted(set(layouts) - set(LAYOUTS))
    if bad:
        raise ValueError(f"unknown layouts {bad}: choose from {', '.join(LAYOUTS)}")
    rid = run_id()
    rows_all: list[TrainingRecord] = []
    peaks = {dt: device_peak(device, getattr(torch, dt)) for dt in dtypes}
    progress(f"[training] device={device} dtypes={dtypes} compile={compile_modes} "
             f"peaks={ {k: fmt_num(v.flops_per_s, 'FLOP/s') for k, v in peaks.items()} } load={load_average()}", quiet)
    if cuda:
        torch.backends.cudnn.benchmark = True
    for name in cfg.models:
        base_model = fw.create_model(name, num_classes=cfg.num_classes, in_channels=cfg.in_channels)
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(cfg.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
        y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=g).to(device)
        xs = {lay: x.contiguous(memory_format=torch.channels_last) if lay == "channels_last" else x
              for lay in layouts}
        for dt in dtypes:
            env = Env.capture(device, peaks[dt])
            dense_times: dict[tuple[bool, bool], float] = {}  # (compiled, channels_last) -> step
            for eta in sorted(cfg.etas):  # dense (eta 0) first: the reference of speedup_vs_dense
                if deadline is not None and time.monotonic() > deadline:
                    progress(f"  [{name} {dt} eta={eta}] skipped: time budget spent", quiet)
                    continue
                # eta = 0 is the dense network (pruned = masked = dense there); eta > 0: pruned / masked.
                variants = ["dense"] if eta == 0.0 else [v for v in (cfg.variants or VARIANTS) if v != "dense"]
                mask = None if eta == 0.0 else fw.sample_masks(
                    base_model, 1, eta, generator=torch.Generator().manual_seed(cfg.seed + 1)).member(0)
                rows = _one_group(cfg, base_model, name, mask, eta, variants, compile_modes, dt, xs, y, device,
                                  env, rid, quiet, dense_times)
                append_jsonl(out_path, rows)
                rows_all.extend(rows)
                if not quiet:
                    print(format_table(rows), flush=True)
    return rows_all


def _one_group(cfg, base_model, name, mask, eta, variants, compile_modes, dt, xs, y, device, env, rid, quiet,
               dense_times):
    amp_dtype = None if dt == "float32" else getattr(torch, dt)
    load0 = load_average()
    hw = (cfg.image_size, cfg.image_size)
    rows: dict[tuple, TrainingRecord] = {}
    fns = {}
    for variant in variants:
        if variant == "dense":
            net, fl = _copy(base_model), training_flops(base_model, hw)
        elif variant == "pruned":
            net, fl = base_model.prune(mask), training_flops(base_model, hw, mask)
        else:
            net, fl = MaskedNet(_copy(base_model), mask), training_flops(base_model, hw, mask, masked=True)
        for compiled in compile_modes:
            if compiled and cfg.compile_etas is not None and eta not in cfg.compile_etas:
                continue
            for layout, x in xs.items():
                channels_last = layout == "channels_last"
                key = (variant, compiled, channels_last)
                row = TrainingRecord(
                    bench="training", preset=cfg.preset, run_id=rid, env=vars(env), load_avg_before=load0,
                    load_avg_after=None, model=name, depth=base_model.depth, width=base_model.width,
                    batch=cfg.batch, image_size=cfg.image_size, in_channels=cfg.in_channels, eta=eta,
                    variant=variant, compiled=compiled, dtype=dt, channels_last=channels_last,
                    useful_flops_per_image=fl["useful"], precision=precision(getattr(torch, dt), device),
                    executed_flops_per_image=fl["executed"])
                rows[key] = row
                try:
                    step, run_net = _make_step(_copy(net), device, amp_dtype, compiled, channels_last,
                                               backend=cfg.compile_backend)
                    row.params = sum(p.numel() for p in run_net.parameters())
                    t0 = time.perf_counter()
                    step(x, y)
                    sync(device)
                    row.first_step_s = time.perf_counter() - t0
                    for _ in range(max(0, cfg.warmup - 1)):
                        step(x, y)
                    with PeakMemory(device, exact=not compiled) as pm:
                        step(x, y)
                    row.peak_mem_bytes, row.mem_kind = pm.bytes, pm.kind
                    fns[key] = (lambda s, xi: (lambda: s(xi, y)))(step, x)
                    progress(f"  [{name} eta={eta} {dt}] {variant}{' compiled' if compiled else ''} {layout}: "
                             f"first step {fmt_s(row.first_step_s)}", quiet)
                except Exception as exc:
                    row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:500]
                    progress(f"  [{name} eta={eta}] {variant} compiled={compiled} {layout}: ERROR {row.note}", quiet)
    timings = interleaved(fns, device, cfg.repeats)
    load1 = load_average()
    for key, row in rows.items():
        row.load_avg_after = load1
        t = timings.get(key)
        if t is None:
            continue
        row.timing = vars(t)
        row.images_per_s = cfg.batch / t.median_s
        row.useful_flops_per_s = row.useful_flops_per_image * row.images_per_s
        row.mfu = row.useful_flops_per_s / env.peak_flops_per_s
        row.executed_fraction_of_peak = row.executed_flops_per_image * row.images_per_s / env.peak_flops_per_s
        if row.compiled and row.first_step_s is not None:
            row.compile_s = max(0.0, row.first_step_s - t.median_s)
        if row.variant == "dense":
            dense_times[(row.compiled, row.channels_last)] = t.median_s
    for row in rows.values():
        if row.timing and (row.compiled, row.channels_last) in dense_times:
            row.speedup_vs_dense = dense_times[(row.compiled, row.channels_last)] / row.timing["median_s"]
    return list(rows.values())


def _copy(model):
    import copy
    return copy.deepcopy(model)


def format_table(rows) -> str:
    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"{r0['model']}  batch={r0['batch']}  {r0['in_channels']}x{r0['image_size']}x{r0['image_size']}  "
             f"eta={r0['eta']}  {r0['dtype']}  load {r0['load_avg_before']} -> {r0['load_avg_after']}",
             f"  {'variant':<9}{'compiled':>9}{'layout':>14}{'step':>10}{'IQR':>6}{'img/s':>9}{'x dense':>9}"
             f"{'MFU %':>7}{'compile':>10}{'params':>9}{'mem':>10}  note"]
    for r in rows:
        t = r.get("timing") or {}
        med = t.get("median_s")
        iqr = (t["q75_s"] - t["q25_s"]) / med if med else None
        layout = "channels_last" if r.get("channels_last") else "nchw"
        lines.append(f"  {r['variant']:<9}{str(r['compiled']):>9}{layout:>14}{fmt_s(med):>10}"
                     f"{(f'{iqr:.0%}' if iqr is not None else '-'):>6}{fmt_num(r.get('images_per_s')):>9}"
                     f"{(format(r['speedup_vs_dense'], '.2f') if r.get('speedup_vs_dense') else '-'):>9}"
                     f"{(format(100 * r['mfu'], '.1f') if r.get('mfu') else '-'):>7}{fmt_s(r.get('compile_s')):>10}"
                     f"{fmt_num(r.get('params')):>9}{fmt_num(r.get('peak_mem_bytes'), 'B'):>10}"
                     f"  {'' if r['status'] == 'ok' else r['status']} {(r.get('note') or '')[:70]}")
    return "\n".join(lines)
