"""Tables and plots from a results directory: the paper's Figure 2, per-epoch curves, statistics.

Runs are grouped into *experiments* (same data, model, training and pipeline version) and, inside an
experiment, into *series* (arm, sparsity mode and search settings) evaluated at each sparsity. The
dense parent (eta = 0) belongs to every series of its experiment. For every (series, sparsity) the
report gives the mean and the 95% confidence interval (Student t, n - 1 degrees of freedom) over
seeds, and for every sparsity Welch's t-test of Weedout against the random control.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

from . import runs
from .runs import RunError

CONFIDENCE = 0.95
PHASES = ("search", "training", "evaluation")
REPORT_FILES = ("report.md", "summary.csv", "figure2.png", "curves.png")
_COLORS = {"dense": "#333333", "weedout": "#d62728", "random": "#1f77b4", "given": "#2ca02c"}


# ------------------------------------------------------------------------------------ statistics
def mean_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width of the two-sided t confidence interval); the half-width is NaN for n < 2."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def welch(a, b) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test of a against b: (t, two-sided p, degrees of freedom).
    NaN where it is undefined (fewer than two values on a side, or no variance on either)."""
    from scipy import stats

    a = [float(v) for v in a if v is not None and math.isfinite(float(v))]
    b = [float(v) for v in b if v is not None and math.isfinite(float(v))]
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    va = sum((x - sum(a) / len(a)) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - sum(b) / len(b)) ** 2 for x in b) / (len(b) - 1)
    if va == 0 and vb == 0:
        return math.nan, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.ttest_ind(a, b, equal_var=False)
    se2 = va / len(a) + vb / len(b)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return float(r.statistic), float(r.pvalue), float(df)


# ------------------------------------------------------------------------------------ collecting
@dataclass
class Run:
    path: str
    config: dict
    arm: str
    sparsity: float
    seed: int
    experiment: str  # key of data + model + training + version
    series: str  # arm + mode + search settings
    final: dict
    init: dict
    phases: dict  # phase -> {"wall_s", "flops"}
    epochs: list[dict]


@dataclass
class Collection:
    runs: list[Run] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # run dirs without a done marker
    search_only: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _experiment_key(cfg: dict) -> str:
    return runs.config_hash({k: cfg.get(k) for k in ("data", "model", "training", "version")})[:8]


def _series_key(cfg: dict) -> str:
    if cfg["arm"] == "dense":
        return "dense"
    s = cfg.get("search")
    if cfg["arm"] == "weedout" and s is not None:
        return f"weedout/{cfg['mode']}/P{s['population']}xG{s['generations']}/{s['metric']}/{s['bn']}"
    return f"{cfg['arm']}/{cfg['mode']}"


def collect(results: str | os.PathLike) -> Collection:
    """Every run directory of ``results`` (each checked against its hash), sorted into finished,
    incomplete, failed and search-only runs."""
    results = os.fspath(results)
    if not os.path.isdir(results):
        raise RunError(f"results directory {results} does not exist or is not a directory")
    col = Collection()
    for path, cfg in runs.iter_run_dirs(results):
        records = runs.read_jsonl(os.path.join(path, runs.RESULTS_NAME))
        if not os.path.exists(os.path.join(path, runs.DONE_NAME)):
            (col.failed if any(r.get("type") == "error" for r in records) else col.incomplete).append(path)
            continue
        if cfg.get("training") is None:
            col.search_only.append(path)
            continue
        by_type = defaultdict(list)
        for r in records:
            by_type[r.get("type")].append(r)
        if not by_type["final"]:
            raise RunError(f"{path} is marked done but its results.jsonl has no final record")
        phases = {r["phase"]: r for r in by_type["phase"]}
        col.runs.append(Run(
            path=path, config=cfg, arm=cfg["arm"], sparsity=float(cfg["sparsity"]), seed=int(cfg["seed"]),
            experiment=_experiment_key(cfg), series=_series_key(cfg), final=by_type["final"][-1],
            init=(by_type["mask"] or [{}])[-1],
            phases={p: dict(wall_s=float(phases.get(p, {}).get("wall_s") or 0.0),
                            flops=float(phases.get(p, {}).get("flops") or 0.0)) for p in PHASES},
            epochs=sorted(by_type["epoch"], key=lambda r: r["epoch"])))
    return col


