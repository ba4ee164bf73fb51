"""Structure alone: --reinit (the chosen mask from fresh weights) and --shuffle (its per-set counts,
random nodes); both off by default, leaving every earlier config's hash as it was."""

import json
import os

import pytest
import torch

from fastweedout.cli import build_parser
from fastweedout.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    Runtime,
    SearchConfig,
    TrainConfig,
    make_run_config,
)
from fastweedout.experiment import records, runs, structure
from fastweedout.experiment.inputs import derive_seed, load_data
from fastweedout.experiment.pipeline import execute_run
from fastweedout.experiment.stages import build_model
from fastweedout.masks import sample_masks
from fastweedout.model.wrn import WideResNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "results", "fashion-mnist", "runs")
DATA = DataConfig("synthetic", val_size=64, synthetic=dict(train_size=192, test_size=64, image_size=12))


def cfg(arm, **kw):
    return make_run_config(arm, 0.5, data=DATA, model=ModelConfig("wrn_10_1"), seed=1,
                           search=SearchConfig(population=3, generations=1, batch_size=32),
                           training=TrainConfig(epochs=1, batch_size=64), **kw)


def test_defaults_keep_the_hashes_of_recorded_runs():
    dirs = sorted(os.listdir(COMMITTED))[:5] if os.path.isdir(COMMITTED) else []
    if not dirs:
        pytest.skip("no committed runs")
    for d in dirs:
        c = RunConfig.from_dict(json.load(open(os.path.join(COMMITTED, d, runs.CONFIG_NAME))))
        assert not c.reinit and not c.shuffle and d.endswith("-" + c.hash)
    plain, fresh, shuf = cfg("weedout"), cfg("weedout", reinit=True), cfg("synflow", mode="global", shuffle=True)
    assert "reinit" not in plain.to_dict() and fresh.to_dict()["reinit"] is True
    assert len({plain.hash, fresh.hash, cfg("weedout", shuffle=True).hash}) == 3
    assert "-reinit-" in fresh.name and "-shuffled-" in shuf.name
    assert RunConfig.from_dict(fresh.to_dict()).hash == fresh.hash


def test_meaningless_combinations_are_refused_or_normalised():
    with pytest.raises(ValueError, match="reinit and rewind"):
        cfg("weedout", reinit=True, pretrain_steps=2, rewind=True)
    with pytest.raises(ValueError, match="not for the dense arm"):
        RunConfig(arm="dense", sparsity=0.0, mode=None, reinit=True)
    with pytest.raises(ValueError, match="shuffled random mask is a random mask"):
        RunConfig(arm="random", sparsity=0.5, shuffle=True)
    # a grid keeps its controls: dense and random drop what does not apply to them
    assert make_run_config("dense", 0.0, reinit=True, shuffle=True) == make_run_config("dense", 0.0)
    assert make_run_config("random", 0.5, shuffle=True) == make_run_config("random", 0.5)
    assert make_run_config("random", 0.5, reinit=True).reinit


def test_shuffle_keeps_counts_per_set_and_redraws_positions():
    model = WideResNet(10, 2, num_classes=10, in_channels=1)
    m = sample_masks(model, 4, 0.7, mode="global", generator=0)
    s = structure.shuffle_mask(m, 5)
    assert all(torch.equal(s[k].sum(1), m[k].sum(1)) for k in m)
    assert s != m and s == structure.shuffle_mask(m, 5) and s != structure.shuffle_mask(m, 6)


def test_fresh_weights_are_seeded_from_the_run_and_differ_from_the_initial_ones():
    c = cfg("weedout", reinit=True)
    data = load_data(DATA)
    init = build_model(c, data)
    fresh, rec = structure.fresh_weights(c, init, derive_seed(c.seed, structure.REINIT_PURPOSE))
    again, _ = structure.fresh_weights(c, init, derive_seed(c.seed, structure.REINIT_PURPOSE))
    assert rec == dict(reinit=True, reinit_seed=derive_seed(1, "reinit"))
    assert not torch.equal(fresh.stem.weight, init.stem.weight) and torch.equal(fresh.stem.weight, again.stem.weight)
    assert structure.fresh_weights(cfg("weedout"), init, 0) == (init, {})


def test_runs_record_what_they_did(tmp_path):
    rt = Runtime(device="cpu", progress=False)
    plain = execute_run(cfg("synflow", mode="global"), tmp_path, rt)
    shuf = execute_run(cfg("synflow", mode="global", shuffle=True), tmp_path, rt)
    fresh = execute_run(cfg("synflow", mode="global", reinit=True), tmp_path, rt)
    a, b, c = (torch.load(os.path.join(o.path, runs.MASK_NAME), weights_only=True)["masks"]
               for o in (plain, shuf, fresh))
    assert all(torch.equal(a[k].sum(1), b[k].sum(1)) for k in a) and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)  # reinit trains the same mask
    sel = next(r for r in records.read_jsonl(os.path.join(shuf.path, runs.RESULTS_NAME)) if r.get("phase") == "search")
    assert sel["shuffled"] and sel["shuffle_seed"] == derive_seed(1, "shuffle")
    recs = records.read_jsonl(os.path.join(fresh.path, runs.RESULTS_NAME))
    assert [r for r in recs if r["type"] == "structure"] == [dict(type="structure", reinit=True,
                                                                  reinit_seed=derive_seed(1, "reinit"))]
    assert fresh.summary["reinit_seed"] == derive_seed(1, "reinit")
    assert fresh.summary["final"]["train_loss"] != plain.summary["final"]["train_loss"]


def test_cli_flags():
    args = build_parser().parse_args(["run", "--arm", "synflow", "--mode", "global", "--reinit", "--shuffle"])
    assert vars(args)["reinit"] is True and vars(args)["shuffle"] is True
    assert vars(build_parser().parse_args(["experiment", "--reinit"]))["reinit"] is True
    assert vars(build_parser().parse_args(["experiment"]))["reinit"] is False



def test_report_compares_structure_alone_with_its_source(tmp_path):
    from fastweedout.analysis import report
    from fastweedout.experiment.runs import RunDir

    for seed in range(2):
        for kw, acc in ((dict(arm="synflow"), 0.8), (dict(arm="synflow", reinit=True), 0.7 + 0.01 * seed),
                        (dict(arm="synflow", shuffle=True), 0.75), (dict(arm="random"), 0.6),
                        (dict(arm="random", reinit=True), 0.65 - 0.02 * seed)):
            c = make_run_config(sparsity=0.8, mode="global", data=DATA, seed=seed, **kw)
            rd = RunDir.open(tmp_path, c.name, c)
            rd.upsert(dict(type="mask", init_val_loss=2.3, init_val_acc=0.1), dict(type="epoch", epoch=1, test_acc=acc),
                      dict(type="final", train_acc=acc, test_acc=acc))
            rd.mark_done({})
    rep = report.write_report(tmp_path)
    by = {(r["series"], r["against"]): r for r in rep.comparisons}
    src = by[("synflow/global/node/reinit", "source")]
    assert src["control"] == "synflow/global/node" and src["diff_test_acc"] == pytest.approx(0.705 - 0.8)
    assert by[("synflow/global/node/reinit", "random")]["control"] == "random/global/node/reinit"
    assert by[("synflow/global/node/shuffled", "random")]["control"] == "random/global/node"
    assert by[("synflow/global/node/shuffled", "source")]["diff_test_acc"] == pytest.approx(-0.05)
    assert "Structure alone against" in open(rep.paths["report.md"]).read()
