"""The report's figures (matplotlib, Agg, written atomically): the paper's Figure 2, accuracy per epoch,
the search's fitness per generation, and accuracy against each search-study axis."""

from __future__ import annotations

import math
from collections import defaultdict

from fastweedout.analysis.stats import CONFIDENCE, mean_ci
from fastweedout.atomic import atomic_output

COLORS = {"dense": "#333333", "weedout": "#d62728", "random": "#1f77b4", "given": "#2ca02c", "throughout": "#ff7f0e",
          "l1": "#9467bd", "snip": "#8c564b", "grasp": "#e377c2", "synflow": "#17becf"}


def new_figure(ncols: int, nrows: int = 1, w: float = 5.0, h: float = 4.0, sharey: bool = False,
               heights: list[float] | None = None):
    """A figure of ``nrows`` × ``ncols`` panels of ``w`` × ``h`` inches (``heights``: each row's own)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, sum(heights) if heights else h * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend: no display needed, no global state
    return fig, fig.subplots(nrows, ncols, squeeze=False, sharey=sharey,
                             gridspec_kw=dict(height_ratios=heights) if heights else None)


def save_figure(fig, path: str, dpi: int = 110) -> bool:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return True


def label(series: str, all_series) -> str:
    """The arm, plus the parts of the series key that tell it from the arm's other series."""
    parts = series.split("/")
    kin = [o.split("/") for o in set(all_series) if o.split("/")[0] == parts[0] and o != series]
    own = [p for i, p in enumerate(parts[1:], 1) if any(len(o) <= i or o[i] != p for o in kin)]
    return f"{parts[0]} ({', '.join(own)})" if own else parts[0]


_MARKERS = ("o", "s", "^", "D", "v", "P")
_LINES = ("-", "--", ":", "-.")


def style(series: str, all_series) -> tuple[str | None, str]:
    """(colour, line style): the arm's colour; the arm's series told apart by marker and dash."""
    kin = sorted(o for o in set(all_series) if o.split("/")[0] == series.split("/")[0])
    i = kin.index(series) if series in kin else 0
    return COLORS.get(series.split("/")[0]), _MARKERS[i % len(_MARKERS)] + _LINES[i % len(_LINES)]


def band(ax, xs, stats, color, fmt, lbl):
    ms = [100 * m for m, _ in stats]
    ci = [100 * (c if math.isfinite(c) else 0.0) for _, c in stats]
    ax.plot(xs, ms, fmt, color=color, label=lbl)
    # an accuracy lies in [0, 100]: a t-interval of two seeds (t = 12.7) must not set the axis
    ax.fill_between(xs, [max(0.0, a - b) for a, b in zip(ms, ci)], [min(100.0, a + b) for a, b in zip(ms, ci)],
                    color=color, alpha=0.2, linewidth=0)


def accuracy_limits(ax) -> None:
    """The y range of the plotted means (not of the bands), within [0, 100]."""
    ys = [float(y) for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(float(y))]
    if ys:
        ax.set_ylim(max(0.0, min(ys) - 5), min(100.5, max(ys) + 3))


def is_core(series: str) -> bool:
    """The paper's comparison: Weedout (any fitness metric) and random, layerwise node masks chosen at
    initialisation, trained from their own initial weights."""
    parts = series.split("/")
    if parts[0] not in ("weedout", "random") or parts[1:3] != ["layerwise", "node"]:
        return False
    return not any(p.startswith(("k", "m")) and p[1:2].isdigit() or p in ("reinit", "shuffled") for p in parts[3:])


#: distinct colours for the series of one figure (tab10 without the dense grey)
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def limits_of_means(ax, pad: float = 0.15) -> None:
    """A y range that shows the differences between the plotted means (not set by the bands)."""
    ys = [float(y) for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(float(y))]
    if ys:
        lo, hi = min(ys), max(ys)
        d = max(hi - lo, 0.5) * pad + 0.25
        ax.set_ylim(max(0.0, lo - d), min(100.5, hi + d))


