"""Population scoring benchmark: every engine and baseline side by side, in one run.

Methods (the ``engine`` column):

* ``loop``, ``folded``, ``compact``: ``fastweedout.score_population`` with that engine, PyTorch ops
  (``ops.use_kernels(False)``: cuDNN / oneDNN convolutions, the eager epilogue);
* ``folded-triton``, ``compact-triton``: the same engines with the Triton kernels
  (``ops.use_kernels(True)``), only where they run natively (a CUDA device; on CPU they would run
  in Triton's NumPy interpreter, which measures nothing of interest, so they are skipped);
* ``torch.func``: the outside baseline of vectorising over members: ``torch.func.vmap`` of
  ``torch.func.functional_call`` of the reference masked network over the members' masks (the
  weights are shared, so vmap folds the members into the batch);
* ``folded-compile``: the folded engine's forward + fitness under ``torch.compile`` (Inductor);
  compile time is measured on the first call and reported separately;
* the baselines a user would write (``baselines.py``): ``pruned-loop`` (``model.prune`` per member,
  then its forward), ``vmap-pruned`` (the pruned members stacked, ``vmap`` of ``functional_call``),
  ``torch-pruning`` (Torch-Pruning's DepGraph per member, the ``bench`` extra), ``pruned-graph`` (a
  pruned network in a CUDA graph, replayed per member with its weights copied in; CUDA only),
  ``compact-compile`` (the compact engine under ``torch.compile``) and ``compact-max-autotune``
  (the same with ``mode="max-autotune"``; CUDA only). Pruning time is inside their timed calls and
  recorded (``prune_s``); a baseline that cannot run here is a skipped row with the reason.

Speedups are stated against the **fastest baseline** of each configuration (the fastest of
``baselines.BASELINE_SET`` that ran: ``speedup_vs_baseline``, with its name in ``baseline``) and,
as one more reference, against ``loop`` (``speedup_vs_loop``).

Every method runs channels_last by default, on a GPU and on a CPU (the model's weights and the
images; the engines keep it): it is the faster layout for cuDNN and for oneDNN alike, so the baselines
get it as the engines do (``--layout nchw`` runs the baselines in the other).

Every method scores the same masks on the same images; its fitness is compared with ``loop``'s
(``fitness_rel_err``). Reports time (median, quartiles, min/max of interleaved repeats; CPU time on
CPU), members x images per second, useful and executed FLOPs (``fastweedout.engines.registry.scoring_flops``;
2 FLOPs per multiply-add) per second, bytes moved (``fastweedout.cost.bytes.scoring_bytes``) per second,
both roofline ratios (useful FLOP/s / the compute peak *of the precision that ran*, bytes/s / the
memory bandwidth), peak memory, and both speedups (wall time, and CPU time on CPU).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fastweedout as fw
from fastweedout.cost.bytes import scoring_bytes
from fastweedout.engines import FoldedBackend, pad_multiple
from fastweedout.engines.registry import choose_engine, scoring_flops
from fastweedout.engines.scoring import auto_chunk, member_losses, score_population
from fastweedout.model.backend import MaskedBackend
from fastweedout.ops import dispatch as ops

from . import baselines as bl
from .common import (
    Env,
    PeakMemory,
    Record,
    Timing,
    append_jsonl,
    cold_compile,
    device_peak,
    fmt_num,
    fmt_s,
    interleaved,
    load_average,
    precision,
    progress,
    roofline,
    run_id,
    sync,
)

CORE_ENGINES = ("loop", "folded", "compact")
TRITON_ENGINES = ("folded-triton", "compact-triton")
BASELINES = ("torch.func", "folded-compile")
# the baselines a user would write (bench/baselines.py); the max-autotune compile last (the longest)
USER_BASELINES = ("pruned-loop", "vmap-pruned", "torch-pruning", "pruned-graph", "compact-compile",
                  "compact-max-autotune")
ALL_ENGINES = CORE_ENGINES + TRITON_ENGINES + BASELINES + USER_BASELINES
# scoring_flops rule for each method's executed FLOPs (vmap and compile run the folded computation;
# "pruned": every member's pruned network, so executed = useful).
FLOPS_RULE = {"loop": "loop", "folded": "folded", "compact": "compact", "folded-triton": "folded",
              "compact-triton": "compact", "torch.func": "folded", "folded-compile": "folded",
              "pruned-loop": "pruned", "vmap-pruned": "pruned", "torch-pruning": "pruned", "pruned-graph": "pruned",
              "compact-compile": "compact", "compact-max-autotune": "compact"}
VMAP_CPU_BUDGET = 2 << 30  # vmap-pruned's activations per chunk on a CPU (bytes)
COMPILED = ("folded-compile", "compact-compile", "compact-max-autotune")  # compile_s recorded, memory by RSS
# methods that run on a CUDA device only, and why not elsewhere
CUDA_ONLY = {
    "pruned-graph": "needs a CUDA device: a CUDA graph (torch.cuda.CUDAGraph) captures GPU kernel launches, "
                    "and a CPU has none to capture",
    "compact-max-autotune": "GPU only: mode='max-autotune' searches GPU kernel configurations (Triton templates, "
                            "CUDA graphs); on a CPU compact-compile is the compiled baseline",
}


@dataclass
class ScoringConfig:
    models: list[str]
    populations: list[int]
    etas: list[float]
    batch: int = 64
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    engines: list[str] | None = None  # None: all that can run here
    mode: str = "layerwise"
    bn: str = "batch"
    metric: str = "loss"
    dtype: str = "float32"
    repeats: int = 3
    warmup: int = 0  # untimed calls after the first (which always warms up) and before the memory call
    chunk_size: int | None = None  # None: each engine's automatic chunking
    compile_max_population: int = 100  # skip folded-compile above this (compile time grows with P)
    compile_backend: str = "inductor"  # aot_eager: checks the compiled baseline's path quickly (dry runs)
    channels_last: bool = True  # the model's and the images' layout (--layout nchw: False)
    memory_call: bool = True  # one extra untimed call measures peak memory (False: the first call does)
    interpreter_ok: bool = False  # run the Triton variants under Triton's interpreter too (dry runs: checks the path)
    seed: int = 0
    preset: str = "custom"


@dataclass
class ScoringRecord(Record):
    model: str = ""
    depth: int = 0
    width: int = 0
    population: int = 0
    batch: int = 0
    image_size: int = 0
    in_channels: int = 3
    eta: float = 0.0
    mask_sparsity: float = 0.0  # measured fraction of nodes off
    mode: str = "layerwise"
    bn: str = "batch"
    metric: str = "loss"
    dtype: str = "float32"
    engine: str = ""
    flops_rule: str = ""
    chunk_size: int | None = None
    warmup: int = 0
    timing: dict | None = None
    compile_s: float | None = None
    first_call_s: float | None = None
    members_images_per_s: float | None = None
    useful_flops: int = 0  # per call (whole population on the batch)
    executed_flops: int = 0
    useful_flops_per_s: float | None = None
    executed_flops_per_s: float | None = None
    useful_fraction_of_peak: float | None = None  # useful FLOP/s / the peak of this row's precision
    useful_fraction_of_cpu_peak: float | None = None  # CPU: useful FLOPs per CPU second / the matmul's
    peak_flops_per_s: float | None = None  # that peak
    bytes_moved: int | None = None  # per call (fastweedout.cost.bytes.scoring_bytes; None: no model for this method)
    bytes_per_s: float | None = None
    bandwidth_fraction: float | None = None  # bytes/s / the device's memory bandwidth
    peak_bytes_per_s: float | None = None
    channels_last: bool = False
    peak_mem_bytes: int | None = None
    mem_kind: str = ""
    speedup_vs_loop: float | None = None  # loop median wall / this median wall
    cpu_speedup_vs_loop: float | None = None  # same with CPU time (CPU runs)
    baseline: str | None = None  # the fastest baseline of this configuration (baselines.BASELINE_SET), wall time
    baseline_median_s: float | None = None
    speedup_vs_baseline: float | None = None  # the fastest baseline's median wall / this median wall
    cpu_baseline: str | None = None  # CPU runs: the baseline with the least process CPU time
    cpu_speedup_vs_baseline: float | None = None  # that baseline's CPU time / this CPU time (CPU runs)
    prune_s: float | None = None  # host seconds per call spent pruning / gathering weights (median; baselines)
    auto_engine: str = ""  # what engine="auto" runs for these masks on this device
    compile_mode: str | None = None
    fitness_rel_err: float | None = None  # max |f - f_loop| / max |f_loop|


# ------------------------------------------------------------------------------------ methods
class _MaskedNet(nn.Module):
    """The reference masked network as a module whose masks are an input (for functional_call + vmap)."""

    def __init__(self, net: fw.WideResNet, bn: str):
        super().__init__()
        self.net, self.bn = net, bn

    def forward(self, x, masks):
        return self.net.walk(MaskedBackend(masks, self.bn, False), x)


def _even_chunks(p: int, chunk: int) -> list[tuple[int, int]]:
    """Split p members into equal-as-possible chunks of at most ``chunk`` (few distinct shapes)."""
    n = math.ceil(p / max(1, chunk))
    size = math.ceil(p / n)
    return [(s, min(s + size, p)) for s in range(0, p, size)]


def _float_masks(masks, lo, hi, device, dtype):
    return {k: v[lo:hi].to(device=device, dtype=dtype) for k, v in masks.items()}


def make_vmap_scorer(model, masks, x, y, bn, metric, chunk) -> Callable[[], torch.Tensor]:
    from torch.func import functional_call, vmap

    wrapper = _MaskedNet(model, bn)
    state = {**dict(wrapper.named_parameters()), **dict(wrapper.named_buffers())}
    state = {k: v.detach() for k, v in state.items()}

    def member(fm, xb):
        return functional_call(wrapper, state, (xb, fm))

    batched = vmap(member, in_dims=(0, None))
    parts = [_float_masks(masks, lo, hi, x.device, x.dtype) for lo, hi in _even_chunks(masks.population, chunk)]

    @torch.no_grad()
    def run():
        return torch.cat([member_losses(batched(fm, x), y, metric).cpu() for fm in parts])

    return run


def make_compiled_folded(model, masks, x, y, bn, metric, chunk,
                         backend: str = "inductor") -> Callable[[], torch.Tensor]:
    bsz = x.shape[0]

    def fitness(xb, yb, fm, p: int):
        return member_losses(model.walk(FoldedBackend(fm, bn, p, bsz), xb), yb, metric)

    cold_compile()
    compiled = torch.compile(fitness, dynamic=False, backend=backend)
    parts = [_float_masks(masks, lo, hi, x.device, x.dtype) for lo, hi in _even_chunks(masks.population, chunk)]

    @torch.no_grad()
    def run():
        with ops.use_kernels(False):
            return torch.cat([compiled(x, y, fm, next(iter(fm.values())).shape[0]).cpu() for fm in parts])

    return run


def make_engine(model, masks, x, y, engine, bn, metric, chunk_size) -> Callable[[], torch.Tensor]:
    base, triton = engine.replace("-triton", ""), engine.endswith("-triton")

    @torch.no_grad()
    def run():
        with ops.use_kernels(triton):
            return score_population(model, masks, x, y, engine=base, metric=metric, bn=bn, chunk_size=chunk_size)

    return run


def triton_status(device: torch.device, interpreter_ok: bool = False) -> tuple[bool, str]:
    """(whether the Triton engine variants run here, why not)."""
    if device.type != "cuda" and not interpreter_ok:
        return False, "no CUDA device: the Triton kernels would run in the interpreter (not a benchmark)"
    try:
        with ops.use_kernels(True):
            ok = ops.kernels_active(torch.empty(1, 1, 1, 1, device=device))
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"kernels unavailable: {e!r}"
    return bool(ok), "" if ok else "fastweedout.ops.triton do not run on this device/dtype"


def engines_here(cfg: ScoringConfig, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The methods to run and, for those skipped, why."""
    want = list(cfg.engines) if cfg.engines else list(ALL_ENGINES)
    unknown = [e for e in want if e not in ALL_ENGINES]
    if unknown:
        raise SystemExit(f"bench scoring: unknown engine(s) {unknown}; choose from {list(ALL_ENGINES)}")
    if "loop" not in want:
        want.insert(0, "loop")  # every row's speedup and error are against loop
    skipped = {}
    if device.type != "cuda":
        for e, why in CUDA_ONLY.items():
            if e in want:
                want.remove(e)
                skipped[e] = why
    ok, why = triton_status(device, cfg.interpreter_ok)
    if not ok:
        for e in TRITON_ENGINES:
            if e in want:
                want.remove(e)
                skipped[e] = why
    return want, skipped


