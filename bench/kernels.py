"""Kernel benchmarks at WRN-28-10 shapes (P members, B images each): the compacted convolution against
cuDNN and each fused epilogue against copy bandwidth, on the same harness as every benchmark
(``common.py``: interleaved CUDA-event timing, one JSONL schema, the environment record).

* ``conv`` rows, per stage and eta (each stage's 3x3 stride-1 conv on the live channels K = (1-eta) C,
  rounded up to 16 as the engine pads them): ``triton`` (the grouped implicit-GEMM kernel),
  ``triton_fused`` (with the BN-ReLU-mask prologue, the residual and the statistics epilogue: the
  compact engine's conv2), on a GPU also ``triton_fused@BMxBNxBKxWARPSxSTAGES[xPER_SM]`` at
  every launch config of ``_conv.GPU_CONFIGS`` (the persistent grouped-GEMM schedule among them: the
  rows from which the per-stage tile table is chosen), ``cudnn_grouped`` (``F.conv2d(groups=P)`` on
  the same compacted work) and ``dense_folded`` (the folded engine's conv: all members at full
  width). Useful FLOPs are those of the live channels; the roofline ratios use the peak of the
  precision that ran.
* ``epilogue`` rows, per stage, on the folded layout ``[P*B, C, H, W]`` and the compact layout
  ``[B, P*K, H, W]`` (channels_last): ``copy`` (``y.copy_(x)``, the bandwidth reference), the Triton
  ``bn_running`` (one pass), ``bn_batch`` (statistics + apply), ``affine`` (the fused engine's final
  apply) and ``stats`` (the statistics pass alone), with ``vs_copy`` = achieved bytes/s / copy's.

Targets (H100, bf16): the Triton conv >= 2x cuDNN grouped at eta = 0.8; >= 30% of the 989 TFLOP/s
peak for stages 2-3; every epilogue >= 0.8 of copy bandwidth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastweedout.ops import dispatch as ops

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
    roofline,
    run_id,
)

WRN28_10 = [(160, 32), (320, 16), (640, 8)]  # (width, spatial) of the three stages


@dataclass
class KernelConfig:
    members: int = 100
    batch: int = 32  # images per member (the compact conv's B)
    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    etas: list[float] = field(default_factory=lambda: [0.4, 0.8])
    widths: list[tuple[int, int]] = field(default_factory=lambda: list(WRN28_10))
    dtype: str = "bfloat16"
    repeats: int = 10
    inner: int = 5  # calls per timed sample (microsecond kernels)
    pad: int = 16
    preset: str = "custom"


@dataclass
class KernelRecord(Record):
    op: str = ""  # conv | epilogue
    method: str = ""
    stage: int = 0
    layout: str = ""  # conv: compact; epilogue: folded | compact
    eta: float | None = None
    width: int = 0
    K: int = 0
    hw: int = 0
    members: int = 0
    batch: int = 0
    dtype: str = ""
    shape: list = field(default_factory=list)
    timing: dict | None = None
    useful_flops: float | None = None
    useful_flops_per_s: float | None = None
    flops_fraction_of_peak: float | None = None
    peak_flops_per_s: float | None = None
    bytes_moved: float | None = None  # what the method must move (activations and weights, once)
    bytes_per_s: float | None = None
    bandwidth_fraction: float | None = None
    peak_bytes_per_s: float | None = None
    vs_copy: float | None = None  # bytes/s / copy's bytes/s (epilogues)
    speedup_vs_cudnn_grouped: float | None = None  # conv


def _live(c: int, eta: float, pad: int) -> int:
    return min(c, -(-max(1, round((1 - eta) * c)) // pad) * pad) if pad > 1 else max(1, round((1 - eta) * c))


def _measure(fns: dict, device, cfg) -> dict:
    """First call (compile, autotune) untimed, then interleaved repeats; errors recorded per method."""
    ok, errors = {}, {}
    for k, fn in fns.items():
        try:
            fn()
            ok[k] = fn
        except Exception as e:  # one failing method must not lose the others
            errors[k] = f"{type(e).__name__}: {e}"[:500]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return interleaved(ok, device, cfg.repeats, inner=cfg.inner) if ok else {}, errors


def _rows(base, fns, timings, errors, work, peak) -> list[KernelRecord]:
    rows = []
    for k in fns:
        flops, nbytes = work[k]
        r = KernelRecord(**base, method=k, useful_flops=flops, bytes_moved=nbytes, peak_flops_per_s=peak.flops_per_s,
                         peak_bytes_per_s=peak.bytes_per_s)
        if k in errors:
            r.status, r.note = "error", errors[k]
        t = timings.get(k)
        if t is not None:
            r.timing = vars(t)
            rl = roofline(flops, nbytes, t.median_s, peak)
            r.flops_fraction_of_peak, r.bytes_per_s, r.bandwidth_fraction = (
                rl["flops_fraction_of_peak"], rl["bytes_per_s"], rl["bandwidth_fraction"])
            r.useful_flops_per_s = flops / t.median_s if flops else None
        rows.append(r)
    return rows


def _conv_case(cfg, device, stage: int, eta: float, dense, base0, peak) -> list[KernelRecord]:
    """One stage's 3x3 conv at one eta: every method on the same compacted work, interleaved."""
    from fastweedout.ops import reference as ref
    dt = getattr(torch, cfg.dtype)
    P, B = cfg.members, cfg.batch
    c, hw = cfg.widths[stage - 1]
    es = torch.tensor([], dtype=dt).element_size()
    k = _live(c, eta, cfg.pad)
    x = torch.randn(B, P * k, hw, hw, device=device, dtype=dt).to(memory_format=torch.channels_last)
    full = (torch.randn(c, c, 3, 3, device=device) / (9 * k) ** 0.5).to(dt)
    idx = torch.stack([torch.randperm(c, device=device)[:k] for _ in range(P)])
    w = ref.gather_conv_weight(full, idx, idx)  # the engine's packed layout
    w_flat = w.reshape(P * k, k, 3, 3).contiguous(memory_format=torch.channels_last)
    res = torch.randn_like(x)
    sc, sh = torch.rand(P * k, device=device) + 0.5, torch.randn(P * k, device=device)
    dense_x, dense_w = dense
    flops = 2.0 * B * hw * hw * P * k * k * 9
    act, wbytes = B * P * k * hw * hw * es, P * k * k * 9 * es
    fns = {"cudnn_grouped": lambda: F.conv2d(x, w_flat, padding=1, groups=P),
           "dense_folded": lambda: F.conv2d(dense_x, dense_w, padding=1)}
    work = {"cudnn_grouped": (flops, 2 * act + wbytes),
            "dense_folded": (flops, 2 * P * B * c * hw * hw * es + c * c * 9 * es)}
    with ops.use_kernels(True):
        if ops.kernels_active(x):
            fns["triton"] = lambda: ops.fused_conv(x, w, 1, 1)
            fns["triton_fused"] = lambda: ops.fused_conv(x, w, 1, 1, sc, sh, res, True)
            work["triton"] = (flops, 2 * act + wbytes)
            work["triton_fused"] = (flops, 3 * act + wbytes)
            if x.is_cuda:  # the tile table: the fused conv at every launch config (persistent ones included)
                from fastweedout.ops.triton import _conv
                def at(launch):
                    return lambda: _conv.launch_conv(x, w, 1, 1, epi=_conv.EPI_STATS, in_scale=sc, in_shift=sh,
                                                     residual=res, config=launch)

                for launch in dict.fromkeys(_conv.fit_config(g, k, k) for g in _conv.GPU_CONFIGS):
                    name = "triton_fused@" + "x".join(map(str, launch))
                    fns[name], work[name] = at(launch), work["triton_fused"]
        base = dict(base0, op="conv", stage=stage, layout="compact", eta=eta, width=c, K=k, hw=hw,
                    shape=list(x.shape), load_avg_before=load_average())
        timings, errors = _measure(fns, device, cfg)
    base["load_avg_after"] = load_average()
    rows = _rows(base, fns, timings, errors, work, peak)
    cud = timings.get("cudnn_grouped")
    for r in rows:
        if cud is not None and r.method in timings:
            r.speedup_vs_cudnn_grouped = cud.median_s / timings[r.method].median_s
    return rows


