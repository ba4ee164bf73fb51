"""The report's section on robustness to further pruning after training (``fastweedout robustness``,
``fastweedout.experiment.robustness``): test accuracy against the further fraction of live nodes
removed without fine-tuning, per series and sparsity, for each way of choosing the nodes removed."""

from __future__ import annotations

import math

from fastweedout.analysis.formatting import pct
from fastweedout.analysis.plots import accuracy_limits, band, label, new_figure, save_figure, style
from fastweedout.analysis.stats import mean_ci
from fastweedout.experiment.robustness import curves

METHOD_NAMES = {"random": "random nodes", "bn_gamma": "smallest BN |γ|",
                "random+bn_recal": "random nodes, BN recalibrated",
                "bn_gamma+bn_recal": "smallest BN |γ|, BN recalibrated"}


def condition_curves(cond) -> dict[str, dict[float, list[float]]]:
    """{curve: {fraction: [test accuracy per run]}} over a condition's runs that were measured (the
    intact network at fraction 0)."""
    return curves(r.robustness for r in cond.runs if getattr(r, "robustness", None))


def robustness_table(mine: list, name: dict[str, str]) -> list[str]:
    """Markdown: mean test accuracy (± 95% interval over runs) at each further fraction removed."""
    rows = [(c, condition_curves(c)) for c in mine]
    rows = [(c, cv) for c, cv in rows if cv]
    if not rows:
        return []
    fracs = sorted({f for _, cv in rows for d in cv.values() for f in d})
    out = ["### Robustness to further pruning after training (no fine-tuning)", "",
           "Test accuracy after removing a further fraction f of every node set's live nodes of the trained network "
           "(`fastweedout robustness`); mean ± 95% interval over the runs measured (n).", "",
           "| η | series | removed by | n | " + " | ".join(f"f={f:g}" for f in fracs) + " |",
           "|---:|---|---|---:|" + "---:|" * len(fracs)]
    for c, cv in rows:
        for method, d in sorted(cv.items()):
            cells = [pct(*mean_ci(d[f])) if d.get(f) else "" for f in fracs]
            how = METHOD_NAMES.get(method, method).replace("|", "\\|")  # a bar would split the cell
            out.append(f"| {c.sparsity:g} | {name[c.series]} | {how} | {len(d[0.0])} | "
                       + " | ".join(cells) + " |")
    return out + [""]


def plot_robustness(conds, exp: str, path: str) -> bool:
    """One panel per removal method: test accuracy against the further fraction removed, one line per
    (series, sparsity), with 95% bands."""
    mine = [(c, condition_curves(c)) for c in conds if c.experiment == exp]
    mine = [(c, cv) for c, cv in mine if cv]
    if not mine:
        return False
    methods = sorted({m for _, cv in mine for m in cv})
    all_series = {c.series for c, _ in mine}
    fig, axes = new_figure(len(methods), w=5.0, h=4.0)
    for ax, method in zip(axes[0], methods):
        for c, cv in mine:
            d = cv.get(method)
            if not d:
                continue
            xs = sorted(d)
            color, fmt = style(c.series, all_series)
            band(ax, xs, [mean_ci(d[x]) for x in xs], color, fmt, f"η={c.sparsity:g} {label(c.series, all_series)}")
        accuracy_limits(ax)
        ax.set_title(f"further nodes removed: {METHOD_NAMES.get(method, method)}")
        ax.set_xlabel("fraction f of the live nodes removed after training")
        ax.set_ylabel("test accuracy (%), no fine-tuning")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    if len(methods) > 1:
        lo = min(a.get_ylim()[0] for a in axes[0])
        hi = max(a.get_ylim()[1] for a in axes[0])
        for a in axes[0]:
            a.set_ylim(lo, hi if math.isfinite(hi) else 100)
    return save_figure(fig, path)


__all__ = ["METHOD_NAMES", "condition_curves", "plot_robustness", "robustness_table"]