# ------------------------------------------------------------------------------------ the run
def run_scoring(cfg: ScoringConfig, device: torch.device, out_path, *, quiet: bool = False,
                deadline: float | None = None) -> list[ScoringRecord]:
    """Every configuration of ``cfg``; rows appended to ``out_path`` after each configuration.
    ``deadline`` (``time.monotonic()``): configurations not started by then are recorded as skipped."""
    dtype = getattr(torch, cfg.dtype)
    peak = device_peak(device, dtype)
    env = Env.capture(device, peak)
    rid = run_id()
    engines, skipped = engines_here(cfg, device)
    cl = cfg.channels_last
    progress(f"[scoring] device={env.device} threads={env.threads} peak={fmt_num(peak.flops_per_s, 'FLOP/s')} "
             f"{peak.dtype} ({peak.source}) engines={engines} skipped={list(skipped)} load={load_average()}", quiet)
    # cudnn.benchmark stays as the library leaves it (off): a search meets each shape a few times, and
    # on an H200 cuDNN's timing of the compact engine's grouped convolutions took over 60 s per shape set.
    all_rows: list[ScoringRecord] = []
    for name in cfg.models:
        model = fw.create_model(name, num_classes=cfg.num_classes, in_channels=cfg.in_channels)
        model = model.to(device=device, dtype=dtype).eval()
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(cfg.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
        y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=g)
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        if cl:  # fair baselines: NHWC convolutions (cuDNN, oneDNN) for the loops and the pruned networks too
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        for p in cfg.populations:
            for eta in cfg.etas:
                masks = fw.sample_masks(model, p, eta, cfg.mode, torch.Generator().manual_seed(cfg.seed + 1))
                if deadline is not None and time.monotonic() > deadline:
                    rows = _skipped_rows(cfg, model, name, masks, x, eta, engines + list(skipped), env, rid,
                                         "time budget spent before this configuration")
                else:
                    rows = _one_config(cfg, model, name, masks, x, y, eta, engines, skipped, device, env, rid, quiet,
                                       cl, deadline)
                append_jsonl(out_path, rows)
                all_rows.extend(rows)
                if not quiet:
                    print(format_table(rows), flush=True)
        del model
    return all_rows


