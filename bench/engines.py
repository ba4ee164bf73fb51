"""The CPU engine table: every engine and every baseline a user would write, for WRN-16-4, P=16
members, 64 images 3x32x32, eta in {0, 0.4, 0.8}, side by side in one run.

    python -m bench engines [--threads N] [--repeats N] [--out DIR] [--profile]

Every engine is stated as x the fastest baseline of its configuration (the fastest of
``baselines.BASELINE_SET`` that ran: pruned-loop, vmap-pruned, torch-pruning, compact-compile, and on
a GPU pruned-graph and compact-max-autotune), with the masked ``loop`` as one more row; ``auto`` is
the engine ``choose_engine`` picks for those masks. The CPU's FLOP peak is measured with one large
fp32 matmul at the start of the run (the figure the rows divide by) and again at the end, and each
engine's useful FLOP/s is given as a fraction of it.

Targets on the 2-core CPU: ``compact`` >= 3x faster than ``loop`` at eta=0.8, ``folded`` no slower than
``loop`` at eta=0, and ``auto`` no slower than the fastest baseline at any eta. Rows go to
``<out>/scoring.jsonl`` (preset ``cpu-engines``); the table printed at the end gives wall-time
ratios and, because other processes share the CPU, process-CPU-time ratios too.
"""

from __future__ import annotations

import statistics

from .baselines import BASELINE_SET
from .common import fmt_num, fmt_s

COMPILED = ("compact-compile", "compact-max-autotune")

TARGETS = (("compact", 0.8, 3.0, "compact >= 3x faster than loop at eta=0.8"),
           ("folded", 0.0, 1.0, "folded no slower than loop at eta=0"))


def _iqr(r: dict) -> float:
    t = r["timing"]
    return (t["q75_s"] - t["q25_s"]) / t["median_s"]


def _ratio(r: dict | None, key: str) -> str:
    return f"{r[key]:.2f}x" if r and r.get(key) else "-"


def summary_rows(rows) -> list[dict]:
    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    return [r for r in rows if r.get("status") == "ok" and r.get("timing")]


def _cpu_iqr(r: dict) -> float:
    t = sorted(r["timing"].get("cpu_times_s") or [])
    if len(t) < 2:
        return 0.0
    q = statistics.quantiles(t, n=4, method="inclusive")
    return (q[2] - q[0]) / statistics.median(t)


def _noise(*rows: dict, cpu: bool = False) -> float:
    """The resolution of a "no slower" verdict: the largest relative IQR of the rows compared (>= 1%), of
    wall time or (``cpu``) of process CPU time."""
    return max([0.01] + [(_cpu_iqr if cpu else _iqr)(r) for r in rows if r and r.get("timing")])


def _verdict(w: float, need: float, noise: float) -> str:
    return "MET" if w >= need else f"MET within noise (+-{noise:.1%})" if w >= need - noise else "NOT MET"