def bench_convs(cfg: KernelConfig, device, base0, peak, out_path, quiet) -> list[KernelRecord]:
    dt = getattr(torch, cfg.dtype)
    rows = []
    for stage in cfg.stages:
        c, hw = cfg.widths[stage - 1]
        dense = (torch.randn(cfg.members * cfg.batch, c, hw, hw, device=device, dtype=dt).to(
                 memory_format=torch.channels_last),
                 (torch.randn(c, c, 3, 3, device=device) / (9 * c) ** 0.5).to(dt).to(memory_format=torch.channels_last))
        for eta in cfg.etas:
            got = _conv_case(cfg, device, stage, eta, dense, base0, peak)
            append_jsonl(out_path, got)
            rows += got
            progress(format_rows(got), quiet)
        del dense
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _epilogue_case(cfg, device, stage: int, layout: str, base0, peak) -> list[KernelRecord]:
    """One stage's activation in one layout: copy, then every fused epilogue, interleaved."""
    from fastweedout.ops.triton import bn_act, bn_stats
    dt = getattr(torch, cfg.dtype)
    P, B = cfg.members, cfg.batch
    c, hw = cfg.widths[stage - 1]
    k = _live(c, max(cfg.etas), cfg.pad)
    shape, members, C = ((P * B, c, hw, hw), P, c) if layout == "folded" else ((B, P * k, hw, hw), 1, P * k)
    x = torch.randn(shape, device=device, dtype=dt).to(memory_format=torch.channels_last)
    y = torch.empty_like(x)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    m = (torch.rand(members, C, device=device) > 0.3).float()
    rm, rv = torch.randn(C, device=device) * 0.1, torch.rand(C, device=device) + 0.5
    n = x.numel() * x.element_size()
    fns = {"copy": lambda: y.copy_(x)}
    work = {"copy": (None, 2 * n)}
    with ops.use_kernels(True):
        if ops.kernels_active(x):
            fns.update(bn_running=lambda: bn_act.population_bn_act(x, members, w, b, m, rm, rv),
                       bn_batch=lambda: bn_act.population_bn_act(x, members, w, b, m),
                       stats=lambda: bn_stats.batch_stats(x, members))
            work.update(bn_running=(None, 2 * n), bn_batch=(None, 3 * n), stats=(None, n))
            if layout == "compact":  # the fused engine's final apply (scale/shift precomputed)
                fns["affine"] = lambda: bn_act.apply_bn_act(x, y, 1, w, b, None, None, None, 0.0, affine=True)
                work["affine"] = (None, 2 * n)
    base = dict(base0, op="epilogue", stage=stage, layout=layout, eta=max(cfg.etas) if layout == "compact" else 0.0,
                width=c, K=k, hw=hw, shape=list(shape), load_avg_before=load_average())
    timings, errors = _measure(fns, device, cfg)
    base["load_avg_after"] = load_average()
    rows = _rows(base, fns, timings, errors, work, peak)
    copy = next((r for r in rows if r.method == "copy" and r.bytes_per_s), None)
    for r in rows:
        if copy is not None and r.bytes_per_s:
            r.vs_copy = r.bytes_per_s / copy.bytes_per_s
    return rows