def _base(cfg, model, name, masks, x, eta, env, rid, cl) -> dict:
    return dict(bench="scoring", preset=cfg.preset, run_id=rid, env=vars(env), load_avg_before=load_average(),
                load_avg_after=None, model=name, depth=model.depth, width=model.width, population=masks.population,
                batch=x.shape[0], image_size=cfg.image_size, in_channels=cfg.in_channels, eta=eta,
                mask_sparsity=round(masks.sparsity(), 6), mode=cfg.mode, bn=cfg.bn, metric=cfg.metric,
                dtype=cfg.dtype, warmup=cfg.warmup, precision=precision(x.dtype, x.device), channels_last=cl)


def _work(model, masks, x, e: str, bn: str) -> tuple[dict, dict | None, str]:
    """(FLOPs, bytes, rule) of one method: the compact Triton engine runs widths padded to 16."""
    rule = FLOPS_RULE[e]
    triton = e.endswith("-triton")
    with ops.use_kernels(triton):  # the switch make_engine runs the method under
        pad = pad_multiple(x.device, x.dtype) if rule == "compact" else 1
    hw = (x.shape[2], x.shape[3])
    if rule == "pruned":  # each member's pruned network: what runs is the live sub-network
        fl = scoring_flops(model, masks, x.shape[0], hw, "loop")
        fl["executed"] = fl["useful"]
        return fl, None, rule  # no bytes model for these methods
    fl = scoring_flops(model, masks, x.shape[0], hw, rule, pad_multiple=pad)
    by = None if e in COMPILED else scoring_bytes(model, masks, x.shape[0], hw, rule, bn=bn, kernels=triton,
                                                  element_size=x.element_size(), pad_multiple=pad)
    return fl, by, rule


