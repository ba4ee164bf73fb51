"""Tests 3 and 6 of README.md: are the sparse arms (test 6: SynFlow global) converged at 40 epochs?
For every arm and sparsity run in both this folder and ../fashion-mnist-30ep, test accuracy at 40
minus 30 epochs, paired by seed.
A pair counts only when both runs trained the same mask (the same seed draws the same initial
weights and mask at both budgets; checked here, not assumed). Writes ``budget_check.json`` beside
this file (atomically).

    PYTHONPATH=. python results/fashion-mnist-40ep/budget_check.py
"""

from __future__ import annotations

import math
import os

import torch

from fastweedout.analysis.report import collect
from fastweedout.analysis.stats import paired
from fastweedout.atomic import atomic_write_json

HERE = os.path.dirname(os.path.abspath(__file__))
SHORTER = os.path.join(HERE, "..", "fashion-mnist-30ep", "runs")
LONGER = os.path.join(HERE, "runs")
CONVERGED_BELOW = 0.3  # points: the gain under which an arm is read as converged (README, test 3)


def finite(x):  # None where a single pair leaves the interval or p undefined
    return x if math.isfinite(x) else None


def _mask(run) -> dict[str, torch.Tensor]:
    m = torch.load(os.path.join(run.path, "mask.pt"), map_location="cpu", weights_only=True)
    return m.get("masks", m)


def _same_mask(a, b) -> bool:
    ma, mb = _mask(a), _mask(b)
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def _by_condition(runs) -> dict[tuple, dict[int, object]]:
    out: dict[tuple, dict[int, object]] = {}
    for r in runs:
        if r.config.get("reinit") or r.config.get("shuffle"):
            continue  # tests 3 and 6 are about arms trained from their own weights and nodes
        out.setdefault((r.series, r.sparsity), {})[r.seed] = r
    return out


def main() -> None:
    short, long = _by_condition(collect(SHORTER).runs), _by_condition(collect(LONGER).runs)
    rows = []
    for key in sorted(set(short) & set(long)):
        seeds = sorted(s for s in set(short[key]) & set(long[key]) if _same_mask(short[key][s], long[key][s]))
        if not seeds:
            continue
        at = {s: 100 * long[key][s].final["test_acc"] for s in seeds}
        before = {s: 100 * short[key][s].final["test_acc"] for s in seeds}
        t = paired(at, before)
        rows.append(dict(series=key[0], sparsity=key[1], seeds=seeds, gain_points=t["diff"],
                         gain_ci95=finite(t["diff_ci"]), p=finite(t["p"]), n=t["n"],
                         converged=bool(t["n"] >= 2 and t["diff"] < CONVERGED_BELOW),
                         per_seed={str(s): round(at[s] - before[s], 2) for s in seeds}))
    atomic_write_json(os.path.join(HERE, "budget_check.json"), dict(
        test="test accuracy at 40 epochs minus 30 epochs, paired by seed, same mask and initial weights",
        converged_below_points=CONVERGED_BELOW, rows=rows))
    for r in rows:
        print(f"{r['series']:<24} eta {r['sparsity']:.1f}  n {r['n']}  gain {r['gain_points']:+.2f} "
              f"+- {r['gain_ci95'] or math.nan:.2f} points (p {r['p'] or math.nan:.2f})  per seed {r['per_seed']}")


if __name__ == "__main__":
    main()