def bench_epilogues(cfg: KernelConfig, device, base0, peak, out_path, quiet) -> list[KernelRecord]:
    rows = []
    for stage in cfg.stages:
        for layout in ("folded", "compact"):
            got = _epilogue_case(cfg, device, stage, layout, base0, peak)
            append_jsonl(out_path, got)
            rows += got
            progress(format_rows(got), quiet)
    return rows


def run_kernels(cfg: KernelConfig, device: torch.device, out_path, *, quiet: bool = False,
                deadline: float | None = None) -> list[KernelRecord]:
    dt = getattr(torch, cfg.dtype)
    peak = device_peak(device, dt)
    env = Env.capture(device, peak)
    rid = run_id()
    progress(f"[kernels] {env.device} {cfg.dtype} ({peak.dtype}: {fmt_num(peak.flops_per_s, 'FLOP/s')}, "
             f"{fmt_num(peak.bytes_per_s, 'B/s')}) P={cfg.members} B={cfg.batch} stages={cfg.stages}", quiet)
    base0 = dict(bench="kernels", preset=cfg.preset, run_id=rid, env=vars(env), load_avg_before=None,
                 load_avg_after=None, precision=precision(dt, device), members=cfg.members, batch=cfg.batch,
                 dtype=cfg.dtype)
    # cuDNN's grouped convolution is the baseline: let it time its algorithms for each fixed shape (its
    # first, untimed call), as it would in any fixed-shape workload; off, its heuristic can pick badly.
    bench_flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        rows = bench_convs(cfg, device, base0, peak, out_path, quiet)
    finally:
        torch.backends.cudnn.benchmark = bench_flag
    if deadline is None or time.monotonic() < deadline:
        rows += bench_epilogues(cfg, device, base0, peak, out_path, quiet)
    return rows