def _figure2(conds, exp: str, path: str, keep, title: str) -> bool:
    mine = [c for c in conds if c.experiment == exp]
    dense = [c for c in mine if c.arm == "dense" and c.series == "dense"]
    series: dict[str, list] = defaultdict(list)
    for c in mine:
        if c.arm != "dense" and keep(c.series):
            series[c.series].append(c)
    if not series and not dense:
        return False
    fig, axes = new_figure(2)
    for ax, metric, sub in ((axes[0][0], "train_acc", "(a) train accuracy"), (axes[0][1], "test_acc",
                                                                               "(b) test accuracy")):
        for d in dense:  # the dense parent: a marker at η=0 and its level as a reference line
            m, ci = d.stat(metric)
            ax.errorbar([0.0], [100 * m], yerr=[[100 * ci if math.isfinite(ci) else 0.0]] * 2, fmt="k*",
                        markersize=10, capsize=3, label="dense")
            ax.axhline(100 * m, color="#333333", linewidth=0.8, linestyle=":")
        for i, (s, cs) in enumerate(sorted(series.items())):
            cs = sorted(cs, key=lambda c: c.sparsity)  # only the sparsities measured: no line from η=0
            fmt = _MARKERS[i % len(_MARKERS)] + ("-" if len(cs) > 1 else "")
            band(ax, [c.sparsity for c in cs], [c.stat(metric) for c in cs], PALETTE[i % len(PALETTE)], fmt,
                 label(s, series))
        limits_of_means(ax)
        ax.set_xlabel("sparsity η (fraction of nodes off)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(sub)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower left")
    cfg = mine[0].runs[0].config
    fig.suptitle(f"{title}: {cfg['model']['name']} on {cfg['data']['name']}, {cfg['training']['epochs']} epochs; "
                 f"mean and {100 * CONFIDENCE:g}% CI over seeds")
    return save_figure(fig, path, 120)


def plot_figure2(conds, exp: str, path: str) -> bool:
    """The paper's Figure 2 for the core arms (:func:`is_core`): (a) train and (b) test accuracy vs
    sparsity, markers at the measured sparsities only, the dense parent as a reference."""
    return _figure2(conds, exp, path, is_core, "Weedout vs random")


def plot_figure2_extras(conds, exp: str, path: str) -> bool:
    """Figure 2's axes for every other series (pruning at initialisation, global masks, after K steps,
    structure alone, ...); False when there are none."""
    if not any(c.experiment == exp and c.arm != "dense" and not is_core(c.series) for c in conds):
        return False
    return _figure2(conds, exp, path, lambda s: not is_core(s), "Other methods and controls")


def _epoch_stats(runs_, key: str):
    per_epoch = defaultdict(list)
    for r in runs_:
        for e in r.epochs:
            if e.get(key) is not None:
                per_epoch[e["epoch"]].append(e[key])
    xs = sorted(per_epoch)
    return xs, [mean_ci(per_epoch[x]) for x in xs]


