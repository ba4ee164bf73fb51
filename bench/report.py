"""Benchmark results (JSONL rows) -> a Markdown report and PNG plots.

    python -m bench report                      # bench/results/*.jsonl -> bench/results/README.md + PNGs
    python -m bench report --all-runs f.jsonl   # every run, not only the latest of each kind

By default only the latest run of each (benchmark, preset, device) is shown; ``<out>/NOTES.md``
(hand-written findings), when present, is included after the header. Plots: speedup over the
fastest baseline (``loop`` for runs without baselines) against sparsity, one line per engine (one
figure per model / population / device); images/s of a training step against sparsity per
variant; stacked wall time per phase of each pipeline run.
"""

from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from pathlib import Path

from fastweedout.atomic import atomic_output, atomic_write_text

from .common import DEFAULT_OUT, fmt_num, fmt_s, read_jsonl, slug


def _save(fig, path) -> None:
    """Plots are written like every result: to a temporary file, then renamed."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format=os.path.splitext(str(path))[1].lstrip(".") or "png")

PHASE_ORDER = ("search", "training", "evaluation")


def latest_runs(rows: list[dict]) -> list[dict]:
    """Rows of the latest run (by run_id, which starts with a UTC timestamp) per (bench, preset, device)."""
    last: dict[tuple, str] = {}
    for r in rows:
        key = (r["bench"], r.get("preset"), r.get("env", {}).get("device"))
        if r.get("run_id", "") > last.get(key, ""):
            last[key] = r.get("run_id", "")
    return [r for r in rows
            if r.get("run_id", "") == last[(r["bench"], r.get("preset"), r.get("env", {}).get("device"))]]


def _pct(v, digits=1):
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _x(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}x"


def _med(r):
    return (r.get("timing") or {}).get("median_s")


def _iqr(r):
    t = r.get("timing") or {}
    m = t.get("median_s")
    return None if not m else (t["q75_s"] - t["q25_s"]) / m


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _env_line(rows: list[dict]) -> str:
    env = rows[0].get("env", {})
    loads = [r.get("load_avg_before") for r in rows if r.get("load_avg_before")] + \
            [r.get("load_avg_after") for r in rows if r.get("load_avg_after")]
    l1 = [v[0] for v in loads if v]
    load = f"load average (1 min) {min(l1):.2f}-{max(l1):.2f}" if l1 else "load average unknown"
    rev = (env.get("git_rev") or "?")[:10] + ("+dirty" if env.get("git_dirty") else "")
    return (f"{env.get('device')} ({env.get('device_type')}, {env.get('threads')} threads), peak "
            f"{fmt_num(env.get('peak_flops_per_s'), 'FLOP/s')} {env.get('peak_dtype')} [{env.get('peak_source')}]; "
            f"torch {env.get('torch')}, triton {env.get('triton')}; git {rev}; {env.get('date')}; {load}")


def _groups(rows: list[dict], keys: tuple[str, ...]) -> OrderedDict[tuple, list[dict]]:
    g: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in rows:
        g.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return g


# ------------------------------------------------------------------------------------ scoring
SCORING_KEYS = ("run_id", "preset", "model", "population", "batch", "image_size", "in_channels", "bn", "dtype")


def scoring_markdown(rows: list[dict]) -> list[str]:
    out = ["## Population scoring", "",
           "Time per call scoring the whole population on one batch (median of interleaved repeats, IQR relative "
           "to the median); `x base` = the median of the fastest baseline of that configuration (the fastest "
           "of pruned-loop, vmap-pruned, torch-pruning, pruned-graph, compact-compile, compact-max-autotune "
           "that ran; named in the table's header) / this median; `prune` = the seconds of a call the "
           "baselines spend pruning or gathering weights (included in their time); "
           "`x loop` = loop's median / this median (wall), `cpu x` the same with process CPU "
           "time (less sensitive to other processes' load), of which `sys` in the kernel, and the minor page faults "
           "per call; member-images/s = P x B / median; useful FLOP/s = "
           "FLOPs of the live sub-networks / median, and its fraction of the device peak (`% peak per CPU s`: on a "
           "CPU, useful FLOPs per second of process CPU time / the matmul's FLOPs per CPU second); memory = peak "
           "held at once by the call (CUDA: max allocated; CPU: live tensor storages tracked op by op, or sampled "
           "RSS for compiled code); err = max |fitness - loop's| / max |loop's|; `% bw` = bytes moved "
           "(`fastweedout.cost.bytes.scoring_bytes`) per second / the memory bandwidth; the peak is that of the "
           "precision that ran (tf32 for fp32 on a GPU).",
           ""]
    for _key, grp in _groups(rows, SCORING_KEYS).items():
        r0 = grp[0]
        out += [f"### {r0['model']}, P={r0['population']}, B={r0['batch']}, "
                f"{r0['in_channels']}x{r0['image_size']}x{r0['image_size']}, bn={r0['bn']}, {r0['dtype']} "
                f"(preset `{r0['preset']}`)", "", _env_line(grp), ""]
        etas = sorted({r["eta"] for r in grp})
        engines = list(OrderedDict.fromkeys(r["engine"] for r in grp))
        by = {(r["engine"], r["eta"]): r for r in grp}
        base = {eta: next((r.get("baseline") for r in grp if r["eta"] == eta and r.get("baseline")), None)
                for eta in etas}
        # pivot: speedup over the fastest baseline of each eta (older runs, without baselines: over loop)
        vs = "baseline" if any(base.values()) else "loop"
        head = ["engine"] + [f"eta={e:g}" + (f" (vs {base[e]})" if vs == "baseline" and base[e] else "")
                             for e in etas]
        piv = []
        for e in engines:
            cells = []
            for eta in etas:
                r = by.get((e, eta))
                if r is None or r.get("status") != "ok":
                    cells.append(r.get("status", "-") if r else "-")
                else:
                    c = _x(r.get(f"speedup_vs_{vs}"))
                    if r.get(f"cpu_speedup_vs_{vs}"):
                        c += f" (cpu {_x(r[f'cpu_speedup_vs_{vs}'])})"
                    cells.append(c)
            piv.append([e] + cells)
        title = ("Speedup over the fastest baseline of each eta (wall, against the baseline named in the header; "
                 "in brackets process CPU time, against the baseline with the least CPU time; the masked `loop` "
                 "is one more row):" if vs == "baseline" else "Speedup over `loop` (wall; CPU time in brackets):")
        out += [title, ""] + _table(head, piv) + [""]
        head = ["eta", "engine", "median", "IQR", "cpu time", "sys time", "page faults", "x base", "x loop",
                "member-img/s", "useful FLOP/s", "% peak", "% peak per CPU s", "% bw", "precision", "executed FLOPs",
                "memory", "chunk", "prune", "err", "note"]
        body = []
        for eta in etas:
            for e in engines:
                r = by.get((e, eta))
                if r is None:
                    continue
                t = r.get("timing") or {}
                body.append([f"{eta:g}", e, fmt_s(_med(r)), _pct(_iqr(r), 0), fmt_s(t.get("cpu_median_s")),
                             fmt_s(t.get("sys_median_s")), fmt_num(t.get("minor_faults_median")),
                             _x(r.get("speedup_vs_baseline")), _x(r.get("speedup_vs_loop")),
                             fmt_num(r.get("members_images_per_s")),
                             fmt_num(r.get("useful_flops_per_s"), "FLOP/s"), _pct(r.get("useful_fraction_of_peak"), 2),
                             _pct(r.get("useful_fraction_of_cpu_peak"), 1),
                             _pct(r.get("bandwidth_fraction"), 0), r.get("precision") or r.get("dtype"),
                             fmt_num(r.get("executed_flops"), "FLOP"), fmt_num(r.get("peak_mem_bytes"), "B"),
                             r.get("chunk_size") or "-", fmt_s(r.get("prune_s")),
                             "-" if r.get("fitness_rel_err") is None else f"{r['fitness_rel_err']:.1e}",
                             (r.get("status") if r.get("status") != "ok" else "") +
                             (" " + r["note"][:60] if r.get("note") else "") +
                             (f" compile {fmt_s(r['compile_s'])}" if r.get("compile_s") is not None else "")])
        out += _table(head, body) + [""]
    return out


def scoring_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for _key, grp in _groups(rows, SCORING_KEYS).items():
        r0 = grp[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        key = "speedup_vs_baseline" if any(r.get("speedup_vs_baseline") for r in grp) else "speedup_vs_loop"
        for e in OrderedDict.fromkeys(r["engine"] for r in grp):
            pts = sorted((r["eta"], r[key]) for r in grp if r["engine"] == e and r.get(key))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=e)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if str(v)[0] in "25" else ""))
        ax.set_xlabel("sparsity eta (fraction of nodes off per layer)")
        ax.set_ylabel("speedup over the fastest baseline (wall time)" if key == "speedup_vs_baseline"
                      else "speedup over loop (wall time)")
        dev = r0.get("env", {}).get("device", "")
        ax.set_title(f"{r0['model']} P={r0['population']} B={r0['batch']} {r0['dtype']}\n{dev}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        p = out_dir / (f"scoring-speedup-{slug(r0['model'])}-p{r0['population']}-b{r0['batch']}-{slug(r0['dtype'])}-"
                       f"{slug(r0.get('preset') or '')}-{slug(r0.get('env', {}).get('device_type', ''))}.png")
        if p in paths:  # the same configuration on another machine of the same kind: its device in the name
            p = p.with_name(f"{p.stem}-{slug(dev)}.png")
        _save(fig, p)
        plt.close(fig)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------ training
TRAINING_KEYS = ("run_id", "preset", "model", "batch", "image_size", "in_channels")


def training_markdown(rows: list[dict]) -> list[str]:
    out = ["## Training step", "",
           "One SGD step (forward, fp32 cross-entropy, backward, Nesterov SGD) on a device-resident batch; "
           "`x dense` = the dense network's step time (same dtype and compile mode) / this one; MFU = useful "
           "FLOPs (live sub-network, forward + backward) per second / peak; `exec % peak` counts what ran "
           "(masked = the dense step). Compile time (first step minus a timed step, Inductor's on-disk caches "
           "off) is reported separately; a configuration compiled earlier in the same run reuses its graph.", ""]
    for _key, grp in _groups(rows, TRAINING_KEYS).items():
        r0 = grp[0]
        out += [f"### {r0['model']}, batch {r0['batch']}, {r0['in_channels']}x{r0['image_size']}x{r0['image_size']} "
                f"(preset `{r0['preset']}`)", "", _env_line(grp), ""]
        head = ["eta", "variant", "compiled", "layout", "dtype", "step", "IQR", "images/s", "x dense", "MFU",
                "exec % peak", "compile", "params", "memory", "note"]
        body = [[f"{r['eta']:g}", r["variant"], "yes" if r["compiled"] else "no", _layout(r), r["dtype"],
                 fmt_s(_med(r)),
                 _pct(_iqr(r), 0), fmt_num(r.get("images_per_s")), _x(r.get("speedup_vs_dense")),
                 _pct(r.get("mfu"), 2), _pct(r.get("executed_fraction_of_peak"), 2), fmt_s(r.get("compile_s")),
                 fmt_num(r.get("params")), fmt_num(r.get("peak_mem_bytes"), "B"),
                 "" if r.get("status") == "ok" else f"{r.get('status')} {r.get('note', '')[:60]}"]
                for r in sorted(grp, key=lambda r: (r["dtype"], r["eta"], r["variant"], r["compiled"], _layout(r)))]
        out += _table(head, body) + [""]
    return out


def _layout(r: dict) -> str:
    return "channels_last" if r.get("channels_last") else "nchw"


def training_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for _key, grp in _groups(rows, TRAINING_KEYS).items():
        r0 = grp[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        layouts = {_layout(r) for r in grp}
        dense = {(r["dtype"], r["compiled"], _layout(r)): r for r in grp
                 if r["variant"] == "dense" and r.get("images_per_s")}
        kinds = sorted({(r["dtype"], r["compiled"], _layout(r), r["variant"]) for r in grp if r["variant"] != "dense"})
        for (dt, comp, lay, var) in kinds:
            pts = sorted((r["eta"], r["images_per_s"]) for r in grp if (r["dtype"], r["compiled"], _layout(r),
                         r["variant"]) == (dt, comp, lay, var) and r.get("images_per_s"))
            if (dt, comp, lay) in dense:
                pts = [(0.0, dense[(dt, comp, lay)]["images_per_s"])] + pts
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{var} {dt}{' compiled' if comp else ''}{f' {lay}' if len(layouts) > 1 else ''}")
        ax.set_xlabel("sparsity eta")
        ax.set_ylabel("training images / s")
        ax.set_yscale("log")
        ax.set_title(f"{r0['model']} batch {r0['batch']}\n{r0.get('env', {}).get('device', '')}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        p = out_dir / (f"training-{slug(r0['model'])}-b{r0['batch']}-{slug(r0.get('preset') or '')}-"
                       f"{slug(r0.get('env', {}).get('device_type', ''))}.png")
        _save(fig, p)
        plt.close(fig)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------ pipeline
def pipeline_markdown(rows: list[dict]) -> list[str]:
    out = ["## Pipeline (one Weedout run)", "",
           "Wall time and FLOPs per phase as the library measures them (`SearchResult.wall_time_s`, "
           "`TrainResult.phases`); search FLOPs: useful (live sub-networks) and executed (what the engine "
           "ran); shares are of the run's total wall time and executed FLOPs.", ""]
    for _rid, grp in _groups(rows, ("run_id",)).items():
        r0 = grp[0]
        out += [f"### {r0['model']} on {r0['dataset']} ({r0['train_size']} train / {r0['test_size']} test images), "
                f"eta={r0['eta']:g}, P={r0['population']} x {r0['generations']} generations on {r0['search_batch']} "
                f"images ({r0['engine']}), {r0['epochs']} epoch(s) batch {r0['batch_size']}"
                f"{', compiled' if r0.get('compiled') else ''}{', bf16' if r0.get('amp') else ''} "
                f"(preset `{r0['preset']}`)", "", _env_line(grp), "",
                f"Test accuracy {r0['test_acc']:.3f}. {r0.get('note') or ''}", ""]
        head = ["phase", "wall", "share of wall", "FLOPs (useful)", "FLOPs (executed)", "share of FLOPs",
                "FLOP/s", "% peak"]
        order = {p: i for i, p in enumerate(PHASE_ORDER + ("total",))}
        body = [[r["phase"], fmt_s(r["wall_s"]), _pct(r.get("share_wall")), fmt_num(r["flops"], "FLOP"),
                 fmt_num(r["executed_flops"], "FLOP"), _pct(r.get("share_flops")),
                 fmt_num(r.get("flops_per_s"), "FLOP/s"), _pct(r.get("fraction_of_peak"), 2)]
                for r in sorted(grp, key=lambda r: order.get(r["phase"], 9))]
        out += _table(head, body) + [""]
    return out


def pipeline_plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _groups(rows, ("run_id",))
    if not runs:
        return []
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs) + 2), 4))
    labels, bottoms = [], [0.0] * len(runs)
    for _i, (_rid, grp) in enumerate(runs.items()):
        r0 = grp[0]
        labels.append(f"{r0['model']}\neta={r0['eta']:g} P={r0['population']}\n{r0.get('env', {}).get('device_type')}")
    colors = {"search": "tab:orange", "training": "tab:blue", "evaluation": "tab:green"}
    for ph in PHASE_ORDER:
        vals = []
        for grp in runs.values():
            v = [r["wall_s"] for r in grp if r["phase"] == ph]
            vals.append(v[0] if v else 0.0)
        ax.bar(range(len(runs)), vals, bottom=bottoms, label=ph, color=colors[ph])
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("wall time (s)")
    ax.set_title("Weedout run: wall time per phase", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "pipeline-phases.png"
    _save(fig, p)
    plt.close(fig)
    return [p]


# ------------------------------------------------------------------------------------ kernels, gpu
def kernels_markdown(rows: list[dict]) -> list[str]:
    out = ["## Kernels", "",
           "Median of interleaved CUDA-event timings; conv: useful FLOP/s of the live channels and its fraction "
           "of the peak of the precision that ran, speedup over cuDNN's grouped convolution on the same compacted "
           "work; epilogues: bytes moved per second against a device copy (`vs copy`).", ""]
    for _key, grp in _groups(rows, ("run_id", "op")).items():
        r0 = grp[0]
        out += [f"### {r0['op']} (P={r0['members']}, B={r0['batch']}, {r0['precision']}, preset `{r0['preset']}`)",
                "", _env_line(grp), ""]
        head = ["stage", "layout", "eta", "K", "method", "median", "useful FLOP/s", "% peak", "bytes/s", "% bw",
                "vs copy", "x cuDNN grouped", "note"]
        body = [[r["stage"], r["layout"], "-" if r.get("eta") is None else f"{r['eta']:g}", r["K"], r["method"],
                 fmt_s(_med(r)), fmt_num(r.get("useful_flops_per_s"), "FLOP/s"), _pct(r.get("flops_fraction_of_peak")),
                 fmt_num(r.get("bytes_per_s"), "B/s"), _pct(r.get("bandwidth_fraction"), 0),
                 "-" if not r.get("vs_copy") else f"{r['vs_copy']:.2f}", _x(r.get("speedup_vs_cudnn_grouped")),
                 "" if r.get("status") == "ok" else f"{r.get('status')} {r.get('note', '')[:60]}"] for r in grp]
        out += _table(head, body) + [""]
    return out


def gpu_markdown(rows: list[dict]) -> list[str]:
    out = ["## `python -m bench gpu` steps", ""]
    for _key, grp in _groups(rows, ("run_id",)).items():
        out += [_env_line(grp), ""]
        out += _table(["step", "status", "wall", "budget", "note"],
                      [[r["step"], r["status"], fmt_s(r.get("wall_s")), fmt_s(r.get("budget_s")),
                        (r.get("note") or "")[:80]] for r in grp]) + [""]
    return out


# ------------------------------------------------------------------------------------ entry
def build_report(paths: list[str | os.PathLike], out_dir: str | os.PathLike, md_path: str | os.PathLike | None = None,
                 all_runs: bool = False, plots: bool = True) -> tuple[Path, list[Path]]:
    """Render the results in ``paths`` (JSONL files) to Markdown (and PNGs in ``out_dir``)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise SystemExit("bench report: no results files (run `python -m bench scoring --quick` first)")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"bench report: no such results file(s): {missing}")
    rows = read_jsonl(paths)
    if not all_runs:
        rows = latest_runs(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by = defaultdict(list)
    for r in rows:
        by[r["bench"]].append(r)
    conv = next((r.get("flops_convention") for r in rows if r.get("flops_convention")), "")
    md = ["# fastweedout benchmark results", "",
          f"Generated by `python -m bench report` from {', '.join(p.name for p in paths)}"
          f"{' (all runs)' if all_runs else ' (latest run of each benchmark, preset and device)'}.", "",
          f"FLOP convention: {conv}. Peaks: GPUs at their datasheet dense figure (989 TFLOP/s bf16 for "
          "H100/H200); CPUs at a measured large fp32 matmul (recorded per run).", ""]
    notes = out_dir / "NOTES.md"  # hand-written findings, kept across regenerations
    if notes.exists():
        md += [notes.read_text().rstrip(), ""]
    figs: list[Path] = []
    if by.get("scoring"):
        md += scoring_markdown(by["scoring"])
        if plots:
            figs += scoring_plots(by["scoring"], out_dir)
    if by.get("training"):
        md += training_markdown(by["training"])
        if plots:
            figs += training_plots(by["training"], out_dir)
    if by.get("pipeline"):
        md += pipeline_markdown(by["pipeline"])
        if plots:
            figs += pipeline_plot(by["pipeline"], out_dir)
    if by.get("kernels"):
        md += kernels_markdown(by["kernels"])
    if by.get("gpu"):
        md += gpu_markdown(by["gpu"])
    if figs:
        md += ["## Plots", ""] + [f"![{f.stem}]({os.path.relpath(f, Path(md_path or out_dir / 'README.md').parent)})"
                                  for f in figs] + [""]
    md_path = Path(md_path) if md_path else out_dir / "README.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md_path, "\n".join(md))
    return md_path, figs


def default_paths(out_dir: str | os.PathLike = DEFAULT_OUT) -> list[Path]:
    return sorted(Path(out_dir).glob("*.jsonl"))


__all__ = ["build_report", "default_paths", "latest_runs", "scoring_markdown", "training_markdown",
           "pipeline_markdown"]