def _skipped_rows(cfg, model, name, masks, x, eta, engines, env, rid, why):
    base = _base(cfg, model, name, masks, x, eta, env, rid, False)
    rows = []
    for e in engines:
        fl, by, rule = _work(model, masks, x, e, cfg.bn)
        rows.append(ScoringRecord(**base, engine=e, flops_rule=rule, useful_flops=fl["useful"],
                                  executed_flops=fl["executed"], bytes_moved=by and by["total"], status="skipped",
                                  note=why))
    return rows


def _make(cfg, model, masks, x, y, e, folded_chunk, row) -> Callable:
    """The callable that scores the population once with method ``e`` (raises bl.Unavailable)."""
    p = masks.population
    if e == "torch.func":
        row.chunk_size = folded_chunk
        return make_vmap_scorer(model, masks, x, y, cfg.bn, cfg.metric, folded_chunk)
    if e in COMPILED:
        if p > cfg.compile_max_population:
            raise bl.Unavailable(f"P={p} > compile_max_population={cfg.compile_max_population}")
        if cfg.compile_backend != "inductor":
            row.note = f"torch.compile backend {cfg.compile_backend}"
        if e == "folded-compile":
            row.chunk_size = folded_chunk
            return make_compiled_folded(model, masks, x, y, cfg.bn, cfg.metric, folded_chunk, cfg.compile_backend)
        with ops.use_kernels(False):  # the compiled compact engine runs the PyTorch ops
            row.chunk_size = cfg.chunk_size or auto_chunk(model, x, "compact", masks)
        row.compile_mode = "max-autotune" if e == "compact-max-autotune" else "default"
        return bl.make_compact_compile(model, masks, x, y, cfg.bn, cfg.metric, row.chunk_size,
                                       mode="max-autotune" if e == "compact-max-autotune" else None,
                                       backend=cfg.compile_backend)
    if e == "pruned-loop":
        row.chunk_size = 1
        return bl.make_pruned_loop(model, masks, x, y, cfg.bn, cfg.metric)
    if e == "vmap-pruned":  # as many members per vmap as fit (on a CPU within 2 GiB, not the cache-sized chunk)
        row.chunk_size = cfg.chunk_size or auto_chunk(model, x, "folded", masks,
                                                      budget_bytes=VMAP_CPU_BUDGET if x.device.type == "cpu" else None)
        return bl.make_vmap_pruned(model, masks, x, y, cfg.bn, cfg.metric, row.chunk_size)
    if e == "torch-pruning":
        row.chunk_size = 1
        return bl.make_torch_pruning(model, masks, x, y, cfg.bn, cfg.metric)
    if e == "pruned-graph":
        row.chunk_size = 1
        return bl.make_pruned_graph(model, masks, x, y, cfg.bn, cfg.metric)
    with ops.use_kernels(e.endswith("-triton")):
        row.chunk_size = cfg.chunk_size or auto_chunk(model, x, e.replace("-triton", ""), masks)
    return make_engine(model, masks, x, y, e, cfg.bn, cfg.metric, cfg.chunk_size)


