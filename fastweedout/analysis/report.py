"""Tables and plots from a results directory: the paper's Figure 2, per-epoch curves, the search
studies' axes, statistics.

Runs are grouped into *experiments* (same data, model, training and pipeline version) and, inside an
experiment, into *series* (how the mask was chosen: arm, sparsity mode, granularity, search or
pruning settings, pretraining) evaluated at each sparsity. The dense parent (eta = 0) belongs to
every series of its experiment. For every (series, sparsity): the mean and the 95% t-interval over
seeds; every non-random series is compared with its *control*, the random series of the same mode,
granularity and pretraining, by a paired t-test over seeds (runs with the same seed share the
initial weights, the validation split and the data order), with Holm's correction over all the
comparisons of a metric in the report.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

from fastweedout import atomic
from fastweedout.analysis.convergence import CONVERGENCE_METRICS, convergence, convergence_tables
from fastweedout.analysis.emergence import emergence, emergence_table, plot_emergence
from fastweedout.analysis.formatting import comparison_table, describe, num, p_value, pct, to_csv
from fastweedout.analysis.plots import (
    label,
    plot_axes,
    plot_curves,
    plot_differences,
    plot_figure2,
    plot_figure2_extras,
    plot_search,
)
from fastweedout.analysis.robustness_report import plot_robustness, robustness_table
from fastweedout.analysis.series import (
    control_key,
    experiment_key,
    init_control_key,
    node_peer_key,
    series_key,
    source_key,
)
from fastweedout.analysis.stats import CONFIDENCE, holm, mean_ci, paired
from fastweedout.experiment import runs
from fastweedout.experiment.records import RunError, read_jsonl
from fastweedout.experiment.robustness import read_robustness

PHASES = ("pretrain", "search", "training", "evaluation")
METRICS = ("train_acc", "test_acc", "init_val_acc", "init_val_loss")
CONV_METRICS = tuple(CONVERGENCE_METRICS)  # fastweedout.analysis.convergence: per-epoch test accuracy
TESTED = METRICS + CONV_METRICS  # every metric paired against the control, each its own Holm family
PAPER_DROP = 15.0  # points of test accuracy lost dense -> eta 0.8 on CIFAR-10 (Farahani 2024)


@dataclass
class Run:
    path: str
    config: dict
    arm: str
    sparsity: float
    seed: int
    experiment: str  # data + model + training + version
    series: str  # how the mask was chosen
    control: str | None  # the random series it is compared with (None: random and dense runs)
    init_control: str | None  # the same for the before-training metrics (the random mask on the same parent)
    final: dict
    init: dict
    phases: dict  # phase -> {"wall_s", "flops"}
    epochs: list[dict]
    elite_wins: float | None  # fraction of generations >= 2 won by the carried-over elite
    search: dict | None  # the search phase record (fitness per generation)
    training_phase: dict = field(default_factory=dict)  # the training phase record (images, FLOPs)
    convergence: dict = field(default_factory=dict)  # fastweedout.analysis.convergence, set by collect
    robustness: dict | None = None  # robustness.json (fastweedout robustness), when measured


@dataclass
class Collection:
    runs: list[Run] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # run dirs without a done marker
    search_only: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # finished, but results.jsonl cannot be read


def _elite_wins(search: dict | None) -> float | None:
    idx = (search or {}).get("elite_index") or []
    later = idx[1:]
    return sum(1 for i in later if i == 0) / len(later) if later else None


def collect(results: str | os.PathLike) -> Collection:
    """Every run directory of ``results`` (each checked against its hash), sorted into finished,
    incomplete, failed, search-only and unreadable runs (the last with a warning naming each)."""
    results = os.fspath(results)
    if not os.path.isdir(results):
        raise RunError(f"results directory {results} does not exist or is not a directory")
    col = Collection()
    for path, cfg in runs.iter_run_dirs(results):
        try:
            records = read_jsonl(os.path.join(path, runs.RESULTS_NAME))
        except RunError as e:
            col.unreadable.append(path)
            warnings.warn(f"skipping {path}: {e} (run the same command again to rebuild it)", RuntimeWarning,
                          stacklevel=2)
            continue
        if not os.path.exists(os.path.join(path, runs.DONE_NAME)):
            (col.failed if any(r.get("type") == "error" for r in records) else col.incomplete).append(path)
            continue
        if cfg.get("training") is None:
            col.search_only.append(path)
            continue
        by_type = defaultdict(list)
        for r in records:
            by_type[r.get("type")].append(r)
        finals = by_type["final"]
        if not finals:
            col.unreadable.append(path)
            warnings.warn(f"skipping {path}: marked done but its results.jsonl has no final record (run the same "
                          "command again to rebuild it)", RuntimeWarning, stacklevel=2)
            continue
        phases = {r["phase"]: r for r in by_type["phase"]}
        col.runs.append(Run(
            path=path, config=cfg, arm=cfg["arm"], sparsity=float(cfg["sparsity"]), seed=int(cfg["seed"]),
            experiment=experiment_key(cfg), series=series_key(cfg), control=control_key(cfg),
            init_control=init_control_key(cfg), final=finals[-1],
            init=(by_type["mask"] or [{}])[-1],
            phases={p: dict(wall_s=float(phases.get(p, {}).get("wall_s") or 0.0),
                            flops=float(phases.get(p, {}).get("flops") or 0.0)) for p in PHASES},
            epochs=sorted(by_type["epoch"], key=lambda r: r["epoch"]),
            elite_wins=_elite_wins(phases.get("search")), search=phases.get("search"),
            training_phase=phases.get("training", {}), robustness=read_robustness(path)))
    add_convergence(col.runs)
    return col


def add_convergence(all_runs: list[Run]) -> None:
    """Each run's convergence metrics; the dense parent is the dense run (no pretraining) of the same
    experiment and seed."""
    dense = {(r.experiment, r.seed): r.final.get("test_acc") for r in all_runs if r.series == "dense"}
    for r in all_runs:
        r.convergence = convergence(r.epochs, r.training_phase, r.config["training"]["batch_size"],
                                    r.final.get("test_acc"), dense.get((r.experiment, r.seed)))


def _metric(run: Run, name: str):
    if name in CONVERGENCE_METRICS:
        return run.convergence.get(name)
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

    def by_seed(self, metric: str) -> dict:
        return {r.seed: _metric(r, metric) for r in self.runs}

    def values(self, metric: str) -> list:
        return [_metric(r, metric) for r in sorted(self.runs, key=lambda r: r.seed)]

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_ci(self.values(metric))

    def phase_mean(self, phase: str, what: str) -> float:
        return sum(r.phases[phase][what] for r in self.runs) / len(self.runs)

    def search_share(self, what: str) -> float:
        s = sum(r.phases["search"][what] + r.phases["pretrain"][what] for r in self.runs)
        t = sum(r.phases["training"][what] for r in self.runs)
        return s / (s + t) if s + t > 0 else math.nan


_ARM_ORDER = {"dense": 0, "weedout": 1, "random": 2, "throughout": 3, "l1": 4, "snip": 5, "grasp": 6, "synflow": 7}


def conditions(col: Collection) -> list[Condition]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in col.runs:
        groups[(r.experiment, r.series, r.sparsity)].append(r)
    out = [Condition(e, s, rs[0].arm, eta, rs) for (e, s, eta), rs in groups.items()]
    return sorted(out, key=lambda c: (c.experiment, c.sparsity, _ARM_ORDER.get(c.arm, 9), c.series))


def comparisons(conds: list[Condition]) -> list[dict]:
    """Paired t-tests at each sparsity, on every metric: every non-random series against its random
    control (``against="random"``) and every weight-level series against the node-level series of
    the same arm (``against="node"``) and every structure-alone series (reinit, shuffled) against the same arm
    with its own weights and nodes (``against="source"``); Holm-adjusted p-values per metric over all rows."""
    index = {(c.experiment, c.series, c.sparsity): c for c in conds}
    rows = []
    for c in conds:
        cfg, first = c.runs[0].config, c.runs[0]
        for against, key in (("random", first.control), ("node", node_peer_key(cfg)), ("source", source_key(cfg))):
            ctrl = index.get((c.experiment, key, c.sparsity)) if key else None
            if ctrl is None:
                continue
            # a rewound run trains like the random run without pretraining but was scored on the step-K parent
            init = index.get((c.experiment, first.init_control, c.sparsity)) if against == "random" else ctrl
            row = dict(experiment=c.experiment, sparsity=c.sparsity, series=c.series, arm=c.arm, control=ctrl.series,
                       init_control=init.series if init else "", against=against)
            for m in TESTED:
                other = init if m.startswith("init_") else ctrl
                t = paired(c.by_seed(m), other.by_seed(m) if other else {})
                row.update({f"n_{m}": t["n"], f"diff_{m}": t["diff"], f"ci_{m}": t["diff_ci"], f"t_{m}": t["t"],
                            f"p_{m}": t["p"]})
            rows.append(row)
    for m in TESTED:
        for row, p in zip(rows, holm([r[f"p_{m}"] for r in rows])):
            row[f"p_holm_{m}"] = p
    return rows


# ------------------------------------------------------------------------------------ formatting
def summary_rows(conds: list[Condition], comps: list[dict]) -> list[dict]:
    by = {(c["experiment"], c["series"], c["sparsity"], c["against"]): c for c in comps}
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
        wins = [r.elite_wins for r in c.runs if r.elite_wins is not None]
        row["elite_wins"] = sum(wins) / len(wins) if wins else math.nan
        comp = by.get((c.experiment, c.series, c.sparsity, "random"))
        row["control"] = comp["control"] if comp else ""
        for m in METRICS:
            for k in ("diff", "ci", "p", "p_holm"):
                row[f"paired_{k}_{m}"] = comp[f"{k}_{m}"] if comp else math.nan
        for m in CONV_METRICS:
            row[f"{m}_mean"], row[f"{m}_ci95"] = c.stat(m)
            row[f"{m}_reached"] = sum(1 for v in c.values(m) if v is not None)
            for k in ("diff", "p", "p_holm"):
                row[f"paired_{k}_{m}"] = comp[f"{k}_{m}"] if comp else math.nan
        node = by.get((c.experiment, c.series, c.sparsity, "node"))  # weight-level: minus node-level
        row["node_peer"] = node["control"] if node else ""
        for m in ("init_val_loss", "test_acc"):
            for k in ("diff", "p_holm"):
                row[f"vs_node_{k}_{m}"] = node[f"{k}_{m}"] if node else math.nan
        rows.append(row)
    return rows


def _headline(conds: list[Condition], comps: list[dict], exp: str, name: dict[str, str]) -> list[str]:
    mine = [c for c in conds if c.experiment == exp]
    dense = [c for c in mine if c.arm == "dense"]
    lines = []
    top = max((c.sparsity for c in mine if c.arm != "dense"), default=None)
    if dense and top is not None:
        d = dense[0].stat("test_acc")[0]
        for c in mine:
            if c.sparsity == top and c.arm == "random":
                lines.append(f"- dense → η={top:g} with random masks ({name[c.series]}): test accuracy {pct(d)} → "
                             f"{pct(c.stat('test_acc')[0])} ({100 * (c.stat('test_acc')[0] - d):+.2f} points; the "
                             f"paper loses about {PAPER_DROP:g} points dense → 0.8 on CIFAR-10)")
    for r in comps:
        if r["experiment"] == exp and r["against"] == "random":
            ctrl = name.get(r["control"], r["control"])
            init = r.get("init_control") or r["control"]
            versus = f" against {name.get(init, init)}" if init != r["control"] else ""
            lines.append(f"- η={r['sparsity']:g}, {name[r['series']]} − {ctrl}: {r['diff_init_val_loss']:+.3f} "
                         f"validation loss before training{versus} (p {p_value(r['p_init_val_loss'])}, "
                         f"Holm {p_value(r['p_holm_init_val_loss'])}), {100 * r['diff_test_acc']:+.2f} points of test "
                         f"accuracy after training (p {p_value(r['p_test_acc'])}, "
                         f"Holm {p_value(r['p_holm_test_acc'])}; "
                         f"{r['n_test_acc']} pairs)")
    return lines


def to_markdown(col: Collection, conds: list[Condition], comps: list[dict], primary: str | None,
                figures: list[str], emerged: list[dict] | None = None) -> str:
    out = ["# Sparse masks before training and after: results", ""]
    out.append(f"{len(col.runs)} finished runs" + (f", {len(col.incomplete)} incomplete (not included)"
                                                    if col.incomplete else "")
               + (f", {len(col.failed)} failed" if col.failed else "")
               + (f", {len(col.unreadable)} with unreadable records (skipped)" if col.unreadable else "")
               + (f", {len(col.search_only)} search-only" if col.search_only else "") + ".")
    out += ["", f"Means over seeds with {100 * CONFIDENCE:g}% confidence intervals (Student t, n−1 degrees of "
            "freedom); accuracies in percent. *train*: accuracy on the augmented training batches during the last "
            "epoch; "
            "*test*: the test set after it; *@init*: the chosen mask on held-out validation images before any training "
            "(images the search never saw). Comparisons: each method minus the random control of the same seed (same "
            "initial weights and data), paired t-test, two-sided, Holm-corrected over all comparisons of a metric. "
            "FLOPs: analytic, 2 per multiply-add, of the network actually run. A series is named by its arm and "
            "what tells it from the arm's other series; summary.csv has the full keys.", ""]
    experiments = sorted({c.experiment for c in conds}, key=lambda e: (e != primary, e))
    for exp in experiments:
        mine = [c for c in conds if c.experiment == exp]
        name = {c.series: label(c.series, {x.series for x in mine}) for c in mine}  # full keys: summary.csv
        out += [f"## Experiment {exp}" + (" (plotted)" if exp == primary else ""), ""]
        out += describe(mine[0].runs[0].config)
        out += ["", "### Headline", ""] + (_headline(conds, comps, exp, name) or ["- (needs dense and sparse runs)"])
        out += ["", "### Accuracy", "", "| η | series | n | train acc | test acc | val loss@init | val acc@init |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for c in mine:
            lm, lci = c.stat("init_val_loss")
            out.append(f"| {c.sparsity:g} | {name[c.series]} | {len(c.runs)} | {pct(*c.stat('train_acc'))} | "
                       f"{pct(*c.stat('test_acc'))} | {num(lm, '.4f')} ± {num(lci, '.4f')} | "
                       f"{pct(*c.stat('init_val_acc'))} |")
        for against, title, what in (("random", "Against the random control", "method − random"),
                                     ("node", "Weight-level against node-level masks", "weight − node"),
                                     ("source", "Structure alone against the same arm's own weights and nodes",
                                      "reinit/shuffled − original")):
            rows = [r for r in comps if r["experiment"] == exp and r["against"] == against]
            if rows:
                out += ["", f"### {title} (paired by seed)", ""] + comparison_table(rows, what, name)
        out += [""] + convergence_tables(mine, [r for r in comps if r["experiment"] == exp and
                                                 r["against"] == "random"], name)
        short = lambda k, mine=mine: label(k, {x.series for x in mine} | {k})  # noqa: E731
        for extra in (robustness_table(mine, name), emergence_table(emerged or [], exp, short)):
            out += [""] + extra if extra else []
        elite = [c for c in mine if any(r.elite_wins is not None for r in c.runs)]
        if elite:
            out += ["", "### The search: how often the carried-over elite won a generation", "",
                    "| η | series | elite won (generations 2..G, mean over seeds) | best fitness by generation "
                    "(mean) |",
                    "|---:|---|---:|---|"]
            for c in elite:
                w = [r.elite_wins for r in c.runs if r.elite_wins is not None]
                best = [r.search.get("best_fitness") or [] for r in c.runs if r.search]
                gens = [sum(b[g] for b in best) / len(best) for g in range(min(map(len, best)))] if best else []
                out.append(f"| {c.sparsity:g} | {name[c.series]} | {100 * sum(w) / len(w):.0f}% | "
                           f"{', '.join(f'{v:.3f}' for v in gens)} |")
        out += ["", "### Compute per run (means): choosing the mask vs training", "",
                "| η | series | pretrain+search GFLOP | training GFLOP | share (FLOPs) | pretrain+search s | "
                "training s | share (time) | evaluation s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in mine:
            sel = c.phase_mean("search", "flops") + c.phase_mean("pretrain", "flops")
            sel_s = c.phase_mean("search", "wall_s") + c.phase_mean("pretrain", "wall_s")
            out.append(f"| {c.sparsity:g} | {name[c.series]} | {num(sel / 1e9)} | "
                       f"{num(c.phase_mean('training', 'flops') / 1e9)} | {pct(c.search_share('flops'))}% | "
                       f"{num(sel_s, '.1f')} | "
                       f"{num(c.phase_mean('training', 'wall_s'), '.1f')} | {pct(c.search_share('wall_s'))}% | "
                       f"{num(c.phase_mean('evaluation', 'wall_s'), '.1f')} |")
        out.append("")
    if figures:
        out += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    skipped = ([(p, "incomplete") for p in col.incomplete] + [(p, "failed (see its results.jsonl)") for p in col.failed]
               + [(p, "unreadable records") for p in col.unreadable])
    if skipped:
        out += ["## Not included", ""] + [f"- {os.path.basename(p)}: {why}" for p, why in skipped] + [""]
    return "\n".join(out)


@dataclass
class Report:
    paths: dict[str, str]
    collection: Collection
    conditions: list[Condition]
    comparisons: list[dict]
    primary: str | None


def write_report(results: str | os.PathLike, out: str | os.PathLike | None = None) -> Report:
    """Write report.md, summary.csv and the figures (each atomically) into ``out`` (default:
    ``results``). Figure 2 and the curves show the experiment with the most finished runs; axes.png
    every search-study axis (population, generations, model) found."""
    results = os.fspath(results)
    col = collect(results)
    if not col.runs:
        raise RunError(f"no finished training runs in {results}"
                       + (f" ({len(col.incomplete)} incomplete)" if col.incomplete else ""))
    out = os.fspath(out) if out is not None else results
    runs.check_results_dir(out, verify_runs=False)
    conds = conditions(col)
    comps = comparisons(conds)
    counts: dict[str, int] = defaultdict(int)
    for r in col.runs:
        counts[r.experiment] += 1
    primary = max(sorted(counts), key=lambda e: counts[e])
    paths = {"report.md": os.path.join(out, "report.md"), "summary.csv": os.path.join(out, "summary.csv")}
    figures = []
    emerged = emergence(col.runs)
    for name, draw in (("figure2.png", lambda p: plot_figure2(conds, primary, p)),
                       ("figure2-extras.png", lambda p: plot_figure2_extras(conds, primary, p)),
                       ("curves.png", lambda p: plot_curves(conds, primary, p)),
                       ("search.png", lambda p: plot_search(conds, primary, p)),
                       ("differences.png", lambda p: plot_differences(comps, primary, p)),
                       ("axes.png", lambda p: plot_axes(conds, comps, p)),
                       ("robustness.png", lambda p: plot_robustness(conds, primary, p)),
                       ("emergence.png", lambda p: plot_emergence(emerged, primary, p, lambda k: label(k, {k})))):
        path = os.path.join(out, name)
        if draw(path):
            paths[name] = path
            figures.append(name)
    atomic.atomic_write_text(paths["summary.csv"], to_csv(summary_rows(conds, comps)))
    atomic.atomic_write_text(paths["report.md"], to_markdown(col, conds, comps, primary, figures, emerged))
    return Report(paths, col, conds, comps, primary)


__all__ = ["Collection", "Condition", "Report", "collect", "comparisons", "conditions",
           "summary_rows", "to_markdown", "write_report"]
