"""Tests 1 and 4 of README.md with the Holm families they were stated with. ``fastweedout report``
corrects over every comparison of a metric in the folder; the README stated smaller families before
the runs: test 1 over the core Weedout (−loss) − random rows at η .8 and .6, test 4 over the
Weedout-after-K-steps rows (K > 0, with or without ``--rewind``) run so far. The paired tests are the
report's own (``comparisons``); only the families differ. Writes ``stated_tests.json`` beside this
file (atomically).

    PYTHONPATH=. python results/fashion-mnist-40ep/stated_tests.py
"""

from __future__ import annotations

import math
import os

from fastweedout.analysis.report import collect, comparisons, conditions
from fastweedout.analysis.stats import holm
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


def main() -> None:
    rows = [r for r in comparisons(conditions(collect(os.path.join(HERE, "runs"))))
            if r["arm"] == "weedout" and r["against"] == "random" and "/loss/" in r["series"]  # the −loss arm
            and "/reinit" not in r["series"] and "/shuffled" not in r["series"]]
    out = {}
    for name, member in FAMILIES.items():
        fam = [r for r in rows if member(r)]
        adjusted = holm([r[f"p_{METRIC}"] for r in fam])
        out[name] = [dict(series=r["series"], control=r["control"], sparsity=r["sparsity"], pairs=r[f"n_{METRIC}"],
                          diff_points=100 * r[f"diff_{METRIC}"], ci95_points=_finite(100 * r[f"ci_{METRIC}"]),
                          p=_finite(r[f"p_{METRIC}"]), p_holm=_finite(p), family_size=sum(map(math.isfinite, adjusted)))
                     for r, p in zip(fam, adjusted)]
    atomic_write_json(os.path.join(HERE, "stated_tests.json"),
                      dict(metric="test accuracy after training, method minus random control, paired by seed",
                           families=out))
    for name, fam in out.items():
        print(name)
        for r in fam:
            print(f"  eta {r['sparsity']:.1f} {r['series']:<48} n {r['pairs']}  {r['diff_points']:+.2f} "
                  f"+- {r['ci95_points'] or math.nan:.2f} points  p {r['p'] or math.nan:.3f}  "
                  f"Holm {r['p_holm'] or math.nan:.3f} (of {r['family_size']})")


if __name__ == "__main__":
    main()
