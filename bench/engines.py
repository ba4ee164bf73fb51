"""The CPU engine table: loop vs folded vs compact (and the Triton variants on a GPU) for WRN-16-4,
P=16 members, 64 images 3x32x32, eta in {0, 0.4, 0.8}, side by side in one run.

    python -m bench engines [--threads N] [--repeats N] [--out DIR] [--profile]

Targets on the 2-core CPU: ``compact`` >= 3x faster than ``loop`` at eta=0.8, ``folded`` no slower than
``loop`` at eta=0. Rows go to ``<out>/scoring.jsonl`` (preset ``cpu-engines``); the table printed at
the end gives wall-time ratios and, because other processes share the CPU, process-CPU-time ratios too.
"""

from __future__ import annotations

from .common import fmt_s

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


def print_summary(rows) -> str:
    rows = summary_rows(rows)
    by = {(r["engine"], r["eta"]): r for r in rows}
    engines = [e for e in ("loop", "folded", "compact", "folded-triton", "compact-triton")
               if any(k[0] == e for k in by)]
    etas = sorted({r["eta"] for r in rows})
    r0 = rows[0] if rows else {}
    lines = [f"engine table: {r0.get('model')} P={r0.get('population')} B={r0.get('batch')} "
             f"{r0.get('in_channels')}x{r0.get('image_size')}x{r0.get('image_size')}, "
             f"{r0.get('env', {}).get('threads')} threads, {r0.get('env', {}).get('device')}",
             "  eta  " + "".join(f"{e:>16}" for e in engines) + "".join(f"{'loop/' + e:>16}" for e in engines[1:])
             + "".join(f"{'cpu loop/' + e:>20}" for e in engines[1:]) + "   load(1m)"]
    for eta in etas:
        loop = by.get(("loop", eta))
        cells = [f"{fmt_s(by[(e, eta)]['timing']['median_s']) if (e, eta) in by else '-':>16}" for e in engines]
        ratios, cpu = [], []
        for e in engines[1:]:
            r = by.get((e, eta))
            ratios.append(f"{_ratio(r, 'speedup_vs_loop'):>16}")
            cpu.append(f"{_ratio(r, 'cpu_speedup_vs_loop'):>20}")
        load = (loop or {}).get("load_avg_before")
        lines.append(f"  {eta:<4} " + "".join(cells) + "".join(ratios) + "".join(cpu) + f"   {load}")
    for eng, eta, need, text in TARGETS:
        r = by.get((eng, eta))
        if r is None or not r.get("speedup_vs_loop"):
            lines.append(f"  target: {text}: not measured")
            continue
        w, c = r["speedup_vs_loop"], r.get("cpu_speedup_vs_loop")
        # "No slower" is judged within the measurement's resolution: the larger relative IQR of the
        # two methods' repeats (at least 1%).
        loop = by[("loop", eta)]
        noise = max(0.01, _iqr(r), _iqr(loop)) if need == 1.0 else 0.0
        verdict = "MET" if w >= need else f"MET within noise (+-{noise:.1%})" if w >= need - noise else "NOT MET"
        lines.append(f"  target: {text}: {verdict} (wall {w:.3f}x" + (f", CPU time {c:.3f}x" if c else "") + ")")
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
