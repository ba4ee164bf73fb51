"""Convergence metrics: epochs, steps and FLOPs to 99% of the dense parent's and the run's own final
test accuracy, the area under the curve, and their paired tests in the report."""

import csv
import math

import pytest
from scipy import special

from fastweedout.analysis import convergence as C
from fastweedout.analysis import report
from fastweedout.config import DataConfig, ModelConfig, SearchConfig, TrainConfig, make_run_config
from fastweedout.experiment.runs import RunDir

BATCH, EPOCHS, IMAGES_PER_EPOCH, FLOPS_PER_EPOCH = 64, 4, 320, 2e12


def run_with_curve(root, arm, eta, seed, curve):
    cfg = make_run_config(arm, eta, data=DataConfig("synthetic"), model=ModelConfig("wrn_10_1"), seed=seed,
                          search=SearchConfig(population=10), training=TrainConfig(epochs=EPOCHS, batch_size=BATCH))
    rd = RunDir.open(root, cfg.name, cfg)
    rd.upsert(dict(type="mask", init_val_loss=2.3, init_val_acc=0.1),
              *[dict(type="epoch", epoch=e, test_acc=a, train_acc=a) for e, a in enumerate(curve, 1)],
              dict(type="phase", phase="training", wall_s=1.0, flops=FLOPS_PER_EPOCH * EPOCHS,
                   images=IMAGES_PER_EPOCH * EPOCHS),
              dict(type="final", train_acc=curve[-1], test_acc=curve[-1]))
    rd.mark_done({})


def test_per_run_metrics_by_hand():
    epochs = [dict(epoch=e, test_acc=a) for e, a in zip((1, 2, 3, 4), (0.5, 0.8, 0.89, 0.90))]
    phase = dict(images=IMAGES_PER_EPOCH * EPOCHS, flops=FLOPS_PER_EPOCH * EPOCHS)
    m = C.convergence(epochs, phase, BATCH, 0.90, 0.92)
    # 99% of own final 0.90 = 0.891: epoch 4 (0.89 is below); 99% of dense 0.92 = 0.9108: never
    assert m["epochs_to_own99"] == 4 and m["steps_to_own99"] == 4 * 5 and m["tflops_to_own99"] == pytest.approx(8.0)
    assert m["epochs_to_dense99"] is None and m["steps_to_dense99"] is None and m["tflops_to_dense99"] is None
    assert m["test_acc_auc"] == pytest.approx((0.5 + 0.8 + 0.89 + 0.90) / 4)
    m = C.convergence(epochs, phase, BATCH, 0.90, 0.85)  # 0.8415: reached at epoch 3
    assert m["epochs_to_dense99"] == 3 and m["steps_to_dense99"] == 15
    assert C.first_epoch_reaching(list(reversed(epochs)), 0.79) == 2  # order of the records does not matter
    assert C.per_epoch_cost(dict(images=330, flops=None), 1, 64) == (6, None)  # a last partial batch is a step
    assert C.convergence([], {}, BATCH, None, None)["test_acc_auc"] is None


def test_report_pairs_convergence_by_seed(tmp_path):
    root = tmp_path / "res"
    dense = (0.80, 0.88, 0.90, 0.91)
    fast = {0: (0.85, 0.90, 0.905, 0.91), 1: (0.80, 0.90, 0.91, 0.91), 2: (0.70, 0.85, 0.90, 0.91)}
    slow = {0: (0.50, 0.70, 0.85, 0.90), 1: (0.60, 0.80, 0.89, 0.905), 2: (0.70, 0.80, 0.87, 0.90)}
    for s in range(3):
        run_with_curve(root, "dense", 0.0, s, dense)
        run_with_curve(root, "weedout", 0.5, s, fast[s])
        run_with_curve(root, "random", 0.5, s, slow[s])
    rep = report.write_report(root)
    runs_ = {(r.arm, r.seed): r for r in rep.collection.runs}
    # the dense parent's final is 0.91 -> target 0.9009; own target 0.99 * final
    # weedout: 0.905 at epoch 3 (seed 0), 0.91 at 3 (seed 1), 0.90 < 0.9009 until epoch 4 (seed 2)
    assert [runs_[("weedout", s)].convergence["epochs_to_dense99"] for s in range(3)] == [3, 3, 4]
    assert [runs_[("random", s)].convergence["epochs_to_dense99"] for s in range(3)] == [None, 4, None]
    assert [runs_[("random", s)].convergence["epochs_to_own99"] for s in range(3)] == [4, 4, 4]
    row = next(r for r in rep.comparisons if r["arm"] == "weedout")
    d = [3 - 4, 3 - 4, 4 - 4]  # epochs to own 99%: weedout (3, 3, 4) minus random (4, 4, 4)
    assert [runs_[("weedout", s)].convergence["epochs_to_own99"] for s in range(3)] == [3, 3, 4]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    assert row["diff_epochs_to_own99"] == pytest.approx(mean) and row["n_epochs_to_own99"] == 3
    assert row["p_epochs_to_own99"] == pytest.approx(special.betainc(1.0, 0.5, 2 / (2 + t * t)))
    assert row["n_epochs_to_dense99"] == 1 and math.isnan(row["p_epochs_to_dense99"])  # one pair both reached
    auc = [sum(fast[s]) / 4 - sum(slow[s]) / 4 for s in range(3)]
    assert row["diff_test_acc_auc"] == pytest.approx(sum(auc) / 3)
    assert row["p_holm_test_acc_auc"] == pytest.approx(row["p_test_acc_auc"])  # a family of one comparison
    csv_rows = {r["arm"]: r for r in csv.DictReader(open(rep.paths["summary.csv"]))}
    assert csv_rows["random"]["epochs_to_dense99_reached"] == "1"
    assert float(csv_rows["weedout"]["paired_diff_epochs_to_own99"]) == pytest.approx(mean)
    md = open(rep.paths["report.md"]).read()
    assert "### Convergence" in md and "4.00 ± n/a (1/3)" in md


def test_no_dense_parent_is_not_a_target_missed(tmp_path):
    root = tmp_path / "res"
    for s in range(2):
        run_with_curve(root, "weedout", 0.5, s, (0.5, 0.8, 0.89, 0.90))
        run_with_curve(root, "random", 0.5, s, (0.5, 0.7, 0.85, 0.90))
    md = open(report.write_report(root).paths["report.md"]).read()
    assert "no dense parent" in md and "not reached (0/2)" not in md
    run_with_curve(root, "dense", 0.0, 0, (0.99, 0.99, 0.99, 0.99))  # a parent no sparse run reaches
    md = open(report.write_report(root).paths["report.md"]).read()
    assert "not reached (0/2)" in md