def print_summary(rows, end_peak=None) -> str:
    """The engine table: x the fastest baseline per eta (wall, CPU time), x loop, useful FLOP/s as a
    fraction of the measured peak; auto against the fastest baseline; the targets. ``end_peak``: the
    peak measured again at the end of the run (``env.Peak``)."""
    everything = [r if isinstance(r, dict) else vars(r) for r in rows]
    rows = summary_rows(everything)
    by = {(r["engine"], r["eta"]): r for r in rows}
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    etas = sorted({r["eta"] for r in rows})
    r0 = rows[0] if rows else {}
    env = r0.get("env", {})
    lines = [f"engine table: {r0.get('model')} P={r0.get('population')} B={r0.get('batch')} "
             f"{r0.get('in_channels')}x{r0.get('image_size')}x{r0.get('image_size')}, "
             f"{env.get('threads')} threads, {env.get('device')}, git {str(env.get('git_rev'))[:10]}"
             f"{'+dirty' if env.get('git_dirty') else ''}, {env.get('date')}",
             f"  peak: {fmt_num(env.get('peak_flops_per_s'), 'FLOP/s')}"
             + (f" ({fmt_num(env['peak_flops_per_cpu_s'], 'FLOP/s')} per CPU second)"
                if env.get("peak_flops_per_cpu_s") else "")
             + f" [{env.get('peak_source')}] (the rows' % peak)"
             + (f"; at the end of the run {fmt_num(end_peak.flops_per_s, 'FLOP/s')} "
                f"({fmt_num(end_peak.flops_per_cpu_s, 'FLOP/s')} per CPU second) [{end_peak.source}]"
                if end_peak is not None else "")]
    base = {eta: next((r.get("baseline") for r in rows if r["eta"] == eta and r.get("baseline")), None)
            for eta in etas}
    lines.append("  fastest baseline: " + ", ".join(
        f"eta={eta:g} {base[eta]} ({fmt_s(by[(base[eta], eta)]['timing']['median_s'])})" if base[eta]
        else f"eta={eta:g} none ran" for eta in etas))
    cpu_base = {eta: next((r.get("cpu_baseline") for r in rows if r["eta"] == eta and r.get("cpu_baseline")), None)
                for eta in etas}
    if any(cpu_base.values()):
        lines.append("  fastest baseline by process CPU time: " + ", ".join(
            f"eta={eta:g} {cpu_base[eta]} ({fmt_s(by[(cpu_base[eta], eta)]['timing']['cpu_median_s'])})"
            if cpu_base[eta] else f"eta={eta:g} -" for eta in etas))
    w = max([len(e) for e in engines] + [6]) + 2

    def pivot(title: str, cell) -> None:
        cells = {(e, eta): cell(by[(e, eta)]) if (e, eta) in by else "-" for e in engines for eta in etas}
        cw = max([len(c) for c in cells.values()] + [20]) + 3
        lines.append(f"  {title}")
        lines.append("  " + f"{'engine':<{w}}" + "".join(f"{f'eta={eta:g}':>{cw}}" for eta in etas))
        for e in engines:
            lines.append("  " + f"{e:<{w}}" + "".join(f"{cells[(e, eta)]:>{cw}}" for eta in etas))

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    pivot("x the fastest baseline: wall (process CPU time); x loop (wall)",
          lambda r: f"{_ratio(r, 'speedup_vs_baseline')} ({_ratio(r, 'cpu_speedup_vs_baseline')}) "
                    f"{_ratio(r, 'speedup_vs_loop')}")
    pivot("useful FLOP/s: per wall second (its % of the matmul peak); % of the peak per CPU second",
          lambda r: f"{fmt_num(r.get('useful_flops_per_s'), 'FLOP/s')} ({pct(r.get('useful_fraction_of_peak'))}) "
                    f"{pct(r.get('useful_fraction_of_cpu_peak'))}")
    loads = [by[("loop", eta)].get("load_avg_before") if ("loop", eta) in by else None for eta in etas]
    lines.append("  load average before each eta: " + ", ".join(f"eta={eta:g} {v}" for eta, v in zip(etas, loads)))
    not_run: dict[tuple, list] = {}
    for r in everything:
        if r.get("status") != "ok":
            not_run.setdefault((r["engine"], r.get("status"), r.get("note")), []).append(f"{r['eta']:g}")
    for (e, status, note), at in not_run.items():
        lines.append(f"  {e} (eta {', '.join(at)}): {status}: {note}")
    # auto: the engine choose_engine picks at each eta, against the fastest baseline
    autos = []
    for eta in etas:
        pick = next((r.get("auto_engine") for r in rows if r["eta"] == eta and r.get("auto_engine")), None)
        r = by.get((pick, eta))
        if r is None or not r.get("speedup_vs_baseline"):
            autos.append(f"eta={eta:g}: {pick or '?'} not measured")
            continue
        v = _verdict(r["speedup_vs_baseline"], 1.0, _noise(r, by.get((base[eta], eta))))
        c = r.get("cpu_speedup_vs_baseline")
        cv = "" if not c else (f"; CPU time {c:.2f}x {cpu_base[eta]} "
                               f"{_verdict(c, 1.0, _noise(r, by.get((cpu_base[eta], eta)), cpu=True))}")
        autos.append(f"eta={eta:g}: {pick} wall {r['speedup_vs_baseline']:.2f}x {base[eta]} {v}{cv}")
    lines.append("  target: auto no slower than the fastest baseline: " + "; ".join(autos))
    # the same against the fastest baseline that runs eagerly (no torch.compile): what a user gets without compiling
    eager = []
    for eta in etas:
        pick = next((r.get("auto_engine") for r in rows if r["eta"] == eta and r.get("auto_engine")), None)
        cands = [by[(e, eta)] for e in BASELINE_SET if e not in COMPILED and (e, eta) in by]
        if (pick, eta) not in by or not cands:
            continue
        b = min(cands, key=lambda r: r["timing"]["median_s"])
        v = b["timing"]["median_s"] / by[(pick, eta)]["timing"]["median_s"]
        eager.append(f"eta={eta:g}: {pick} {v:.2f}x {b['engine']} {_verdict(v, 1.0, _noise(by[(pick, eta)], b))}")
    if eager:
        lines.append("  auto against the fastest eager baseline (no compile): " + "; ".join(eager))
    for eng, eta, need, text in TARGETS:
        r = by.get((eng, eta))
        if r is None or not r.get("speedup_vs_loop"):
            lines.append(f"  target: {text}: not measured")
            continue
        wv, c = r["speedup_vs_loop"], r.get("cpu_speedup_vs_loop")
        # "No slower" is judged within the measurement's resolution: the larger relative IQR of the
        # two methods' repeats (at least 1%).
        noise = _noise(r, by[("loop", eta)]) if need == 1.0 else 0.0
        lines.append(f"  target: {text}: {_verdict(wv, need, noise)} (wall {wv:.3f}x"
                     + (f", CPU time {c:.3f}x" if c else "") + ")")
    out = "\n".join(lines)
    print(out, flush=True)
    return out


