"""Tests 1, 4 and 5 of README.md with the Holm families they were stated with. ``fastweedout report``
corrects over every comparison of a metric in the folder; the README stated smaller families before
the runs: test 1 over the core Weedout (−loss) − random rows at η .8 and .6, test 4 over the
Weedout-after-K-steps rows (K > 0, with or without ``--rewind``) run so far, test 5 over its four
structure comparisons of SynFlow's global masks run so far. Tests 1 and 4 are the report's own rows
(``comparisons``); test 5's equal-compute member pairs two sparsities, which the report never does, so
its members are paired here with the report's ``paired``. Writes ``stated_tests.json`` beside this
file (atomically).

    PYTHONPATH=. python results/fashion-mnist-40ep/stated_tests.py
"""

from __future__ import annotations

import math
import os

from fastweedout.analysis.report import collect, comparisons, conditions
from fastweedout.analysis.stats import holm, paired
from fastweedout.atomic import atomic_write_json

HERE = os.path.dirname(os.path.abspath(__file__))
METRIC = "test_acc"


def _finite(x):
    return x if x is not None and math.isfinite(x) else None


def _pretrained(series: str) -> bool:
    return "/k" in series


FAMILIES = {  # name -> which "weedout against random" rows of the report belong to it
    "test 1: core, Holm over eta .8 and .6": lambda r: not _pretrained(r["series"]) and r["sparsity"] in (0.6, 0.8),
    "test 4: Weedout after K steps, Holm over the K rows run": lambda r: _pretrained(r["series"]),
}


SYNFLOW = ("synflow/global/node", 0.8)
TEST5 = {  # member -> (series, eta) minus (control, eta), paired by seed
    "(a) the method: SynFlow (global) - random (global)": (SYNFLOW, ("random/global/node", 0.8)),
    "(b) which nodes: SynFlow (global, --shuffle) - SynFlow (global)": (("synflow/global/node/shuffled", 0.8), SYNFLOW),
    "(c) which weights: SynFlow (global, --reinit) - SynFlow (global)": (("synflow/global/node/reinit", 0.8), SYNFLOW),
    "(d) equal compute: random (layerwise, eta .6) - SynFlow (global, eta .8)": (("random/layerwise/node", 0.6), SYNFLOW),
}


def _row(series, control, sparsity, t, p_holm, family_size) -> dict:
    return dict(series=series, control=control, sparsity=sparsity, pairs=t["n"], diff_points=100 * t["diff"],
                ci95_points=_finite(100 * t["diff_ci"]), p=_finite(t["p"]), p_holm=_finite(p_holm),
                family_size=family_size)


def test5(conds) -> list[dict]:
    index = {(c.series, c.sparsity): c for c in conds}
    tests = []
    for member, (a, b) in TEST5.items():
        if a in index and b in index:
            tests.append((member, a, b, paired(index[a].by_seed(METRIC), index[b].by_seed(METRIC))))
    adjusted = holm([t["p"] for *_, t in tests])
    size = sum(map(math.isfinite, adjusted))
    return [dict(_row(a[0], b[0], a[1], t, p, size), member=member, control_sparsity=b[1])
            for (member, a, b, t), p in zip(tests, adjusted)]


def main() -> None:
    conds = conditions(collect(os.path.join(HERE, "runs")))
    if len({c.experiment for c in conds}) != 1:  # test 5 pairs series by name across sparsities
        raise SystemExit("runs/ must hold one experiment (data, model, training)")
    rows = [r for r in comparisons(conds)
            if r["arm"] == "weedout" and r["against"] == "random" and "/loss/" in r["series"]  # the −loss arm
            and "/reinit" not in r["series"] and "/shuffled" not in r["series"]]
    out = {}
    for name, member in FAMILIES.items():
        fam = [r for r in rows if member(r)]
        adjusted = holm([r[f"p_{METRIC}"] for r in fam])
        size = sum(map(math.isfinite, adjusted))
        out[name] = [_row(r["series"], r["control"], r["sparsity"],
                          dict(n=r[f"n_{METRIC}"], diff=r[f"diff_{METRIC}"], diff_ci=r[f"ci_{METRIC}"], p=r[f"p_{METRIC}"]),
                          p, size) for r, p in zip(fam, adjusted)]
    out["test 5: structure of SynFlow's global masks, Holm over the members run"] = test5(conds)
    atomic_write_json(os.path.join(HERE, "stated_tests.json"),
                      dict(metric="test accuracy after training, series minus control, paired by seed",
                           families=out))
    for name, fam in out.items():
        print(name)
        for r in fam:
            print(f"  eta {r['sparsity']:.1f} {r['series']:<48} - {r['control']:<28} n {r['pairs']}  {r['diff_points']:+.2f} "
                  f"+- {r['ci95_points'] or math.nan:.2f} points  p {r['p'] or math.nan:.3g}  "
                  f"Holm {r['p_holm'] or math.nan:.3g} (of {r['family_size']})")


if __name__ == "__main__":
    main()
