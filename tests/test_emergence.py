"""Mask emergence: the overlap of Weedout winners chosen after K dense steps, with each other and with
the trained dense network's node rankings; the exact chance level; the report's table and figure."""

import itertools
import math
import os

import pytest
import torch

from fastweedout.analysis import emergence as E
from fastweedout.analysis import report
from fastweedout.config import DataConfig, ModelConfig, Runtime, SearchConfig, TrainConfig, make_run_config
from fastweedout.experiment import runs
from fastweedout.experiment.pipeline import execute_run
from fastweedout.masks import Masks

DATA = DataConfig("synthetic", val_size=64, synthetic=dict(train_size=192, test_size=64, image_size=12))
RT = Runtime(device="cpu", progress=False)


@pytest.mark.parametrize("n,ka,kb", [(5, 2, 3), (6, 3, 3), (4, 0, 2), (4, 4, 4), (7, 1, 6)])
def test_expected_jaccard_is_exact(n, ka, kb):
    pairs = list(itertools.product(itertools.combinations(range(n), ka), itertools.combinations(range(n), kb)))
    brute = sum(len(set(a) & set(b)) / len(set(a) | set(b)) if (a or b) else 1.0 for a, b in pairs) / len(pairs)
    assert E.expected_jaccard(n, ka, kb) == pytest.approx(brute, abs=1e-12)


def test_jaccard_and_top_like():
    a = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)
    assert E.jaccard(a, b) == pytest.approx(2 / 4) and E.jaccard(a, a) == 1.0
    assert E.jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
    top = E.top_like({"s": torch.tensor([0.1, 0.9, 0.5, 0.5, 0.0])}, {"s": a})
    assert top["s"].tolist() == [False, True, True, True, False]  # 3 live, the tie broken by the lower index
    assert E.mean_overlap({"s": a, "t": a}, {"s": b, "t": a}) == pytest.approx((0.5 + 1.0) / 2)


@pytest.fixture(scope="module")
def runs_k(tmp_path_factory):
    root = tmp_path_factory.mktemp("emergence")
    search = SearchConfig(population=4, generations=1, batch_size=32)
    train = TrainConfig(epochs=1, batch_size=64)
    common = dict(data=DATA, model=ModelConfig("wrn_10_1"), search=search, training=train)
    out = {}
    for seed in (0, 1):
        out[("dense", seed)] = execute_run(make_run_config("dense", 0.0, seed=seed, **common), root, RT)
        for k, rewind in ((0, False), (2, False), (2, True)):
            c = make_run_config("weedout", 0.5, seed=seed, pretrain_steps=k, rewind=rewind, **common)
            out[(k, rewind, seed)] = execute_run(c, root, RT)
    return root, out


def _winner(outcome):
    return Masks.load(os.path.join(outcome.path, runs.MASK_NAME)).member(0)


def test_overlaps_of_winners_and_dense_rankings(runs_k):
    root, out = runs_k
    col = report.collect(root)
    rows = E.emergence(col.runs)
    assert sorted(r["k"] for r in rows) == [0, 2]  # rewind holds the same winner: counted once
    r0 = next(r for r in rows if r["k"] == 0)
    assert r0["seeds"] == [0, 1]
    want = [E.mean_overlap(_winner(out[(0, False, s)]), _winner(out[(2, False, s)])) for s in (0, 1)]
    assert r0["vs_k"][2] == pytest.approx(want)
    assert E.mean_overlap(_winner(out[(2, False, 0)]), _winner(out[(2, True, 0)])) == 1.0
    assert len(r0["vs_gamma"]) == len(r0["vs_l1"]) == len(r0["chance"]) == 2
    assert all(0.0 <= v <= 1.0 for v in r0["vs_gamma"] + r0["vs_l1"] + r0["chance"])
    # the chance level is that of the winner's own live counts
    w = _winner(out[(0, False, 0)])
    assert r0["chance"][0] == pytest.approx(
        sum(E.expected_jaccard(m.numel(), int(m.sum()), int(m.sum())) for m in w.values()) / len(w))
    assert not math.isclose(r0["vs_gamma"][0], 1.0)  # a 1-epoch dense |γ| ranking is not the winner


def test_report_has_the_table_and_the_figure(runs_k):
    root, _ = runs_k
    rep = report.write_report(root)
    md = open(rep.paths["report.md"]).read()
    assert "### Mask emergence" in md and "vs K'=2" in md
    assert "emergence.png" in rep.paths and os.path.getsize(rep.paths["emergence.png"]) > 1000


def test_no_rows_without_two_k(tmp_path):
    assert E.emergence([]) == [] and E.emergence_table([], "x", str) == []
    assert E.plot_emergence([], "x", str(tmp_path / "e.png"), str) is False


def test_figure_range_is_set_by_the_data(tmp_path, monkeypatch):
    """Overlaps of sparse masks are small: the y range follows the data (not 0..1) and the curves that
    share a K are drawn side by side."""
    figs = []
    monkeypatch.setattr(E, "save_figure", lambda fig, path: figs.append(fig) or True)
    rows = [dict(experiment="x", series="weedout/layerwise/node", sparsity=0.8, k=k,
                 vs_k={1287: [0.1, 0.12, 0.11]} if k < 1287 else {}, vs_gamma=[0.08, 0.09, 0.1],
                 vs_l1=[0.09, 0.1, 0.11], chance=[0.116, 0.116, 0.116]) for k in (0, 429, 1287)]
    assert E.plot_emergence(rows, "x", str(tmp_path / "e.png"), str)
    ax = figs[0].axes[0]
    lo, hi = ax.get_ylim()
    assert lo == 0 and 0.15 < hi < 0.5
    xs = {round(float(x), 6) for line in ax.get_lines() for x in line.get_xdata()}
    assert len(xs) > 3  # four curves at three K values, shifted apart