def format_rows(rows) -> str:
    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"[{r0['op']}] stage {r0['stage']} {r0['layout']} eta={r0['eta']} width={r0['width']} K={r0['K']} "
             f"{r0['hw']}x{r0['hw']} {r0['precision']}"]
    for r in rows:
        t = (r.get("timing") or {}).get("median_s")
        frac, bw = r.get("flops_fraction_of_peak"), r.get("bandwidth_fraction")
        extra = [f"{fmt_num(r.get('useful_flops_per_s'), 'FLOP/s')} ({100 * frac:.1f}% peak)" if frac else "",
                 f"{fmt_num(r.get('bytes_per_s'), 'B/s')} ({100 * bw:.0f}% bw)" if bw else "",
                 f"x{r['vs_copy']:.2f} of copy" if r.get("vs_copy") else "",
                 f"{r['speedup_vs_cudnn_grouped']:.2f}x cuDNN grouped" if r.get("speedup_vs_cudnn_grouped") else "",
                 r.get("note", "")[:80] if r.get("status") != "ok" else ""]
        lines.append(f"  {r['method']:<15}{fmt_s(t):>10}  " + "  ".join(e for e in extra if e))
    return "\n".join(lines)


def summarize(rows) -> dict:
    """The targets, from the rows: conv speedup over cuDNN grouped at the largest eta, fraction of
    peak for stages 2-3, and the worst epilogue against copy."""
    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    out = {}
    conv = [r for r in rows if r["op"] == "conv" and r["method"] == "triton" and r.get("timing")]
    if conv:
        top = max(r["eta"] for r in conv)
        out["conv_speedup_vs_cudnn_grouped"] = {r["stage"]: r.get("speedup_vs_cudnn_grouped") for r in conv
                                                if r["eta"] == top}
        out["conv_fraction_of_peak_stages_2_3"] = {r["stage"]: r.get("flops_fraction_of_peak") for r in conv
                                                   if r["eta"] == top and r["stage"] in (2, 3)}
    tiles = [r for r in rows if r["op"] == "conv" and r["method"].startswith("triton_fused@") and r.get("timing")]
    if tiles:  # the tile table: per (stage, eta) the fastest launch config, x the default config's time
        default = {(r["stage"], r["eta"]): r["timing"]["median_s"] for r in rows
                   if r["op"] == "conv" and r["method"] == "triton_fused" and r.get("timing")}
        best = {}
        for r in tiles:
            key = (r["stage"], r["eta"])
            if key not in best or r["timing"]["median_s"] < best[key]["timing"]["median_s"]:
                best[key] = r
        out["conv_tile_table"] = {f"stage{st} eta={eta:g}": dict(
            config=r["method"].split("@", 1)[1], median_s=r["timing"]["median_s"],
            speedup_vs_default=(default[(st, eta)] / r["timing"]["median_s"]) if (st, eta) in default else None)
            for (st, eta), r in sorted(best.items())}
    ep = [r for r in rows if r["op"] == "epilogue" and r["method"] != "copy" and r.get("vs_copy")]
    if ep:
        out["epilogue_min_vs_copy"] = {m: min(r["vs_copy"] for r in ep if r["method"] == m)
                                       for m in sorted({r["method"] for r in ep})}
    return out
