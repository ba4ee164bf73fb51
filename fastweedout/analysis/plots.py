"""The report's figures (matplotlib, Agg, written atomically): the paper's Figure 2, accuracy per epoch,
the search's fitness per generation, and accuracy against each search-study axis."""

from __future__ import annotations

import math
from collections import defaultdict

from fastweedout.analysis.stats import CONFIDENCE, mean_ci
from fastweedout.atomic import atomic_output

COLORS = {"dense": "#333333", "weedout": "#d62728", "random": "#1f77b4", "given": "#2ca02c", "throughout": "#ff7f0e",
          "l1": "#9467bd", "snip": "#8c564b", "grasp": "#e377c2", "synflow": "#17becf"}


def new_figure(ncols: int, nrows: int = 1, w: float = 5.0, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend: no display needed, no global state
    return fig, fig.subplots(nrows, ncols, squeeze=False)


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


def plot_figure2(conds, exp: str, path: str) -> bool:
    """The paper's Figure 2: (a) train and (b) test accuracy vs sparsity, per series, with CI bands."""
    mine = [c for c in conds if c.experiment == exp]
    dense = [c for c in mine if c.arm == "dense"]
    series: dict[str, list] = defaultdict(list)
    for c in mine:
        if c.arm != "dense":
            series[c.series].append(c)
    if not series and dense:
        series["dense"] = []
    fig, axes = new_figure(2)
    for ax, metric, title in ((axes[0][0], "train_acc", "(a) train accuracy"), (axes[0][1], "test_acc",
                                                                                 "(b) test accuracy")):
        for s, cs in series.items():
            cs = sorted(dense + cs, key=lambda c: c.sparsity)
            band(ax, [c.sparsity for c in cs], [c.stat(metric) for c in cs], *style(s, series), label(s, series))
        accuracy_limits(ax)
        ax.set_xlabel("sparsity η (fraction of nodes off)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    cfg = mine[0].runs[0].config
    fig.suptitle(f"{cfg['model']['name']} on {cfg['data']['name']}, {cfg['training']['epochs']} epochs: mean and "
                 f"{100 * CONFIDENCE:g}% CI over seeds")
    return save_figure(fig, path, 120)


def _epoch_stats(runs_, key: str):
    per_epoch = defaultdict(list)
    for r in runs_:
        for e in r.epochs:
            if e.get(key) is not None:
                per_epoch[e["epoch"]].append(e[key])
    xs = sorted(per_epoch)
    return xs, [mean_ci(per_epoch[x]) for x in xs]


def plot_curves(conds, exp: str, path: str) -> bool:
    """Accuracy per epoch, one panel per sparsity: test (solid, CI band) and train (dashed) per series."""
    from matplotlib.ticker import MaxNLocator

    mine = [c for c in conds if c.experiment == exp]
    etas = sorted({c.sparsity for c in mine})
    all_series = {c.series for c in mine}
    fig, axes = new_figure(len(etas), w=4.0, h=3.5)
    for ax, eta in zip(axes[0], etas):
        for c in (c for c in mine if c.sparsity == eta):
            (color, fmt), lbl = style(c.series, all_series), label(c.series, all_series)
            xs, st = _epoch_stats(c.runs, "test_acc")
            band(ax, xs, st, color, fmt[0] + "-", f"{lbl} test")
            xs, st = _epoch_stats(c.runs, "train_acc")
            ax.plot(xs, [100 * m for m, _ in st], fmt[0] + ":", color=color, alpha=0.7, label=f"{lbl} train")
        accuracy_limits(ax)
        ax.set_title(f"η = {eta:g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return save_figure(fig, path)


def plot_search(conds, exp: str, path: str) -> bool:
    """Best and mean fitness per generation of the searches, one line per (series, sparsity)."""
    mine = [c for c in conds if c.experiment == exp and any(r.search and r.search.get("best_fitness")
                                                              for r in c.runs)]
    if not mine:
        return False
    fig, axes = new_figure(2)
    for ax, key, title in ((axes[0][0], "best_fitness", "best fitness"), (axes[0][1], "mean_fitness", "mean fitness")):
        for c in mine:
            rows = [r.search[key] for r in c.runs if r.search and r.search.get(key)]
            g = min(map(len, rows))
            ys = [sum(row[i] for row in rows) / len(rows) for i in range(g)]
            ax.plot(range(1, g + 1), ys, "o-", label=f"η={c.sparsity:g} {label(c.series, {x.series for x in mine})}")
        ax.set_xlabel("generation")
        ax.set_ylabel("fitness (-loss or accuracy)")
        ax.set_title(f"{title} per generation (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
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


def plot_differences(comps, exp: str, path: str) -> bool:
    """Every series minus its random control, paired by seed, with 95% intervals: (a) validation loss
    before training, (b) test accuracy after training. One row per (sparsity, series)."""
    rows = sorted((r for r in comps if r["against"] == "random" and r["experiment"] == exp),
                  key=lambda r: (r["sparsity"], r["series"]))
    if not rows:
        return False
    names = [r["series"] for r in rows]
    fig, axes = new_figure(2, 1, w=5.5, h=max(3.0, 0.32 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    panels = (("init_val_loss", 1.0, "(a) validation loss before training, minus random",
               "Δ loss (nats; < 0: better than random)"),
              ("test_acc", 100.0, "(b) test accuracy after training, minus random",
               "Δ accuracy (points; > 0: better than random)"))
    for ax, (m, scale, title, xlabel) in zip(axes[0], panels):
        for y, r in zip(ys, rows):
            d, ci = r[f"diff_{m}"], r[f"ci_{m}"]
            if not math.isfinite(d):
                continue
            color, fmt = style(r["series"], names)
            ax.errorbar([scale * d], [y], xerr=[[scale * ci if math.isfinite(ci) else 0.0]] * 2, fmt=fmt[0],
                        color=color, capsize=3)
        ax.axvline(0.0, color="#333333", linewidth=0.8)
        ax.set_yticks(ys, [f"η={r['sparsity']:g}  {label(r['series'], names)}  (n={r[f'n_{m}']})" for r in rows],
                      fontsize="small")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, axis="x")
    axes[0][1].tick_params(labelleft=False)
    fig.suptitle(f"paired by seed: mean difference and {int(CONFIDENCE * 100)}% CI")
    return save_figure(fig, path)


__all__ = ["COLORS", "label", "style", "plot_axes", "plot_curves", "plot_differences", "plot_figure2",
           "plot_search"]
