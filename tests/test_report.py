"""The report's statistics against hand-computed values, its files, and what it leaves out."""

import csv
import math
import os
import shutil

import pytest
from scipy import special

from fastweedout.analysis import plots, report, stats
from fastweedout.config import DataConfig, ModelConfig, SearchConfig, TrainConfig, make_run_config
from fastweedout.experiment import runs
from fastweedout.experiment.records import RunError
from fastweedout.experiment.runs import RunDir

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student t quantiles from a table

DATA = DataConfig("synthetic")


def fake_run(root, arm, eta, seed, test, train, init_loss, init_acc, search=(0.0, 0.0), training=(10.0, 1e9),
             done=True, epochs=2, population=100, model="wrn_10_1", granularity="node", pretrain_steps=0, rewind=False):
    cfg = make_run_config(arm, eta, data=DATA, model=ModelConfig(model), seed=seed, granularity=granularity,
                          search=SearchConfig(population=population), training=TrainConfig(epochs=epochs),
                          pretrain_steps=pretrain_steps, rewind=rewind)
    rd = RunDir.open(root, cfg.name, cfg)
    recs = [dict(type="phase", phase="search", wall_s=search[0], flops=search[1], elite_index=[3, 0, 0, 7, 0],
                 best_fitness=[-2.3, -2.2, -2.2, -2.1, -2.1], mean_fitness=[-2.4] * 5),
            dict(type="mask", init_val_loss=init_loss, init_val_acc=init_acc)]
    recs += [dict(type="epoch", epoch=e, train_acc=train * e / epochs, test_acc=test * e / epochs)
             for e in range(1, epochs + 1)]
    recs += [dict(type="phase", phase="training", wall_s=training[0], flops=training[1]),
             dict(type="phase", phase="evaluation", wall_s=1.0, flops=1e8),
             dict(type="final", train_acc=train, test_acc=test)]
    rd.upsert(*recs)
    if done:
        rd.mark_done({})
    return rd


W = dict(test=[0.80, 0.82, 0.85], train=[0.90, 0.91, 0.93], loss=[2.20, 2.21, 2.19], acc=[0.12, 0.14, 0.13])
R = dict(test=[0.78, 0.80, 0.79], train=[0.89, 0.92, 0.90], loss=[2.30, 2.28, 2.33], acc=[0.10, 0.09, 0.11])


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "res"
    for s in range(3):
        fake_run(root, "dense", 0.0, s, 0.9 + 0.01 * s, 0.95, 2.3, 0.1)
        fake_run(root, "weedout", 0.5, s, W["test"][s], W["train"][s], W["loss"][s], W["acc"][s],
                 search=(5.0, 3e8), training=(4.0, 6e8))
        fake_run(root, "random", 0.5, s, R["test"][s], R["train"][s], R["loss"][s], R["acc"][s],
                 training=(4.0, 6e8))
    fake_run(root, "weedout", 0.8, 0, 0.7, 0.75, 2.2, 0.1, search=(1.0, 1e8))  # n = 1
    fake_run(root, "random", 0.8, 0, 0.69, 0.74, 2.3, 0.1)
    fake_run(root, "random", 0.8, 1, 0.1, 0.1, 2.3, 0.1, done=False)  # interrupted: left out
    return root


def hand_mean_ci(xs):
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T_975[n - 1] * sd / math.sqrt(n)


