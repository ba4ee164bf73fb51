"""Robustness to further pruning after training: nodes removed from a finished run's trained network,
without fine-tuning; robustness.json written atomically and resumed; the CLI and the report's curves."""

import json
import os

import pytest
import torch

from fastweedout.cli import main
from fastweedout.config import DataConfig, ModelConfig, Runtime, TrainConfig, make_run_config
from fastweedout.experiment import robustness as R
from fastweedout.experiment.inputs import load_data
from fastweedout.experiment.pipeline import execute_run
from fastweedout.masks import round_half_up
from fastweedout.model.wrn import WideResNet

DATA = DataConfig("synthetic", val_size=64, synthetic=dict(train_size=192, test_size=64, image_size=12))
RT = Runtime(device="cpu", progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("rob")
    outs = [execute_run(make_run_config(arm, eta, data=DATA, model=ModelConfig("wrn_10_2"), seed=0,
                                        training=TrainConfig(epochs=2, batch_size=64)), root, RT)
            for arm, eta in (("dense", 0.0), ("random", 0.5))]
    return root, outs


def test_the_trained_network_is_rebuilt_and_measured(finished):
    root, (dense, rand) = finished
    data = load_data(DATA)
    res = R.measure_run(rand.path, data, fractions=(0.3, 0.9))
    # the network as trained: its test accuracy is the run's final one
    assert res["intact"]["test_acc"] == pytest.approx(rand.summary["final"]["test_acc"], abs=1e-9)
    net = R.trained_network(rand.path, rand.config)
    recs = [json.loads(line) for line in open(os.path.join(rand.path, "results.jsonl"))]
    live = next(r["live"] for r in recs if r["type"] == "mask")  # the live nodes of the mask it trained
    assert dict(net.node_layers()) == res["live"] == live and sum(live.values()) < 16 + 32 + 32 + 64 * 2 + 128 * 2
    for p in res["points"]:
        removed = sum(min(round_half_up(p["fraction"] * w), w - 1) for w in res["live"].values())
        assert p["removed"] == removed and p["live"] == sum(res["live"].values()) - removed
    assert {(p["method"], p["fraction"]) for p in res["points"]} == {(m, f) for m in R.METHODS for f in (0.3, 0.9)}
    assert json.load(open(os.path.join(rand.path, R.ROBUSTNESS_NAME))) == res


def test_removal_orders():
    net = WideResNet(10, 1, num_classes=10, in_channels=1)
    with torch.no_grad():
        net.stage2[0].bn2.weight.copy_(torch.linspace(1, -0.1, 32))  # |γ| smallest at index 30 (|-0.0645|)
    order = R.removal_orders(net, "bn_gamma", 0)
    g = R.gamma_scores(net)["stage2.block0"]
    assert int(order["stage2.block0"][0]) == int(g.argmin()) and torch.equal(g, torch.linspace(1, -0.1, 32).abs())
    m = R.further_mask(net, order, 0.25)
    assert int((~m["stage2.block0"]).sum()) == 8 and not m["stage2.block0"][order["stage2.block0"][:8]].any()
    assert int(R.further_mask(net, order, 0.99)["stage1"].sum()) == 1  # never the last node
    a, b = R.removal_orders(net, "random", 1), R.removal_orders(net, "random", 1)
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a["stage3"].tolist()) == list(range(64))
    with pytest.raises(ValueError, match="unknown removal"):
        R.removal_orders(net, "l2", 0)


def test_resumes_keeping_measured_points(finished):
    root, (dense, _) = finished
    data = load_data(DATA)
    path = os.path.join(dense.path, R.ROBUSTNESS_NAME)
    R.measure_run(dense.path, data, fractions=(0.5,), methods=("random",))
    d = json.load(open(path))
    d["points"][0]["test_acc"] = -1.0  # a sentinel: kept if not recomputed
    with open(path, "w") as f:
        json.dump(d, f)
    res = R.measure_run(dense.path, data, fractions=(0.5, 0.7), methods=("random",))
    accs = {p["fraction"]: p["test_acc"] for p in res["points"]}
    assert accs[0.5] == -1.0 and 0.0 <= accs[0.7] <= 1.0
    assert not [n for n in os.listdir(dense.path) if ".tmp" in n]


