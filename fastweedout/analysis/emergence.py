"""Mask emergence (Van Gelder et al. 2020: how early the structure of a sparse network is decided):
for Weedout after K dense steps (``--pretrain-steps K``), how much the winners chosen at different K
share, and how much they share with the trained dense network's ranking of its nodes.

The overlap of two masks of one node set is the Jaccard index of their live nodes, |A ∩ B| / |A ∪ B|;
a mask's overlap is the mean over its node sets. Winners are compared within a seed (same initial
weights, same data order: the step-K parent is the same network for every arm of a seed), at the same
sparsity and search settings; ``--rewind`` changes only what trains afterwards, not the mask, so runs
that differ only by it hold the same winner and count once. The dense network's ranking: the dense
run of the same seed, after training (its ``train/checkpoint.pt``), by BN scale |γ| (the mean over the
BNs that read a node, as ``fastweedout robustness`` removes them) and by the L1 norm of the filter that
produces it (the l1 pruning method's rule); its top nodes, as many as the winner keeps in each node
set, are compared with the winner. Chance: the expected Jaccard index of two independent uniformly
random subsets of those sizes (exact, hypergeometric).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import torch

from fastweedout.analysis.plots import new_figure, save_figure
from fastweedout.analysis.series import series_key
from fastweedout.analysis.stats import mean_ci
from fastweedout.config import RunConfig
from fastweedout.experiment import runs
from fastweedout.experiment.records import RunError
from fastweedout.experiment.robustness import gamma_scores, trained_network
from fastweedout.masks import Masks
from fastweedout.search.prune_init import node_scores


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def expected_jaccard(n: int, ka: int, kb: int) -> float:
    """E[|A ∩ B| / |A ∪ B|] for independent uniform subsets of sizes ka and kb of n items."""
    total = math.comb(n, kb)
    out = 0.0
    for i in range(max(0, ka + kb - n), min(ka, kb) + 1):
        p = math.comb(ka, i) * math.comb(n - ka, kb - i) / total
        u = ka + kb - i
        out += p * (i / u if u else 1.0)
    return out


def mean_overlap(a: dict, b: dict) -> float:
    return sum(jaccard(a[k], b[k]) for k in a) / len(a)


def chance(a: dict) -> float:
    """The expected overlap of a mask with an independent random mask of the same live counts."""
    return sum(expected_jaccard(m.numel(), int(m.sum()), int(m.sum())) for m in a.values()) / len(a)


def top_like(scores: dict, like: dict) -> dict:
    """Per node set, the top-scoring nodes, as many as ``like`` keeps live (exact ties: lower index first)."""
    out = {}
    for k, m in like.items():
        keep = torch.zeros_like(m)
        keep[torch.sort(-scores[k].double(), stable=True).indices[:int(m.sum())]] = True
        out[k] = keep
    return out


def _mask(run) -> dict | None:
    try:
        return Masks.load(os.path.join(run.path, runs.MASK_NAME)).member(0)
    except (OSError, ValueError, RuntimeError):
        return None


def dense_rankings(run) -> dict | None:
    """{"gamma": scores, "l1": scores} of a trained dense run (None without its trained weights)."""
    try:
        net = trained_network(run.path, RunConfig.from_dict(run.config))
    except (RunError, ValueError):
        return None
    return {"gamma": gamma_scores(net), "l1": node_scores("l1", net)}


def emergence(all_runs) -> list[dict]:
    """One row per (group, K): the winners' overlap with the winner at every other K and with the dense
    rankings, per seed. Groups: Weedout runs of one experiment, search setting and sparsity chosen at
    two or more K (0 included)."""
    groups: dict[tuple, dict[int, dict[int, object]]] = defaultdict(lambda: defaultdict(dict))
    dense = {}
    for r in all_runs:
        cfg = r.config
        if r.arm == "dense" and not cfg.get("pretrain_steps"):
            dense[(r.experiment, r.seed)] = r
        if r.arm == "weedout":
            key = (r.experiment, series_key(dict(cfg, pretrain_steps=0, rewind=False)), r.sparsity)
            groups[key][int(cfg.get("pretrain_steps") or 0)].setdefault(r.seed, r)
    rows = []
    rankings: dict = {}
    for (exp, series, eta), by_k in sorted(groups.items()):
        if len(by_k) < 2:
            continue
        masks = {k: {s: _mask(r) for s, r in seeds.items()} for k, seeds in by_k.items()}
        for k in sorted(by_k):
            row = dict(experiment=exp, series=series, sparsity=eta, k=k, seeds=sorted(by_k[k]), vs_k={}, chance=[],
                       vs_gamma=[], vs_l1=[])
            for s, m in masks[k].items():
                if m is None:
                    continue
                row["chance"].append(chance(m))
                for k2 in sorted(by_k):
                    other = masks[k2].get(s)
                    if k2 != k and other is not None:
                        row["vs_k"].setdefault(k2, []).append(mean_overlap(m, other))
                d = dense.get((exp, s))
                if d is not None:
                    if d.path not in rankings:
                        rankings[d.path] = dense_rankings(d)
                    if rankings[d.path] is not None:
                        for name in ("gamma", "l1"):
                            row[f"vs_{name}"].append(mean_overlap(m, top_like(rankings[d.path][name], m)))
            rows.append(row)
    return rows


def _cell(xs: list[float]) -> str:
    if not xs:
        return ""
    m, ci = mean_ci(xs)
    return f"{m:.3f}" + (f" ± {ci:.3f}" if math.isfinite(ci) else "") + f" (n={len(xs)})"


def emergence_table(rows: list[dict], exp: str, name) -> list[str]:
    mine = [r for r in rows if r["experiment"] == exp]
    if not mine:
        return []
    ks = sorted({r["k"] for r in mine})
    out = ["### Mask emergence: overlap of Weedout winners chosen after K dense steps", "",
           "Jaccard index of the live nodes, mean over node sets, then mean ± 95% interval over seeds (n). Columns "
           "K': the same seed's winner at K'. |γ| and L1: the trained dense network's top nodes, as many per node "
           "set as the winner keeps. Chance: two independent random masks with the same counts.", "",
           "| η | series | K | " + " | ".join(f"vs K'={k}" for k in ks)
           + " | vs dense \\|γ\\| | vs dense L1 | chance |",
           "|---:|---|---:|" + "---:|" * (len(ks) + 3)]
    for r in mine:
        cells = [_cell(r["vs_k"].get(k, [])) for k in ks]
        out.append(f"| {r['sparsity']:g} | {name(r['series'])} | {r['k']} | " + " | ".join(cells) +
                   f" | {_cell(r['vs_gamma'])} | {_cell(r['vs_l1'])} | {_cell(r['chance'])} |")
    return out


def plot_emergence(rows: list[dict], exp: str, path: str, name) -> bool:
    """Overlap against K: with the winner at the largest K, with the dense rankings, and chance."""
    mine = [r for r in rows if r["experiment"] == exp]
    if not mine:
        return False
    groups = defaultdict(list)
    for r in mine:
        groups[(r["series"], r["sparsity"])].append(r)
    fig, axes = new_figure(len(groups), w=5.0, h=4.0)
    for ax, ((series, eta), rs) in zip(axes[0], sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["k"])
        xs = [r["k"] for r in rs]
        last = xs[-1]
        # the four curves share their K values: a small sideways shift keeps their intervals apart
        dodge = 0.012 * max(xs[-1] - xs[0], 1)
        top = 0.0
        curves = ((lambda r, last=last: r["vs_k"].get(last, []), f"winner at K={last}", "o-"),
                  (lambda r: r["vs_gamma"], "trained dense |γ| ranking", "s--"),
                  (lambda r: r["vs_l1"], "trained dense L1 ranking", "^--"),
                  (lambda r: r["chance"], "chance (random masks)", ":"))
        for i, (key, lbl, fmt) in enumerate(curves):
            pts = [(x, mean_ci(key(r))) for x, r in zip(xs, rs) if key(r)]
            if pts:
                err = [p[1][1] if math.isfinite(p[1][1]) else 0.0 for p in pts]
                ax.errorbar([p[0] + (i - 1.5) * dodge for p in pts], [p[1][0] for p in pts], yerr=err, fmt=fmt,
                            capsize=3, label=lbl)
                top = max(top, *(p[1][0] + e for p, e in zip(pts, err)))
        ax.set_title(f"η={eta:g} {name(series)}")
        ax.set_xlabel("K: dense SGD steps before the search")
        ax.set_ylabel("Jaccard overlap of live nodes (mean over node sets)")
        # overlaps of sparse masks sit far below 1: a range set by the data, with room for the legend
        ax.set_ylim(0, min(1.02, max(top, 0.05) * 1.6))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left", ncols=2)
    return save_figure(fig, path)


__all__ = ["chance", "dense_rankings", "emergence", "emergence_table", "expected_jaccard", "jaccard",
           "mean_overlap", "plot_emergence", "top_like"]