def hand_welch(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    p = special.betainc(df / 2, 0.5, df / (df + t * t))  # two-sided p of Student t, via the incomplete beta
    return t, p, df


def hand_paired(a, b):
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    t = m / (sd / math.sqrt(n))
    p = special.betainc((n - 1) / 2, 0.5, (n - 1) / (n - 1 + t * t))
    return m, T_975[n - 1] * sd / math.sqrt(n), t, p


def test_statistics_against_hand_values():
    m, ci = stats.mean_ci(W["test"])
    hm, hci = hand_mean_ci(W["test"])
    assert m == pytest.approx(0.8233333333333334, abs=1e-12) and m == pytest.approx(hm)
    assert ci == pytest.approx(hci, rel=1e-9) and ci == pytest.approx(0.062516, abs=1e-5)
    t, p, df = stats.welch(W["test"], R["test"])
    ht, hp, hdf = hand_welch(W["test"], R["test"])
    assert (t, p, df) == pytest.approx((ht, hp, hdf), rel=1e-9)
    assert stats.mean_ci([0.5]) == (0.5, pytest.approx(math.nan, nan_ok=True))
    assert all(math.isnan(v) for v in stats.welch([0.5], [0.4, 0.6]))
    assert all(math.isnan(v) for v in stats.welch([0.5, 0.5], [0.4, 0.4]))  # no variance: undefined
    r = stats.paired(dict(enumerate(W["test"])), dict(enumerate(R["test"])))
    hm, hci, ht, hp = hand_paired(W["test"], R["test"])
    assert (r["diff"], r["diff_ci"], r["t"], r["p"], r["n"]) == pytest.approx((hm, hci, ht, hp, 3), rel=1e-9)
    only = stats.paired({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0, 2: 4.0})  # pairs by key, unpaired ones dropped
    assert only["n"] == 2 and only["diff"] == pytest.approx(0.75)
    assert math.isnan(stats.paired({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0})["p"])  # equal differences: undefined
    # Holm: sorted p * (m - rank), running maximum, capped at 1; NaN ignored
    assert stats.holm([0.01, 0.04, 0.03, math.nan, 0.5]) == pytest.approx(
        [0.04, 0.09, 0.09, math.nan, 0.5], nan_ok=True)


def test_report_files_and_numbers(results, tmp_path):
    rep = report.write_report(results)
    for name in ("report.md", "summary.csv", "figure2.png", "curves.png", "search.png", "differences.png"):
        assert os.path.getsize(rep.paths[name]) > 0
    for png in ("figure2.png", "curves.png", "search.png", "differences.png"):
        assert open(rep.paths[png], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "axes.png" not in rep.paths  # no search-study axis varies here
    # the paired-differences figure needs a random control; with none there is no figure
    assert not plots.plot_differences([c for c in rep.comparisons if c["against"] != "random"], rep.primary,
                                      str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()
    assert not [n for n in os.listdir(results) if n.startswith(".") and n.endswith(".tmp")]
    assert len(rep.collection.runs) == 11 and len(rep.collection.incomplete) == 1

    rows = list(csv.DictReader(open(rep.paths["summary.csv"])))
    by = {(r["arm"], float(r["sparsity"])): r for r in rows}
    assert set(by) == {("dense", 0.0), ("weedout", 0.5), ("random", 0.5), ("weedout", 0.8), ("random", 0.8)}
    w = by[("weedout", 0.5)]
    for key, vals in (("test_acc", W["test"]), ("train_acc", W["train"]), ("init_val_loss", W["loss"])):
        m, ci = hand_mean_ci(vals)
        assert float(w[f"{key}_mean"]) == pytest.approx(m, rel=1e-5)
        assert float(w[f"{key}_ci95"]) == pytest.approx(ci, rel=1e-5)
    ps = {}
    for key in ("test_acc", "train_acc", "init_val_loss", "init_val_acc"):
        name = {"test_acc": "test", "train_acc": "train", "init_val_loss": "loss", "init_val_acc": "acc"}[key]
        d, ci, t, p = hand_paired(W[name], R[name])
        assert float(w[f"paired_diff_{key}"]) == pytest.approx(d, rel=1e-5, abs=1e-9)
        assert float(w[f"paired_ci_{key}"]) == pytest.approx(ci, rel=1e-5)
        assert float(w[f"paired_p_{key}"]) == pytest.approx(p, rel=1e-5)
        ps[key] = p
    # Holm over the comparisons of a metric: eta 0.8 has one pair only (p undefined), so one test each
    assert float(w["paired_p_holm_test_acc"]) == pytest.approx(ps["test_acc"], rel=1e-5)
    assert w["control"] == "random/layerwise/node" and by[("random", 0.5)]["paired_p_test_acc"] == ""
    assert int(w["n"]) == 3 and w["seeds"] == "0 1 2"
    assert float(w["elite_wins"]) == pytest.approx(0.75)  # generations 2..5: the elite (index 0) won 3 of 4
    # compute: search vs training
    assert float(w["search_flops_mean"]) == 3e8 and float(w["training_flops_mean"]) == 6e8
    assert float(w["search_share_flops"]) == pytest.approx(1 / 3)
    assert float(w["search_share_wall"]) == pytest.approx(5 / 9)
    assert float(by[("random", 0.5)]["search_share_flops"]) == 0
    # n = 1: a mean, no interval, no test
    w8 = by[("weedout", 0.8)]
    assert float(w8["test_acc_mean"]) == pytest.approx(0.7)
    assert w8["test_acc_ci95"] == "" and w8["paired_p_test_acc"] == ""

    md = open(rep.paths["report.md"]).read()
    m, ci = hand_mean_ci(W["test"])
    assert f"{100 * m:.2f} ± {100 * ci:.2f}" in md
    assert "figure2.png" in md and "1 incomplete" in md and "paired by seed" in md
    assert "dense → η=0.8" in md and "about 15 points" in md  # the headline, beside the paper's drop
    assert "75%" in md  # the elite's wins

    # a second report over the same results gives the same tables
    again = report.write_report(results, tmp_path / "elsewhere")
    assert open(again.paths["summary.csv"]).read() == open(rep.paths["summary.csv"]).read()


def test_unreadable_records_are_skipped_with_a_warning_not_fatal(results):
    victim = fake_run(results, "random", 0.5, 3, 0.5, 0.5, 2.3, 0.1)
    with open(victim.results_path, "a") as f:
        f.write('{"type": "ep')
    with pytest.warns(RuntimeWarning, match=os.path.basename(victim.path)):
        rep = report.write_report(results)
    assert rep.collection.unreadable == [victim.path] and len(rep.collection.runs) == 11
    assert "unreadable records" in open(rep.paths["report.md"]).read()


def test_axes_figure_for_a_population_study(tmp_path):
    root = tmp_path / "res"
    for s in range(2):
        fake_run(root, "random", 0.5, s, 0.8, 0.8, 2.3, 0.1)
        for pop, bump in ((10, 0.0), (100, 0.01)):
            fake_run(root, "weedout", 0.5, s, 0.8 + bump + 0.01 * s, 0.8, 2.2 - bump, 0.1, population=pop)
    rep = report.write_report(root)
    assert "axes.png" in rep.paths and open(rep.paths["axes.png"], "rb").read(4) == b"\x89PNG"
    series = {c.series for c in rep.conditions}
    assert {s.split("/")[3] for s in series if s.startswith("weedout")} == {"P10xG5", "P100xG5"}


def test_weight_level_masks_are_compared_with_node_level_ones(tmp_path):
    root = tmp_path / "res"
    node, weight = [0.80, 0.81, 0.83], [0.84, 0.86, 0.86]
    for s in range(3):
        for gran, acc in (("node", node), ("weight", weight)):
            fake_run(root, "random", 0.5, s, acc[s], 0.8, 2.3, 0.1, granularity=gran)
            fake_run(root, "weedout", 0.5, s, acc[s] + 0.01, 0.8, 2.2, 0.1, granularity=gran)
    rep = report.write_report(root)
    vs_node = {r["series"]: r for r in rep.comparisons if r["against"] == "node"}
    assert set(vs_node) == {"random/layerwise/weight", "weedout/layerwise/weight/P100xG5/loss/batch/random"}
    d, _, _, p = hand_paired(weight, node)
    assert vs_node["random/layerwise/weight"]["diff_test_acc"] == pytest.approx(d)
    assert vs_node["random/layerwise/weight"]["p_test_acc"] == pytest.approx(p)
    assert vs_node["random/layerwise/weight"]["control"] == "random/layerwise/node"
    # the weight-level Weedout runs still have their own random control, of weight-level masks
    ctrl = {r["series"]: r["control"] for r in rep.comparisons if r["against"] == "random"}
    assert ctrl["weedout/layerwise/weight/P100xG5/loss/batch/random"] == "random/layerwise/weight"
    rows = {r["series"]: r for r in csv.DictReader(open(rep.paths["summary.csv"]))}
    assert float(rows["random/layerwise/weight"]["vs_node_diff_test_acc"]) == pytest.approx(d, rel=1e-5)
    assert rows["random/layerwise/node"]["vs_node_diff_test_acc"] == ""
    md = open(rep.paths["report.md"]).read()
    assert "Weight-level against node-level masks" in md
    # tables name a series by what tells it apart; the full keys stay in summary.csv
    assert "| 0.5 | weedout (weight) | 3 |" in md and "/P100xG5/" not in md


def test_a_rewound_search_is_paired_with_the_random_run_trained_alike(tmp_path):
    """After training: the random run without pretraining (the same initial weights); before training: the
    random mask scored on the same step-K parent."""
    root = tmp_path / "res"
    rewound, plain, parent = [0.80, 0.83, 0.82], [0.79, 0.80, 0.80], [0.70, 0.71, 0.75]
    loss_w, loss_plain, loss_parent = [1.0, 1.1, 1.05], [2.3, 2.31, 2.29], [2.6, 2.5, 2.7]
    for s in range(3):
        fake_run(root, "weedout", 0.5, s, rewound[s], 0.8, loss_w[s], 0.5, pretrain_steps=7, rewind=True)
        fake_run(root, "random", 0.5, s, plain[s], 0.8, loss_plain[s], 0.1)
        fake_run(root, "random", 0.5, s, parent[s], 0.8, loss_parent[s], 0.1, pretrain_steps=7)
    rep = report.write_report(root)
    row = next(r for r in rep.comparisons if r["series"].startswith("weedout") and r["against"] == "random")
    assert row["control"] == "random/layerwise/node" and row["init_control"] == "random/layerwise/node/k7"
    assert row["diff_test_acc"] == pytest.approx(hand_paired(rewound, plain)[0])
    assert row["diff_init_val_loss"] == pytest.approx(hand_paired(loss_w, loss_parent)[0])
    assert "before training against random (k7)" in open(rep.paths["report.md"]).read()
    # without the step-K random runs there is no before-training comparison, rather than a wrong one
    for s in range(3):
        cfg = make_run_config("random", 0.5, data=DATA, model=ModelConfig("wrn_10_1"), seed=s, pretrain_steps=7,
                              training=TrainConfig(epochs=2))
        shutil.rmtree(os.path.join(root, runs.run_dir_name(cfg.name, cfg.to_dict())))
    row = next(r for r in report.write_report(root).comparisons if r["series"].startswith("weedout"))
    assert row["init_control"] == "" and math.isnan(row["diff_init_val_loss"])
    assert row["diff_test_acc"] == pytest.approx(hand_paired(rewound, plain)[0])


def test_report_errors(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        report.write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no finished"):
        report.write_report(tmp_path / "empty")
    rd = fake_run(tmp_path / "bad", "dense", 0.0, 0, 0.9, 0.9, 2.3, 0.1)
    cfgp = os.path.join(rd.path, runs.CONFIG_NAME)
    with open(cfgp) as f:
        text = f.read()
    with open(cfgp, "w") as f:
        f.write(text.replace('"seed": 0', '"seed": 5'))
    with pytest.raises(RunError, match="hash"):
        report.write_report(tmp_path / "bad")


def test_figure_labels_name_what_tells_series_apart():
    from fastweedout.analysis.plots import label, style

    a, b = "weedout/layerwise/node/P100xG5/loss/batch/random", "weedout/layerwise/node/P100xG5/accuracy/batch/random"
    k = "random/layerwise/node/k5"
    every = {a, b, "random/layerwise/node", k}
    assert label(a, every) == "weedout (loss)" and label(b, every) == "weedout (accuracy)"
    assert label("random/layerwise/node", every) == "random" and label(k, every) == "random (k5)"
    assert label(a, {a, "random/layerwise/node"}) == "weedout"
    assert style(a, every)[0] == style(b, every)[0] and style(a, every)[1] != style(b, every)[1]


def test_core_series_and_the_split_figure(tmp_path, monkeypatch):
    assert plots.is_core("weedout/layerwise/node/P100xG5/loss/batch/elitism")
    assert plots.is_core("random/layerwise/node")
    for extra in ("random/global/node", "weedout/layerwise/node/P100xG5/loss/batch/elitism/k200",
                  "random/layerwise/node/reinit", "synflow/layerwise/node", "weedout/layerwise/weight/P10xG1/loss/"
                  "batch/elitism", "weedout/layerwise/node/P10xG1/loss/batch/elitism/m3"):
        assert not plots.is_core(extra), extra
    # figure 2 holds the core series only; the others get their own figure, absent when there are none
    dense = report.Condition("e", "dense", "dense", 0.0, [])
    core = report.Condition("e", "random/layerwise/node", "random", 0.8, [])
    other = report.Condition("e", "synflow/layerwise/node", "synflow", 0.8, [])
    assert not plots.plot_figure2_extras([dense, core], "e", str(tmp_path / "x.png"))
    drawn = []
    monkeypatch.setattr(plots, "_figure2", lambda conds, exp, path, keep, title: drawn.append(
        [c.series for c in conds if c.arm != "dense" and keep(c.series)]))
    plots.plot_figure2([dense, core, other], "e", "a.png")
    plots.plot_figure2_extras([dense, core, other], "e", "b.png")
    assert drawn == [["random/layerwise/node"], ["synflow/layerwise/node"]]