# ------------------------------------------------------------------------------------ summary
METRICS = ("train_acc", "test_acc", "init_val_acc", "init_val_loss")


def _metric(run: Run, name: str):
    return run.init.get(name) if name.startswith("init_") else run.final.get(name)


@dataclass
class Condition:
    experiment: str
    series: str
    arm: str
    sparsity: float
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    def values(self, metric: str) -> list[float]:
        return [_metric(r, metric) for r in sorted(self.runs, key=lambda r: r.seed)]

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_ci(self.values(metric))

    def phase_mean(self, phase: str, what: str) -> float:
        return sum(r.phases[phase][what] for r in self.runs) / len(self.runs)

    def search_share(self, what: str) -> float:
        s = sum(r.phases["search"][what] for r in self.runs)
        t = sum(r.phases["training"][what] for r in self.runs)
        return s / (s + t) if s + t > 0 else math.nan


def conditions(col: Collection) -> list[Condition]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in col.runs:
        groups[(r.experiment, r.series, r.sparsity)].append(r)
    out = [Condition(e, s, rs[0].arm, eta, rs) for (e, s, eta), rs in groups.items()]
    order = {"dense": 0, "weedout": 1, "random": 2, "given": 3}
    return sorted(out, key=lambda c: (c.experiment, c.sparsity, order.get(c.arm, 9), c.series))


def comparisons(conds: list[Condition]) -> list[dict]:
    """Welch's t-test of every weedout series against every random series of the same experiment,
    mode and sparsity, on final train/test accuracy and on the validation accuracy before training."""
    out = []
    for w in conds:
        if w.arm != "weedout":
            continue
        mode = w.series.split("/")[1]
        for r in conds:
            if r.arm == "random" and r.experiment == w.experiment and r.sparsity == w.sparsity \
                    and r.series == f"random/{mode}":
                row = dict(experiment=w.experiment, sparsity=w.sparsity, weedout=w.series, random=r.series,
                           n_weedout=len(w.runs), n_random=len(r.runs))
                for m in METRICS:
                    t, p, df = welch(w.values(m), r.values(m))
                    row[f"diff_{m}"] = w.stat(m)[0] - r.stat(m)[0]
                    row[f"t_{m}"], row[f"p_{m}"], row[f"df_{m}"] = t, p, df
                out.append(row)
    return out


# ------------------------------------------------------------------------------------ formatting
def _pct(mean: float, ci: float | None = None) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    s = f"{100 * mean:.2f}"
    if ci is not None:
        s += f" ± {100 * ci:.2f}" if math.isfinite(ci) else " ± n/a"
    return s


def _num(x: float, fmt: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def _describe(run: Run) -> list[str]:
    c = run.config
    d, m, t = c["data"], c["model"], c["training"]
    subset = f", first {d['train_subset']} training images" if d.get("train_subset") else ""
    return [f"- dataset **{d['name']}** (validation split {d['val_size'] if d['val_size'] is not None else 'default'}, "
            f"split seed {d['split_seed']}{subset}); model **{m['name']}** (dropout {m['dropout']:g})",
            f"- training: {t['epochs']} epochs, batch {t['batch_size']}, SGD lr {t['lr']:g} "
            f"(momentum {t['momentum']:g}, Nesterov {t['nesterov']}), weight decay {t['weight_decay']:g}, "
            f"{t['schedule']} schedule, label smoothing {t['label_smoothing']:g}, "
            f"{'masked' if t['masked'] else 'pruned'} network"]


def summary_rows(conds: list[Condition], comps: list[dict]) -> list[dict]:
    by_w = {(c["experiment"], c["weedout"], c["sparsity"]): c for c in comps}
    rows = []
    for c in conds:
        cfg = c.runs[0].config
        row = dict(experiment=c.experiment, dataset=cfg["data"]["name"], model=cfg["model"]["name"],
                   epochs=cfg["training"]["epochs"], arm=c.arm, series=c.series, sparsity=c.sparsity, n=len(c.runs),
                   seeds=" ".join(map(str, c.seeds)))
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_ci95"] = c.stat(m)
        for ph in PHASES:
            row[f"{ph}_flops_mean"] = c.phase_mean(ph, "flops")
            row[f"{ph}_wall_s_mean"] = c.phase_mean(ph, "wall_s")
        row["search_share_flops"] = c.search_share("flops")
        row["search_share_wall"] = c.search_share("wall_s")
        comp = by_w.get((c.experiment, c.series, c.sparsity))
        for m in METRICS:
            row[f"welch_t_{m}"] = comp[f"t_{m}"] if comp else math.nan
            row[f"welch_p_{m}"] = comp[f"p_{m}"] if comp else math.nan
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else
                        (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.items()})
    return buf.getvalue()