def profile_eta0(out_dir, model_name: str = "wrn_16_4", population: int = 16, batch: int = 64,
                 image_size: int = 32, row_limit: int = 12) -> str:
    """torch.profiler tables (self CPU time per op) and page faults of one call each of loop, folded
    with the automatic chunk, and folded with the whole population in one chunk, at eta=0; written to
    ``<out_dir>/profile-eta0-<model>-<date>.txt``. This is how the folded-vs-loop gap was diagnosed."""
    import datetime as dt
    import resource
    import time
    from pathlib import Path

    import torch
    from torch.profiler import ProfilerActivity, profile

    import fastweedout as fw
    from fastweedout.engines.scoring import auto_chunk, score_population

    from .common import load_average

    m = fw.create_model(model_name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    masks = fw.sample_masks(m, population, 0.0, generator=torch.Generator().manual_seed(1))
    auto = auto_chunk(m, x, "folded", masks)
    cases = [("loop", None), ("folded", auto), ("folded", population)]
    text = [f"profile at eta=0: {model_name} P={population} B={batch} {image_size}x{image_size}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {load_average()}, "
            f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}", ""]
    for eng, chunk in cases:
        score_population(m, masks, x, y, engine=eng, chunk_size=chunk)  # warm-up
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0, c0 = time.perf_counter(), time.process_time()
            score_population(m, masks, x, y, engine=eng, chunk_size=chunk)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        text += [f"== {eng} chunk={chunk or '-'}: wall {wall:.2f} s, process CPU {cpu:.2f} s, of which system "
                 f"{r1.ru_stime - r0.ru_stime:.2f} s, minor page faults {r1.ru_minflt - r0.ru_minflt}",
                 prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit), ""]
    path = Path(out_dir) / f"profile-eta0-{model_name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    print("\n".join(text[:1] + [t for t in text if t.startswith("==")]) + f"\nprofile written to {path}", flush=True)
    return str(path)