def fastest_baseline(timings: dict[str, Timing], cpu: bool = False) -> str | None:
    """The baseline (of ``baselines.BASELINE_SET``) with the lowest median wall time (``cpu``: process CPU
    time), of those timed."""
    ran = [e for e in bl.BASELINE_SET if e in timings and (not cpu or timings[e].cpu_median_s)]
    return min(ran, key=lambda e: timings[e].cpu_median_s if cpu else timings[e].median_s) if ran else None


def _one_config(cfg, model, name, masks, x, y, eta, engines, skipped, device, env, rid, quiet, cl, deadline=None):
    p, b = masks.population, x.shape[0]
    base = _base(cfg, model, name, masks, x, eta, env, rid, cl)
    base["auto_engine"] = choose_engine("node", masks, device)
    peak = device_peak(device, x.dtype)
    rows: dict[str, ScoringRecord] = {}
    fns: dict[str, Callable] = {}
    fitness: dict[str, torch.Tensor] = {}
    folded_chunk = cfg.chunk_size or auto_chunk(model, x, "folded", masks)
    for e in engines:
        fl, by, rule = _work(model, masks, x, e, cfg.bn)
        row = ScoringRecord(**base, engine=e, flops_rule=rule, useful_flops=fl["useful"], executed_flops=fl["executed"],
                            bytes_moved=by and by["total"], peak_flops_per_s=peak.flops_per_s,
                            peak_bytes_per_s=peak.bytes_per_s)
        rows[e] = row
        if deadline is not None and e != "loop" and time.monotonic() > deadline:
            row.status, row.note = "skipped", "time budget spent before this method"
            continue
        exact = e not in COMPILED  # compiled code: sampled RSS (a dispatch mode would disturb it)
        try:
            fn = _make(cfg, model, masks, x, y, e, folded_chunk, row)
            # The first call warms up (compilation, autotuning, allocator) and is timed on its own;
            # then `warmup` more calls, then (memory_call) one call measured for peak memory (never timed).
            with PeakMemory(device, exact=exact) as pm0:
                t0 = time.perf_counter()
                fitness[e] = fn()
                sync(device)
                row.first_call_s = time.perf_counter() - t0
            for _ in range(cfg.warmup):
                fn()
            if cfg.memory_call:
                with PeakMemory(device, exact=exact) as pm:
                    fn()
                row.peak_mem_bytes, row.mem_kind = pm.bytes, pm.kind
            else:
                row.peak_mem_bytes, row.mem_kind = pm0.bytes, pm0.kind + " (first call)"
            fns[e] = fn
            progress(f"  [{name} P={p} eta={eta}] {e}: first call {fmt_s(row.first_call_s)}", quiet)
        except bl.Unavailable as why:  # cannot run here or on these masks: the reason is the row's note
            row.status, row.note = "skipped", str(why)[:500]
            progress(f"  [{name} P={p} eta={eta}] {e}: skipped: {row.note}", quiet)
        except Exception as exc:  # a method that cannot run here (OOM, compiler error) is recorded, not fatal
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:500]
            progress(f"  [{name} P={p} eta={eta}] {e}: ERROR {row.note}", quiet)
            fitness.pop(e, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    timings = interleaved(fns, device, cfg.repeats) if fns else {}
    load1 = load_average()
    ref = fitness.get("loop")
    for e, row in rows.items():
        row.load_avg_after = load1
        t: Timing | None = timings.get(e)
        if t is None:
            continue
        row.timing = vars(t)
        med = t.median_s
        row.members_images_per_s = p * b / med
        row.useful_flops_per_s = row.useful_flops / med
        row.executed_flops_per_s = row.executed_flops / med
        rl = roofline(row.useful_flops, row.bytes_moved, med, peak)
        row.useful_fraction_of_peak = rl["flops_fraction_of_peak"]
        row.bytes_per_s, row.bandwidth_fraction = rl["bytes_per_s"], rl["bandwidth_fraction"]
        if device.type == "cpu" and t.cpu_median_s and math.isfinite(peak.flops_per_cpu_s):
            row.useful_fraction_of_cpu_peak = row.useful_flops / t.cpu_median_s / peak.flops_per_cpu_s
        if row.first_call_s is not None and e in COMPILED:
            row.compile_s = max(0.0, row.first_call_s - med)
        fn = fns[e]
        if isinstance(fn, bl.Scorer) and fn.prunes and fn.prune_times:
            row.prune_s = statistics.median(fn.prune_times[-cfg.repeats:])  # the timed calls'
        if ref is not None and e in fitness:
            f = fitness[e].float()
            row.fitness_rel_err = float((f - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
    cpu = device.type == "cpu"
    wall_base, cpu_base = fastest_baseline(timings), fastest_baseline(timings, cpu=True) if cpu else None
    for e, row in rows.items():
        if e not in timings:
            continue
        own = timings[e]
        if "loop" in timings:
            row.speedup_vs_loop = timings["loop"].median_s / own.median_s
            if cpu and timings["loop"].cpu_median_s and own.cpu_median_s:
                row.cpu_speedup_vs_loop = timings["loop"].cpu_median_s / own.cpu_median_s
        if wall_base is not None:
            row.baseline, row.baseline_median_s = wall_base, timings[wall_base].median_s
            row.speedup_vs_baseline = timings[wall_base].median_s / own.median_s
        if cpu_base is not None and own.cpu_median_s:
            row.cpu_baseline = cpu_base
            row.cpu_speedup_vs_baseline = timings[cpu_base].cpu_median_s / own.cpu_median_s
    out = list(rows.values())
    for e, why in skipped.items():
        fl, by, rule = _work(model, masks, x, e, cfg.bn)
        out.append(ScoringRecord(**{**base, "load_avg_after": load1}, engine=e, flops_rule=rule,
                                 useful_flops=fl["useful"], executed_flops=fl["executed"],
                                 bytes_moved=by and by["total"], status="skipped", note=why))
    return out


# ------------------------------------------------------------------------------------ printing
def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[ScoringRecord | dict]) -> str:
    """A plain-text table of one configuration's rows (time, ratios, throughput, error)."""
    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    if not rows:
        return ""
    r0 = rows[0]
    head = (f"{r0['model']}  P={r0['population']}  B={r0['batch']}  {r0['in_channels']}x{r0['image_size']}x"
            f"{r0['image_size']}  eta={r0['eta']}  bn={r0['bn']}  {r0['dtype']} ({r0.get('precision')})  load "
            f"{r0['load_avg_before']}"
            f" -> {r0['load_avg_after']}")
    base = next((r.get("baseline") for r in rows if r.get("baseline")), None)
    cbase = next((r.get("cpu_baseline") for r in rows if r.get("cpu_baseline")), None)
    head += (f"\n  x base = the fastest baseline's median / this median (fastest baseline: {base or 'none ran'}); "
             f"cpu x = the same in process CPU time" + (f" (fastest by CPU time: {cbase})" if cbase else ""))
    lines = [head, f"  {'engine':<21}{'median':>10}{'IQR':>6}{'cpu':>10}{'x base':>8}{'cpu x':>7}{'x loop':>8}"
                   f"{'memb*img/s':>11}{'useful':>14}{'%peak':>7}{'%bw':>6}{'mem':>10}{'prune':>9}{'err':>9}  note"]
    for r in rows:
        t = r.get("timing") or {}
        med = t.get("median_s")
        iqr = (t["q75_s"] - t["q25_s"]) / med if med else None
        frac = r.get("useful_fraction_of_peak")
        lines.append(
            f"  {r['engine']:<21}{fmt_s(med):>10}{_f(iqr, '.0%'):>6}{fmt_s(t.get('cpu_median_s')):>10}"
            f"{_f(r.get('speedup_vs_baseline'), '.2f'):>8}{_f(r.get('cpu_speedup_vs_baseline'), '.2f'):>7}"
            f"{_f(r.get('speedup_vs_loop'), '.2f'):>8}"
            f"{fmt_num(r.get('members_images_per_s')):>11}{fmt_num(r.get('useful_flops_per_s'), 'FLOP/s'):>14}"
            f"{_f(None if frac is None else 100 * frac, '.1f'):>7}"
            f"{_f(None if r.get('bandwidth_fraction') is None else 100 * r['bandwidth_fraction'], '.0f'):>6}"
            f"{fmt_num(r.get('peak_mem_bytes'), 'B'):>10}{fmt_s(r.get('prune_s')):>9}"
            f"{_f(r.get('fitness_rel_err'), '.1e'):>9}"
            f"  {'' if r['status'] == 'ok' else r['status']} {(r.get('note') or '')[:70]}")
    return "\n".join(lines)