def _headline(conds: list[Condition], comps: list[dict], exp: str) -> list[str]:
    mine = [c for c in conds if c.experiment == exp]
    dense = [c for c in mine if c.arm == "dense"]
    lines = []
    top = max((c.sparsity for c in mine if c.arm != "dense"), default=None)
    if dense and top is not None:
        d = dense[0].stat("test_acc")[0]
        names = {c.series for c in mine}
        for c in mine:
            if c.sparsity == top:
                lines.append(f"- dense → eta={top:g} ({_label(c.series, names)}): test accuracy {_pct(d)} → "
                             f"{_pct(c.stat('test_acc')[0])} ({100 * (c.stat('test_acc')[0] - d):+.2f} points)")
    for r in comps:
        if r["experiment"] != exp:
            continue
        lines.append(f"- eta={r['sparsity']:g}: weedout − random = {r['diff_init_val_loss']:+.3f} validation loss "
                     f"before training (p {_p(r['p_init_val_loss'])}), "
                     f"{100 * r['diff_test_acc']:+.2f} points of test accuracy after training "
                     f"(p {_p(r['p_test_acc'])})")
    return lines


def to_markdown(col: Collection, conds: list[Condition], comps: list[dict], primary: str | None) -> str:
    out = ["# Weedout vs random masks: results", ""]
    out.append(f"{len(col.runs)} finished runs" + (f", {len(col.incomplete)} incomplete (not included)"
                                                    if col.incomplete else "")
               + (f", {len(col.failed)} failed" if col.failed else "")
               + (f", {len(col.search_only)} search-only" if col.search_only else "") + ".")
    out += ["", f"Means over seeds with {100 * CONFIDENCE:g}% confidence intervals (Student t, n−1 degrees of "
                "freedom); accuracies in percent. *train* is the accuracy on the augmented training batches "
                "during the last epoch, *test* the test set after it, *val@init* the validation accuracy "
                "(and loss) of the chosen mask before any training (the search's signal). p: Welch's t-test, weedout vs "
                "random, two-sided. FLOPs: analytic, 2 per multiply-add, of the network actually run.", ""]
    experiments = sorted({c.experiment for c in conds}, key=lambda e: (e != primary, e))
    for exp in experiments:
        mine = [c for c in conds if c.experiment == exp]
        out += [f"## Experiment {exp}" + (" (plotted)" if exp == primary else ""), ""]
        out += _describe(mine[0].runs[0])
        searches = sorted({c.series for c in mine if c.arm == "weedout"})
        if searches:
            out.append(f"- search: {', '.join(searches)} (population x generations / fitness / BN)")
        out += ["", "### Headline", ""] + (_headline(conds, comps, exp) or ["- (needs dense and sparse runs)"])
        out += ["", "### Accuracy", "",
                "| eta | series | n | train acc | test acc | val loss@init | val acc@init |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for c in mine:
            lm, lci = c.stat("init_val_loss")
            out.append(f"| {c.sparsity:g} | {c.series} | {len(c.runs)} | {_pct(*c.stat('train_acc'))} | "
                       f"{_pct(*c.stat('test_acc'))} | {_num(lm, '.4f')} ± {_num(lci, '.4f')} | "
                       f"{_pct(*c.stat('init_val_acc'))} |")
        rows = [r for r in comps if r["experiment"] == exp]
        if rows:
            out += ["", "### Weedout vs random (Welch's t-test)", "",
                    "Δ = weedout − random (accuracy in points, loss in nats). Before training the search should "
                    "win (lower validation loss); the paper finds no advantage left after training.", "",
                    "| eta | Δ val loss@init | p | Δ val acc@init | p | Δ train acc | p | Δ test acc | p |",
                    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                out.append(f"| {r['sparsity']:g} | {r['diff_init_val_loss']:+.4f} | {_p(r['p_init_val_loss'])} | "
                           f"{100 * r['diff_init_val_acc']:+.2f} | {_p(r['p_init_val_acc'])} | "
                           f"{100 * r['diff_train_acc']:+.2f} | {_p(r['p_train_acc'])} | "
                           f"{100 * r['diff_test_acc']:+.2f} | {_p(r['p_test_acc'])} |")
        out += ["", "### Compute per run (means): search vs training", "",
                "| eta | series | search GFLOP | training GFLOP | search share (FLOPs) | search s | training s | "
                "search share (time) | evaluation s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in mine:
            out.append(f"| {c.sparsity:g} | {c.series} | {_num(c.phase_mean('search', 'flops') / 1e9)} | "
                       f"{_num(c.phase_mean('training', 'flops') / 1e9)} | {_pct(c.search_share('flops'))}% | "
                       f"{_num(c.phase_mean('search', 'wall_s'), '.1f')} | "
                       f"{_num(c.phase_mean('training', 'wall_s'), '.1f')} | {_pct(c.search_share('wall_s'))}% | "
                       f"{_num(c.phase_mean('evaluation', 'wall_s'), '.1f')} |")
        out.append("")
    if primary is not None:
        out += ["## Figures", "", "![Figure 2: train and test accuracy vs sparsity](figure2.png)", "",
                "![Accuracy per epoch](curves.png)", ""]
    if col.incomplete or col.failed:
        out += ["## Not included", ""] + [f"- {os.path.basename(p)}: incomplete" for p in col.incomplete] \
            + [f"- {os.path.basename(p)}: failed (see its results.jsonl)" for p in col.failed] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ plots
def _series_points(conds: list[Condition], exp: str) -> dict[str, list[Condition]]:
    """Series -> conditions by sparsity, the dense parent prepended to every masked series."""
    mine = [c for c in conds if c.experiment == exp]
    dense = [c for c in mine if c.arm == "dense"]
    series: dict[str, list[Condition]] = defaultdict(list)
    for c in mine:
        if c.arm != "dense":
            series[c.series].append(c)
    if not series and dense:
        series["dense"] = []
    return {s: sorted(dense + cs, key=lambda c: c.sparsity) for s, cs in series.items()}


def _label(series: str, all_series) -> str:
    arm = series.split("/")[0]
    same_arm = [s for s in all_series if s.split("/")[0] == arm]
    return arm if len(same_arm) == 1 else series


def _new_figure(ncols: int, nrows: int = 1, w: float = 5.0, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend: no display needed, no global state
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_figure2(conds: list[Condition], exp: str, path: str) -> None:
    """The paper's Figure 2: (a) train and (b) test accuracy vs sparsity, per arm, with CI bands."""
    series = _series_points(conds, exp)
    fig, axes = _new_figure(2)
    for ax, metric, title in ((axes[0][0], "train_acc", "(a) train accuracy"),
                              (axes[0][1], "test_acc", "(b) test accuracy")):
        for s, cs in series.items():
            xs = [c.sparsity for c in cs]
            st = [c.stat(metric) for c in cs]
            ms = [100 * m for m, _ in st]
            lo = [100 * (m - (ci if math.isfinite(ci) else 0)) for m, ci in st]
            hi = [100 * (m + (ci if math.isfinite(ci) else 0)) for m, ci in st]
            color = _COLORS.get(s.split("/")[0])
            ax.plot(xs, ms, "o-", color=color, label=_label(s, series))
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_xlabel("sparsity η (fraction of nodes off)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    cfg = next(c for c in conds if c.experiment == exp).runs[0].config
    fig.suptitle(f"{cfg['model']['name']} on {cfg['data']['name']}, {cfg['training']['epochs']} epochs: "
                 f"mean and {100 * CONFIDENCE:g}% CI over seeds")
    with runs.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _epoch_stats(runs_: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    per_epoch = defaultdict(list)
    for r in runs_:
        for e in r.epochs:
            if e.get(key) is not None:
                per_epoch[e["epoch"]].append(e[key])
    xs = sorted(per_epoch)
    st = [mean_ci(per_epoch[x]) for x in xs]
    return xs, [100 * m for m, _ in st], [100 * (ci if math.isfinite(ci) else 0.0) for _, ci in st]


def plot_curves(conds: list[Condition], exp: str, path: str) -> None:
    """Accuracy per epoch, one panel per sparsity: test (solid, CI band) and train (dashed) per arm."""
    from matplotlib.ticker import MaxNLocator

    mine = [c for c in conds if c.experiment == exp]
    etas = sorted({c.sparsity for c in mine})
    all_series = {c.series for c in mine}
    fig, axes = _new_figure(len(etas), w=4.0, h=3.5)
    for ax, eta in zip(axes[0], etas):
        for c in (c for c in mine if c.sparsity == eta):
            color = _COLORS.get(c.arm)
            label = _label(c.series, all_series)
            xs, m, ci = _epoch_stats(c.runs, "test_acc")
            ax.plot(xs, m, "-", color=color, label=f"{label} test")
            ax.fill_between(xs, [a - b for a, b in zip(m, ci)], [a + b for a, b in zip(m, ci)], color=color,
                            alpha=0.2, linewidth=0)
            xs, m, _ = _epoch_stats(c.runs, "train_acc")
            ax.plot(xs, m, "--", color=color, label=f"{label} train")
        ax.set_title(f"η = {eta:g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    with runs.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ------------------------------------------------------------------------------------ entry point
@dataclass
class Report:
    paths: dict[str, str]
    collection: Collection
    conditions: list[Condition]
    comparisons: list[dict]
    primary: str | None


def write_report(results: str | os.PathLike, out: str | os.PathLike | None = None) -> Report:
    """Write report.md, summary.csv, figure2.png and curves.png (each atomically) into ``out``
    (default: ``results``). The figures show the experiment with the most finished runs."""
    results = os.fspath(results)
    col = collect(results)
    if not col.runs:
        raise RunError(f"no finished training runs in {results}"
                       + (f" ({len(col.incomplete)} incomplete)" if col.incomplete else ""))
    out = os.fspath(out) if out is not None else results
    runs.check_results_dir(out, verify_runs=False)
    conds = conditions(col)
    comps = comparisons(conds)
    counts = defaultdict(int)
    for r in col.runs:
        counts[r.experiment] += 1
    primary = max(sorted(counts), key=lambda e: counts[e])
    paths = {name: os.path.join(out, name) for name in REPORT_FILES}
    plot_figure2(conds, primary, paths["figure2.png"])
    plot_curves(conds, primary, paths["curves.png"])
    runs.atomic_write_text(paths["summary.csv"], to_csv(summary_rows(conds, comps)))
    runs.atomic_write_text(paths["report.md"], to_markdown(col, conds, comps, primary))
    return Report(paths, col, conds, comps, primary)


__all__ = ["CONFIDENCE", "Collection", "Condition", "Report", "collect", "comparisons", "conditions", "mean_ci",
           "plot_curves", "plot_figure2", "summary_rows", "to_csv", "to_markdown", "welch", "write_report"]