def plot_curves(conds, exp: str, path: str) -> bool:
    """Accuracy per epoch of the dense network and the core series (:func:`is_core`), one panel per
    sparsity, shared y-axis: test (solid, CI band) and train (dotted) per series."""
    from matplotlib.ticker import MaxNLocator

    mine = [c for c in conds if c.experiment == exp and (c.series == "dense" or is_core(c.series))]
    if not mine:
        return False
    etas = sorted({c.sparsity for c in mine})
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted({c.series for c in mine} - {"dense"}))}
    colours["dense"] = COLORS["dense"]
    all_series = {c.series for c in mine}
    fig, axes = new_figure(len(etas), w=4.0, h=4.0, sharey=True)
    for ax, eta in zip(axes[0], etas):
        for c in (c for c in mine if c.sparsity == eta):
            colour, lbl = colours[c.series], label(c.series, all_series)
            xs, st = _epoch_stats(c.runs, "test_acc")
            band(ax, xs, st, colour, "o-", lbl)
            xs, st = _epoch_stats(c.runs, "train_acc")
            ax.plot(xs, [100 * m for m, _ in st], ":", color=colour, alpha=0.8)
        ax.set_title(f"η = {eta:g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="lower right")  # inside its own panel
    accuracy_limits(axes[0][0])  # shared: the range of every panel's means
    axes[0][0].set_ylabel("accuracy (%)")
    fig.suptitle(f"test accuracy per epoch (solid, {100 * CONFIDENCE:g}% CI band over seeds) and training accuracy "
                 "on the augmented batches (dotted)", fontsize="medium")
    return save_figure(fig, path)


def plot_search(conds, exp: str, path: str) -> bool:
    """Best fitness per generation of the searches, one panel per fitness metric, one line per (series,
    sparsity); the mean fitness of generation 1 (random members) as the reference."""
    from matplotlib.ticker import MaxNLocator

    mine = [c for c in conds if c.experiment == exp and any(r.search and r.search.get("best_fitness")
                                                              for r in c.runs)]
    if not mine:
        return False
    by_metric: dict[str, list] = defaultdict(list)
    for c in mine:
        by_metric[(c.runs[0].config.get("search") or {}).get("metric", "?")].append(c)
    fig, axes = new_figure(len(by_metric), w=5.5)
    for ax, (metric, cs) in zip(axes[0], sorted(by_metric.items())):
        for i, c in enumerate(cs):
            colour = PALETTE[i % len(PALETTE)]
            best = [r.search["best_fitness"] for r in c.runs if r.search and r.search.get("best_fitness")]
            mean = [r.search["mean_fitness"] for r in c.runs if r.search and r.search.get("mean_fitness")]
            g = min(map(len, best))
            ax.plot(range(1, g + 1), [sum(b[k] for b in best) / len(best) for k in range(g)], "o-", color=colour,
                    label=f"η={c.sparsity:g} {label(c.series, {x.series for x in mine})}: best")
            if mean:
                ref = sum(m[0] for m in mean) / len(mean)
                ax.axhline(ref, color=colour, linestyle=":", linewidth=1.0, label=f"η={c.sparsity:g}: random member")
        ax.set_xlabel("generation")
        ax.set_ylabel({"loss": "fitness (−loss)", "accuracy": "fitness (accuracy)"}.get(metric, "fitness"))
        ax.set_title(f"fitness {metric}: best member per generation (mean over seeds)", fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="xx-small", loc="best", ncols=2)
    fig.supxlabel("each generation scores its members on a fresh batch of held-out images; dotted: the mean "
                  "fitness of generation 1 (random masks)", fontsize="small")
    return save_figure(fig, path)


def _axis_groups(conds):
    """{axis name: {(fixed context): [(x value, condition)]}} for population, generations and model."""
    out: dict[str, dict] = {"population": defaultdict(list), "generations": defaultdict(list),
                            "model": defaultdict(list)}
    for c in conds:
        cfg = c.runs[0].config
        if c.arm == "weedout":
            s = cfg["search"]
            for axis, other in (("population", "generations"), ("generations", "population")):
                ctx = (c.experiment, c.sparsity, s[other], s["metric"], s["strategy"], cfg.get("granularity"))
                out[axis][ctx].append((s[axis], c))
        data_train = (str(cfg["data"]), str(cfg["training"]))
        out["model"][(data_train, c.series.split("/")[0], c.sparsity)].append((cfg["model"]["name"], c))
    return {a: {k: sorted(v, key=lambda t: _order(t[0])) for k, v in g.items() if len({x for x, _ in v}) > 1}
            for a, g in out.items()}


def _order(x):
    if isinstance(x, str) and x.startswith("wrn_"):
        d, w = x[4:].split("_")
        return (int(w) * int(w) * int(d), x)
    return (x, "")


def plot_axes(conds, comps, path: str) -> bool:
    """Test accuracy after training (and the gap to random before training) against every axis that
    varies: population size, generation count, model depth/width."""
    groups = {a: g for a, g in _axis_groups(conds).items() if g}
    if not groups:
        return False
    gap = {(r["experiment"], r["series"], r["sparsity"]): r for r in comps if r["against"] == "random"}
    fig, axes = new_figure(2, len(groups))
    for row, (axis, g) in zip(axes, groups.items()):
        for ctx, pts in g.items():
            xs = [str(x) for x, _ in pts]
            name = f"η={ctx[1]:g}" if axis != "model" else f"{ctx[1]} η={ctx[2]:g}"
            band(row[0], xs, [c.stat("test_acc") for _, c in pts], None, "o-", name)
            d = [gap.get((c.experiment, c.series, c.sparsity)) for _, c in pts]
            if any(d):
                row[1].errorbar(xs, [r["diff_init_val_loss"] if r else math.nan for r in d],
                                yerr=[r["ci_init_val_loss"] if r and math.isfinite(r["ci_init_val_loss"]) else 0
                                      for r in d], fmt="o-", capsize=3, label=name)
        accuracy_limits(row[0])
        row[0].set_title(f"test accuracy after training vs {axis}")
        row[0].set_ylabel("accuracy (%)")
        row[1].set_title(f"validation loss before training, minus random, vs {axis}")
        row[1].set_ylabel("Δ loss (nats; < 0: the search found better masks)")
        for ax in row:
            ax.set_xlabel(axis)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="x-small")
    return save_figure(fig, path)