def test_cli_and_skips(finished, tmp_path, capsys):
    root, (dense, rand) = finished
    assert main(["robustness", str(root), "--device", "cpu", "--fractions", "0.2", "--methods", "bn_gamma",
                 "--test-images", "32"]) == 0
    out = capsys.readouterr().out
    assert "2 runs measured, 0 skipped" in out
    res = R.read_robustness(rand.path)
    assert res["test_images"] == 32 and [p["fraction"] for p in res["points"]] == [0.2]  # other images: redone
    assert main(["robustness", str(root), "--fractions", "1.5"]) == 2
    os.rename(os.path.join(rand.path, "train"), os.path.join(rand.path, "train.away"))
    try:
        assert main(["robustness", str(root), "--device", "cpu", "--fractions", "0.2", "--methods", "random"]) == 0
        assert "no trained weights" in capsys.readouterr().out
    finally:
        os.rename(os.path.join(rand.path, "train.away"), os.path.join(rand.path, "train"))


def test_report_draws_the_curves(finished, tmp_path):
    from fastweedout.analysis import report

    root, (dense, rand) = finished
    data = load_data(DATA)
    for o in (dense, rand):
        R.measure_run(o.path, data, fractions=(0.2, 0.5))
    rep = report.write_report(root, tmp_path)
    assert open(rep.paths["robustness.png"], "rb").read(4) == b"\x89PNG"
    md = open(rep.paths["report.md"]).read()
    res = R.read_robustness(rand.path)
    acc = next(p["test_acc"] for p in res["points"] if p["method"] == "bn_gamma" and p["fraction"] == 0.5)
    row = next(line for line in md.splitlines() if line.startswith("| 0.5 | random | smallest BN \\|γ\\| |"))
    assert f"{100 * acc:.2f} ± n/a" in row and "### Robustness to further pruning" in md


def test_bn_recalibration_recomputes_the_statistics_and_only_them(finished):
    from fastweedout.data.loader import DeviceLoader

    root, (dense, rand) = finished
    data = load_data(DATA)
    net = R.trained_network(rand.path, rand.config)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    loader = DeviceLoader(data.train, len(data.train), mean=data.mean, std=data.std)  # one batch: exact
    x = next(iter(loader))[0]
    with torch.no_grad():
        stem = net.stem(x)
    R.recalibrate_bn(net, loader)
    assert not net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    bn = net.stage1[0].bn1  # reads the stem's output
    torch.testing.assert_close(bn.running_mean, stem.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, stem.var((0, 2, 3), correction=1), rtol=1e-4, atol=1e-6)
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_recalibrated_curves_are_measured_resumed_and_reported(finished, tmp_path, capsys):
    from fastweedout.analysis import report
    from fastweedout.data.loader import DeviceLoader
    from fastweedout.training.loop import evaluate

    root, (dense, rand) = finished
    data = load_data(DATA)
    res = R.measure_run(rand.path, data, fractions=(0.5,), methods=("random",), recalibrate=100)
    pts = {(p["method"], p.get("recalibration_images", 0)): p for p in res["points"]
           if p["fraction"] == 0.5 and p["method"] == "random"}
    assert set(pts) == {("random", 0), ("random", 100)}
    # the recalibrated point is the pruned network evaluated after recalibration on the recorded images
    net = R.trained_network(rand.path, rand.config)
    small = net.prune(R.further_mask(net, R.removal_orders(net, "random", res["seed"]), 0.5)).eval()
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(res["seed"]))[:100].sort().values
    R.recalibrate_bn(small, DeviceLoader(data.train.subset(pick), rand.config.training.eval_batch_size,
                                         mean=data.mean, std=data.std))
    test = DeviceLoader(data.test, rand.config.training.eval_batch_size, mean=data.mean, std=data.std)
    assert pts[("random", 100)]["test_acc"] == pytest.approx(evaluate(small, test)[1], abs=1e-12)
    assert set(R.curves([res])) >= {"random", "random+bn_recal"}
    with pytest.raises(ValueError, match="recalibrate"):
        R.measure_run(rand.path, data, recalibrate=-1)
    assert main(["robustness", str(root), "--recalibrate", "-5"]) == 2
    assert main(["robustness", str(root), "--device", "cpu", "--fractions", "0.5", "--methods", "random",
                 "--recalibrate", "100"]) == 0
    assert R.read_robustness(rand.path)["points"] == res["points"]  # nothing new to measure: kept as it was
    md = open(report.write_report(root, tmp_path).paths["report.md"]).read()
    assert "| 0.5 | random | random nodes, BN recalibrated |" in md
