"""``python -m bench gpu``: everything the GPU path claims, measured in one command on one GPU.

    PYTHONPATH=. python -m bench gpu [--out DIR] [--budget-s 540] [--skip tests,kernels,scoring,training]
    python -m bench gpu --dry-run            # the same steps on tiny shapes on CPU (CI runs this)

Steps, each under its share of the time budget (default 450 s: a configuration that starts before its
step's deadline finishes, so the whole stays within 9 minutes on one H100/H200; a step that runs out of
time records what it did and the rest as skipped), each writing its JSONL rows as soon as they are
measured (a timeout loses nothing done). From the kernels step on, the Triton conv picks its block
sizes per shape in that step alone (``FASTWEEDOUT_AUTOTUNE=1``, unless ``--no-autotune``; tuning every
shape of WRN-28-10 inside the scoring step took 119 s on an H200):

1. ``tests``: the CUDA kernel and engine tests (tests/test_kernels*.py, tests/test_engines.py; one
   pytest process per file, in parallel) -> ``gpu.jsonl`` (pass/fail counts);
2. ``kernels``: Triton conv vs cuDNN grouped vs dense folded, each epilogue vs copy bandwidth
   (``kernels.py``) -> ``kernels.jsonl``;
3. ``scoring``: WRN-28-10, P=100, bf16, eta 0.8 / 0.4 / 0 (the headline first): loop, folded,
   compact, their Triton variants, vmap and compiled-folded, and the baselines a user would write
   (``baselines.py``: pruned-loop, vmap-pruned, torch-pruning, pruned-graph, compact-compile and, last,
   compact-max-autotune), every row also as x the fastest baseline (``scoring.py``), at B=1000 images or
   the largest batch whose estimated time fits the step's share (measured by a short probe; a method
   not started before the step's deadline is a skipped row) -> ``scoring.jsonl``;
4. ``training``: dense and pruned (eta 0.8) WRN-28-10 training steps, torch.compile + bf16 autocast,
   channels_last (``training.py``) -> ``training.jsonl``.

Every row carries the device, torch / triton / CUDA versions, git revision, date, the precision that
ran and both roofline ratios. One summary table (targets and whether they were met) is printed at the
end and appended to ``gpu.jsonl``. No package is installed; a plain checkout with PYTHONPATH=. runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .common import Env, Record, append_jsonl, device_peak, fmt_num, fmt_s, load_average, progress, run_id, sync
from .env import ROOT
from .kernels import KernelConfig, run_kernels, summarize
from .scoring import ScoringConfig, run_scoring
from .training import TrainingConfig, run_training

STEPS = ("tests", "kernels", "scoring", "training")
TEST_FILES = ("tests/test_kernels.py", "tests/test_kernels_ops.py", "tests/test_kernels_fused.py",
              "tests/test_engines.py")
BATCHES = (1000, 512, 256, 128, 64, 32)


@dataclass
class GpuPlan:
    budget_s: float
    share: dict  # step -> fraction of the budget (later steps also get what earlier ones left)
    test_args: list[str]
    kernels: KernelConfig
    scoring: ScoringConfig
    training: TrainingConfig
    compile_estimate_s: float = 90.0  # the compiled-folded baseline's first call (WRN-28-10, Inductor)
    probe_batch: int = 64
    batches: tuple = BATCHES
    notes: list[str] = field(default_factory=list)


def plan(dry_run: bool, budget_s: float | None = None) -> GpuPlan:
    if dry_run:  # tiny shapes, fp32 (the interpreter has no bf16), aot_eager instead of Inductor
        return GpuPlan(
            budget_s=budget_s or 600, share=dict(tests=0.25, kernels=0.25, scoring=0.3, training=0.2),
            test_args=["tests/test_kernels_fused.py", "-k", "tuner or unavailable"],
            kernels=KernelConfig(members=2, batch=2, stages=[1, 2], etas=[0.5], widths=[(16, 8), (32, 4), (64, 2)],
                                 dtype="float32", repeats=1, inner=1, preset="gpu-dry-run"),
            scoring=ScoringConfig(models=["wrn_10_1"], populations=[2], etas=[0.5], batch=2, image_size=8,
                                  repeats=1, warmup=0, compile_backend="aot_eager", memory_call=False,
                                  interpreter_ok=True, preset="gpu-dry-run"),
            training=TrainingConfig(models=["wrn_10_1"], etas=[0.0, 0.5], batch=4, image_size=8, variants=["pruned"],
                                    compile_modes=[True], dtypes=["float32"], repeats=1, warmup=1,
                                    compile_backend="aot_eager", preset="gpu-dry-run"),
            compile_estimate_s=5.0, probe_batch=2, batches=(2,))
    return GpuPlan(
        # H200, 2026-12-04: the tests need ~105 s (test_kernels.py had 116 of 139 done at 85 s), the
        # kernels step 46 s
        budget_s=budget_s or 450, share=dict(tests=0.28, kernels=0.12, scoring=0.35, training=0.25),
        test_args=list(TEST_FILES),
        kernels=KernelConfig(preset="gpu"),
        scoring=ScoringConfig(models=["wrn_28_10"], populations=[100], etas=[0.8, 0.4, 0.0], batch=1000,
                              dtype="bfloat16", repeats=3, warmup=0, memory_call=False, preset="gpu"),
        training=TrainingConfig(models=["wrn_28_10"], etas=[0.0, 0.8], batch=128, variants=["pruned"],
                                compile_modes=[True], dtypes=["bfloat16"], repeats=10, warmup=3, preset="gpu"))


@dataclass
class GpuStepRecord(Record):
    step: str = ""
    wall_s: float = 0.0
    budget_s: float = 0.0
    summary: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the steps
@contextmanager
def autotuning(on: bool):
    """The Triton conv's per-shape block-size tuning inside the block only (the scoring step measures
    the heuristic sizes: tuning every WRN-28-10 shape there took 119 s on an H200)."""
    before = os.environ.get("FASTWEEDOUT_AUTOTUNE")
    if on:
        os.environ["FASTWEEDOUT_AUTOTUNE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FASTWEEDOUT_AUTOTUNE", None)
        else:
            os.environ["FASTWEEDOUT_AUTOTUNE"] = before


def run_tests(p: GpuPlan, deadline: float, dry_run: bool) -> dict:
    """Each test file in its own pytest process (in parallel: Triton compiles per process)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return dict(status="skipped", note="pytest is not installed here")
    files = [a for a in p.test_args if a.endswith(".py")]
    extra = [a for a in p.test_args if not a.endswith(".py")]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def one(f: str) -> dict:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f, *extra]
        if not dry_run:
            cmd += ["-m", "gpu or not slow"]
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=max(10.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            return dict(file=f, rc=None, timeout=True, tail=(e.stdout or b"")[-1500:].decode(errors="replace")
                        if isinstance(e.stdout, bytes) else (e.stdout or "")[-1500:])
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", r.stdout)}
        return dict(file=f, rc=r.returncode, counts=counts, tail=r.stdout[-1500:] if r.returncode else "")

    with ThreadPoolExecutor(max(1, min(len(files), (os.cpu_count() or 2) // 2))) as pool:
        results = list(pool.map(one, files))
    total = {}
    for r in results:
        for k, v in r.get("counts", {}).items():
            total[k] = total.get(k, 0) + v
    ok = all(r.get("rc") == 0 for r in results)
    return dict(status="ok" if ok else "error", counts=total, files=results)


def _probe_batch(p: GpuPlan, device, share_s: float, quiet: bool) -> tuple[int, str]:
    """The largest batch (of p.batches) whose estimated scoring time fits ``share_s``: one timed call of
    the folded engine (dense work) at a small batch, scaled linearly."""
    import fastweedout as fw
    from fastweedout.engines.scoring import score_population
    cfg = p.scoring
    if len(p.batches) == 1:
        return p.batches[0], ""
    model = fw.create_model(cfg.models[0]).to(device=device, dtype=getattr(torch, cfg.dtype)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(p.probe_batch, 3, cfg.image_size, cfg.image_size, device=device,
                    dtype=getattr(torch, cfg.dtype)).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (p.probe_batch,), device=device)
    masks = fw.sample_masks(model, cfg.populations[0], 0.0, generator=0)
    score_population(model, masks, x, y, engine="folded")  # warm-up
    sync(device)
    t0 = time.perf_counter()
    score_population(model, masks, x, y, engine="folded")
    sync(device)
    per_image = (time.perf_counter() - t0) / p.probe_batch
    # heavy calls (dense work): 13 methods at eta 0 (every baseline runs the dense network there), 5 at
    # each eta > 0; each called 1 + repeats times
    heavy = sum(13 if e == 0 else 5 for e in cfg.etas) * (1 + cfg.repeats + cfg.warmup)
    for b in p.batches:
        est = per_image * b * heavy + p.compile_estimate_s
        if est <= share_s:
            note = f"B={b}: estimated {est:.0f} s of {share_s:.0f} s (probe: {per_image * 1e3:.2f} ms/image, dense)"
            progress(f"[gpu] scoring batch {note}", quiet)
            return b, note
    return p.batches[-1], f"B={p.batches[-1]}: the smallest candidate (estimate above the {share_s:.0f} s share)"


def run_gpu(out: str | os.PathLike, device: torch.device, *, dry_run: bool = False, budget_s: float | None = None,
            skip: set[str] = frozenset(), quiet: bool = False, autotune: bool = True) -> list[dict]:
    p = plan(dry_run, budget_s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    end = t_start + p.budget_s
    peak = device_peak(device, getattr(torch, p.scoring.dtype))
    env = Env.capture(device, peak)
    rid = run_id()
    progress(f"[gpu] {env.device} torch {env.torch} triton {env.triton} cuda {env.cuda} git {str(env.git_rev)[:10]}"
             f"{'+dirty' if env.git_dirty else ''} budget {p.budget_s:.0f} s{' (dry run)' if dry_run else ''}", quiet)
    steps = []
    for i, step in enumerate(STEPS):
        t0 = time.monotonic()
        later = sum(p.share[s] for s in STEPS[i + 1:] if s not in skip)
        deadline = min(end, t0 + max(0.0, end - t0) * (1 - later / max(1e-9, later + p.share[step])))
        summary: dict = {}
        status, note = "ok", ""
        try:
            if step in skip:
                status, note = "skipped", "--skip"
            elif time.monotonic() >= end:
                status, note = "skipped", "time budget spent"
            elif step == "tests":
                summary = run_tests(p, deadline, dry_run)
                status = summary.pop("status")
                note = summary.pop("note", "")
            elif step == "kernels":
                with autotuning(autotune and device.type == "cuda"):
                    rows = run_kernels(p.kernels, device, out / "kernels.jsonl", quiet=quiet, deadline=deadline)
                summary = summarize(rows)
            elif step == "scoring":
                batch, note = _probe_batch(p, device, deadline - time.monotonic(), quiet)
                rows = run_scoring(replace(p.scoring, batch=batch), device, out / "scoring.jsonl", quiet=quiet,
                                   deadline=deadline)
                summary = scoring_summary(rows)
            elif step == "training":
                rows = run_training(p.training, device, out / "training.jsonl", quiet=quiet, deadline=deadline)
                summary = {f"{r.variant} eta={r.eta}": dict(images_per_s=r.images_per_s, mfu=r.mfu,
                                                            compile_s=r.compile_s, status=r.status)
                           for r in rows}
        except Exception as e:  # a failing step is recorded; the next steps still run
            status, note = "error", f"{type(e).__name__}: {e}"[:1000]
        rec = GpuStepRecord(bench="gpu", preset="gpu-dry-run" if dry_run else "gpu", run_id=rid, env=vars(env),
                            load_avg_before=None, load_avg_after=load_average(), status=status, note=note,
                            precision=peak.dtype, step=step, wall_s=time.monotonic() - t0,
                            budget_s=max(0.0, deadline - t0), summary=summary)
        append_jsonl(out / "gpu.jsonl", [rec])
        steps.append(vars(rec))
        progress(f"[gpu] {step}: {status} in {fmt_s(rec.wall_s)} {note[:200]}", quiet)
    table = format_summary(steps, env, time.monotonic() - t_start, dry_run)
    print(table, flush=True)
    return steps


# ------------------------------------------------------------------------------------ summary
def scoring_summary(rows) -> dict:
    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    out = {}
    for r in rows:
        t = (r.get("timing") or {}).get("median_s")
        out[f"{r['engine']} eta={r['eta']:g}"] = dict(
            median_s=t, speedup_vs_loop=r.get("speedup_vs_loop"), speedup_vs_baseline=r.get("speedup_vs_baseline"),
            baseline=r.get("baseline"), compile_s=r.get("compile_s"), note=(r.get("note") or "")[:200],
            useful_fraction_of_peak=r.get("useful_fraction_of_peak"), bandwidth_fraction=r.get("bandwidth_fraction"),
            precision=r.get("precision"), batch=r.get("batch"), status=r.get("status"),
            fitness_rel_err=r.get("fitness_rel_err"))
    etas = sorted({r["eta"] for r in rows})
    if etas:
        top = etas[-1]
        ct, fo = out.get(f"compact-triton eta={top:g}", {}), out.get(f"folded eta={top:g}", {})
        if ct.get("median_s") and fo.get("median_s"):
            out["compact_triton_vs_folded_at_top_eta"] = fo["median_s"] / ct["median_s"]
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_summary(steps: list[dict], env: Env, wall: float, dry_run: bool = False) -> str:
    """One table: each step's status, then every target with its value and verdict."""
    by = {s["step"]: s for s in steps}
    lines = [f"== bench gpu{' --dry-run (tiny shapes: no target is measured)' if dry_run else ''}: {env.device}, "
             f"torch {env.torch}, triton {env.triton}, git {str(env.git_rev)[:10]}, {env.date}, {fmt_s(wall)} ==",
             f"{'step':<9}{'measure':<58}{'value':>14}{'target':>10}  verdict"]

    def _verdict(v, target) -> str:
        if v is None or dry_run:
            return "-"
        return "MET" if v >= target else f"missed by {100 * (1 - v / target):.0f}%"


    def add(step, what, value, target="", verdict=""):
        lines.append(f"{step:<9}{what:<58}{value:>14}{target:>10}  {verdict}")

    for s in steps:
        if s["status"] != "ok":
            add(s["step"], f"{s['status']}: {s['note'][:55]}", fmt_s(s["wall_s"]))
    t = by.get("tests", {}).get("summary", {})
    if t.get("counts"):
        c = t["counts"]
        add("tests", f"kernel + engine tests ({c.get('skipped', 0)} skipped)",
            f"{c.get('passed', 0)} ok {c.get('failed', 0) + c.get('errors', 0) + c.get('error', 0)} bad")
    k = by.get("kernels", {}).get("summary", {})
    for stage, v in (k.get("conv_speedup_vs_cudnn_grouped") or {}).items():
        add("kernels", f"stage {stage} conv, top eta: Triton / cuDNN grouped", "-" if v is None else f"{v:.2f}x",
            ">= 2x", _verdict(v, 2.0))
    for stage, v in (k.get("conv_fraction_of_peak_stages_2_3") or {}).items():
        add("kernels", f"stage {stage} conv, top eta: useful FLOP/s of peak", _pct(v), ">= 30%", _verdict(v, 0.3))
    for m, v in (k.get("epilogue_min_vs_copy") or {}).items():
        add("kernels", f"epilogue {m}: worst bytes/s vs copy", f"{v:.2f}", ">= 0.8", _verdict(v, 0.8))
    sc = by.get("scoring", {}).get("summary", {})
    for key, v in sc.items():
        if isinstance(v, dict) and v.get("median_s"):
            add("scoring", f"{key} (B={v.get('batch')}, {v.get('precision')})",
                f"{fmt_s(v['median_s'])}", "", f"{_pct(v.get('useful_fraction_of_peak'))} peak, "
                f"{_pct(v.get('bandwidth_fraction'))} bw, x{(v.get('speedup_vs_baseline') or 0):.2f} "
                f"{v.get('baseline') or 'baseline'}, x{(v.get('speedup_vs_loop') or 0):.2f} loop")
    if sc.get("compact_triton_vs_folded_at_top_eta"):
        v = sc["compact_triton_vs_folded_at_top_eta"]
        add("scoring", "compact-triton / folded at the top eta", f"{v:.2f}x", ">= 5x", _verdict(v, 5.0))
    for key, v in by.get("training", {}).get("summary", {}).items():
        add("training", key, fmt_num(v.get("images_per_s"), "img/s"), "", f"MFU {_pct(v.get('mfu'))}")
    return "\n".join(lines)