def _control(row: dict, metric: str) -> str:
    """The series a comparison row's ``metric`` was paired with (before training: the same parent's)."""
    return (row.get("init_control") or row["control"]) if metric.startswith("init_") else row["control"]


def plot_differences(comps, exp: str, path: str) -> bool:
    """Every series minus its random control, paired by seed, with unadjusted 95% intervals: (a)
    validation loss before training, (b) test accuracy after training; the core comparisons
    (:func:`is_core`) in the top row, the others below; each row names the series and its control."""
    rows = sorted((r for r in comps if r["against"] == "random" and r["experiment"] == exp),
                  key=lambda r: (r["sparsity"], r["series"]))
    if not rows:
        return False
    groups = [g for g in ([r for r in rows if is_core(r["series"])], [r for r in rows if not is_core(r["series"])])
              if g]
    names = sorted({r["series"] for r in rows} | {r["control"] for r in rows}
                   | {r["init_control"] for r in rows if r.get("init_control")})
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted({r["series"] for r in rows}))}
    fig, axes = new_figure(2, len(groups), w=6.0, heights=[max(1.8, 0.32 * len(g) + 1.2) for g in groups])
    panels = (("init_val_loss", 1.0, "validation loss before training",
               "Δ loss (nats; < 0: better than the control)"),
              ("test_acc", 100.0, "test accuracy after training",
               "Δ accuracy (points; > 0: better than the control)"))
    for row_axes, g, kind in zip(axes, groups, ("core comparisons", "other methods")):
        ys = list(range(len(g)))[::-1]
        for ax, (m, scale, title, xlabel) in zip(row_axes, panels):
            for y, r in zip(ys, g):
                d, ci = r[f"diff_{m}"], r[f"ci_{m}"]
                if math.isfinite(d):
                    ax.errorbar([scale * d], [y], xerr=[[scale * ci if math.isfinite(ci) else 0.0]] * 2, fmt="o",
                                color=colours[r["series"]], capsize=3)
            ax.axvline(0.0, color="#333333", linewidth=0.8)
            ax.set_yticks(ys, [f"η={r['sparsity']:g}  {label(r['series'], names)} − {label(_control(r, m), names)}"
                               f"  (n={r[f'n_{m}']})" for r in g], fontsize="small")
            ax.set_title(f"{kind}: {title}", fontsize="medium")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3, axis="x")
        if all(_control(r, "init_val_loss") == r["control"] for r in g):  # else each panel names its own
            row_axes[1].tick_params(labelleft=False)
    fig.suptitle(f"paired by seed: mean difference and {int(CONFIDENCE * 100)}% CI (unadjusted; the report's "
                 "p-values are also Holm-adjusted)")
    return save_figure(fig, path)


__all__ = ["COLORS", "PALETTE", "accuracy_limits", "band", "is_core", "label", "limits_of_means", "new_figure",
           "plot_axes", "plot_curves", "plot_differences", "plot_figure2", "plot_figure2_extras", "plot_search",
           "save_figure", "style"]
