"""One run start to finish, and the grid: skipping finished runs, resuming interrupted ones, every arm."""

import dataclasses
import json
import os

import pytest
import torch

import fastweedout.experiment.stages as E
import fastweedout.search.weedout as S
from fastweedout.config import DataConfig, ModelConfig, Runtime, SearchConfig, TrainConfig, make_run_config
from fastweedout.experiment import inputs, records, runs
from fastweedout.experiment.grid import grid_configs, run_grid
from fastweedout.experiment.pipeline import execute_run
from fastweedout.training.checkpoint import CHECKPOINT_NAME

DATA = DataConfig("synthetic", val_size=64, synthetic=dict(train_size=320, test_size=96, image_size=12))
RT = Runtime(device="cpu", progress=False)


def cfg(arm="weedout", sparsity=0.5, seed=0, epochs=3, **kw):
    return make_run_config(arm, sparsity, data=DATA, model=ModelConfig("wrn_10_1"), seed=seed,
                           search=SearchConfig(population=4, generations=3, batch_size=32),
                           training=TrainConfig(epochs=epochs, batch_size=64), **kw)


def outputs(path):
    """What must be identical between runs: every record but its timings, the mask, the final summary."""
    recs = records.strip_timing(records.read_jsonl(os.path.join(path, runs.RESULTS_NAME)))
    mask = torch.load(os.path.join(path, runs.MASK_NAME), weights_only=True)["masks"]
    done = json.load(open(os.path.join(path, runs.DONE_NAME)))
    return sorted(recs, key=lambda r: json.dumps(records.record_key(r))), mask, done["final"]


def same(a, b):
    ra, ma, fa = a
    rb, mb, fb = b
    assert ra == rb
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert records.strip_timing(fa) == records.strip_timing(fb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted weedout run."""
    root = tmp_path_factory.mktemp("ref")
    out = execute_run(cfg(), root, RT)
    return out


def test_a_run_writes_its_files_and_is_skipped_when_done(reference):
    out = reference
    assert not out.skipped and os.path.basename(out.path) == f"{out.config.name}-{out.config.hash}"
    files = set(os.listdir(out.path))
    assert {"config.json", "results.jsonl", "mask.pt", "search.ckpt", "train", "done"} <= files
    assert ".lock" not in files and not [f for f in files if ".tmp" in f]  # nothing but results left
    recs = records.read_jsonl(os.path.join(out.path, "results.jsonl"))
    kinds = [records.record_key(r) for r in recs]
    assert len(kinds) == len(set(kinds))  # no duplicated record
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2, 3]
    assert {r["phase"] for r in recs if r["type"] == "phase"} == {"search", "training", "evaluation"}
    search = next(r for r in recs if r.get("phase") == "search")
    assert search["flops"] > 0 and len(search["fitness"]) == 3 and len(search["fitness"][0]) == 4
    assert out.summary["final"]["epoch"] == 3 and 0 <= out.summary["final"]["test_acc"] <= 1
    env = out.summary["environment"]  # what the wall times depend on, the processor included
    assert env["cpu"] and env["threads"] >= 1 and env["torch"] == torch.__version__
    stamp = {f: os.stat(os.path.join(out.path, f)).st_mtime_ns for f in ("results.jsonl", "done", "mask.pt")}
    again = execute_run(cfg(), os.path.dirname(out.path), RT)
    assert again.skipped and again.summary == out.summary
    assert stamp == {f: os.stat(os.path.join(out.path, f)).st_mtime_ns for f in stamp}  # nothing rewritten


class Interrupt(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def killed_after_epoch_2(tmp_path, monkeypatch):
    """Start the reference run in tmp_path and kill it right after its second epoch's record."""
    real_train = E.train

    def train_then_die(*a, on_epoch=None, **k):
        def hook(rec):
            on_epoch(rec)
            if rec.epoch == 2:
                raise Interrupt
        return real_train(*a, on_epoch=hook, **k)

    monkeypatch.setattr(E, "train", train_then_die)
    with pytest.raises(Interrupt):
        execute_run(cfg(), tmp_path, RT)
    monkeypatch.setattr(E, "train", real_train)


def test_interrupted_training_resumes_to_the_same_result(reference, tmp_path, monkeypatch):
    killed_after_epoch_2(tmp_path, monkeypatch)
    path = os.path.join(tmp_path, os.path.basename(reference.path))
    assert not os.path.exists(os.path.join(path, "done"))
    recs = records.read_jsonl(os.path.join(path, "results.jsonl"))
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2]
    calls = []
    monkeypatch.setattr(S, "score", lambda *a, **k: calls.append(1))  # the search must not run again
    out = execute_run(cfg(), tmp_path, RT)
    assert not out.skipped and not calls
    same(outputs(out.path), outputs(reference.path))


def test_interrupted_search_resumes_from_its_last_generation(reference, tmp_path, monkeypatch):
    real = S.score
    calls = []

    def score(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt  # in the third generation: two are checkpointed
        return real(*a, **k)

    monkeypatch.setattr(S, "score", score)
    with pytest.raises(Interrupt):
        execute_run(cfg(), tmp_path, RT)
    path = os.path.join(tmp_path, os.path.basename(reference.path))
    assert torch.load(os.path.join(path, "search.ckpt"), weights_only=False)["generation"] == 2
    assert not os.path.exists(os.path.join(path, "mask.pt"))
    calls.clear()
    monkeypatch.setattr(S, "score", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    out = execute_run(cfg(), tmp_path, RT)
    assert len(calls) == 1  # only the last generation was scored again
    same(outputs(out.path), outputs(reference.path))


def test_truncated_checkpoint_falls_back_to_the_last_good_copy(reference, tmp_path, monkeypatch):
    killed_after_epoch_2(tmp_path, monkeypatch)
    path = os.path.join(tmp_path, os.path.basename(reference.path))
    ck = os.path.join(path, "train", CHECKPOINT_NAME)
    data = open(ck, "rb").read()
    with open(ck, "wb") as f:  # a torn write, as a crash of a non-atomic writer would leave
        f.write(data[: len(data) // 3])
    with pytest.warns(RuntimeWarning) as caught:
        out = execute_run(cfg(), tmp_path, RT)
    messages = " | ".join(str(w.message) for w in caught)
    assert "damaged" in messages and "copy of the last good checkpoint" in messages
    same(outputs(out.path), outputs(reference.path))
    assert any(n.startswith(CHECKPOINT_NAME + ".corrupt") for n in os.listdir(os.path.join(path, "train")))


def test_corrupt_results_file_is_rebuilt(tmp_path):
    out1 = execute_run(cfg(epochs=1), tmp_path, RT)
    before = outputs(out1.path)
    os.remove(os.path.join(out1.path, "done"))  # as if killed before the marker, with a damaged results file
    with open(os.path.join(out1.path, "results.jsonl"), "a") as f:
        f.write('{"torn')
    with pytest.warns(RuntimeWarning, match="corrupt"):
        out2 = execute_run(cfg(epochs=1), tmp_path, RT)
    same(outputs(out2.path), before)  # every record re-derived from mask.pt and the checkpoints


def test_arms_of_a_seed_share_the_initial_weights():
    data = inputs.load_data(DATA, RT)
    a = E.build_model(cfg("weedout"), data)
    b = E.build_model(cfg("random"), data)
    c = E.build_model(cfg("weedout", seed=1), data)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_random_and_dense_arms(tmp_path):
    r = execute_run(cfg("random", epochs=1), tmp_path, RT)
    d = execute_run(cfg("random", sparsity=0.0, epochs=1), tmp_path, RT)
    assert r.config.arm == "random" and d.config.arm == "dense"
    assert d.summary["live_params"] > r.summary["live_params"]
    assert r.summary["search"] is None and 0.45 < r.summary["mask_sparsity"] < 0.55
    for o in (r, d):
        recs = records.read_jsonl(os.path.join(o.path, "results.jsonl"))
        search = next(x for x in recs if x.get("phase") == "search")
        assert search["flops"] == 0 and search["wall_s"] == 0


def test_grid_runs_dense_once_per_seed():
    fixed = {"data.name": "synthetic", "training.epochs": 1}
    configs = grid_configs({"sparsity": [0.0, 0.2, 0.4], "arm": ["weedout", "random"], "seed": [0, 1]}, fixed)
    assert len(configs) == 2 * (1 + 2 * 2)
    assert [c.arm for c in configs[:5]] == ["dense", "weedout", "random", "weedout", "random"]
    assert [c.seed for c in configs] == [0] * 5 + [1] * 5
    assert len({c.hash for c in configs}) == len(configs)
    # any field is an axis; sub-configs of other arms are dropped, so duplicates collapse
    pops = grid_configs({"sparsity": [0.5], "arm": ["weedout", "random"], "search.population": [10, 100]}, fixed)
    assert sorted((c.arm, c.search.population if c.search else None) for c in pops) == [
        ("random", None), ("weedout", 10), ("weedout", 100)]
    with pytest.raises(ValueError, match="arm"):
        grid_configs({"arm": ["lottery"]}, fixed)
    with pytest.raises(ValueError, match="no values"):
        grid_configs({"seed": []}, fixed)


def test_config_checked_against_data_before_writing(tmp_path):
    bad = make_run_config("weedout", 0.5, data=DATA, model=ModelConfig(), search=SearchConfig(batch_size=500),
                          training=TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="validation"):
        run_grid([bad], tmp_path / "res", RT)
    assert not os.path.exists(tmp_path / "res")  # not even created
    huge = make_run_config("weedout", 0.5, data=DATA, model=ModelConfig(), search=SearchConfig(population=10**9),
                           training=TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="GiB"):
        run_grid([huge], tmp_path / "res", RT)
    assert not os.path.exists(tmp_path / "res")


def test_finished_run_with_damaged_records_is_rebuilt_not_skipped(reference, tmp_path):
    import shutil

    path = os.path.join(tmp_path, os.path.basename(reference.path))
    shutil.copytree(reference.path, path)
    with open(os.path.join(path, "results.jsonl"), "w") as f:
        f.write('{"type": "epo')  # damaged after the run had finished
    calls = []
    real = S.score
    S.score = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        with pytest.warns(RuntimeWarning, match="damaged"):
            out = execute_run(cfg(), tmp_path, RT)
    finally:
        S.score = real
    assert not out.skipped and not calls  # rebuilt from mask.pt and the final checkpoint, nothing recomputed
    same(outputs(out.path), outputs(reference.path))
    assert any(n.startswith("results.jsonl.damaged-") for n in os.listdir(path))


def test_pretrain_steps_and_rewind(tmp_path):
    k = execute_run(cfg("random", epochs=1, pretrain_steps=3), tmp_path, RT)
    plain = execute_run(cfg("random", epochs=1), tmp_path, RT)
    recs = records.read_jsonl(os.path.join(k.path, "results.jsonl"))
    pre = next(x for x in recs if x.get("phase") == "pretrain")
    assert pre["steps"] == 3 and pre["flops"] > 0 and os.path.exists(os.path.join(k.path, "parent.pt"))
    # the same mask (same seed), but chosen on and trained from other weights
    same_mask = torch.load(os.path.join(k.path, "mask.pt"), weights_only=True)["masks"]
    plain_mask = torch.load(os.path.join(plain.path, "mask.pt"), weights_only=True)["masks"]
    assert all(torch.equal(same_mask[n], plain_mask[n]) for n in same_mask)
    assert k.summary["init"] != plain.summary["init"]  # scored on the step-3 weights
    assert records.strip_timing(k.summary["final"]) != records.strip_timing(plain.summary["final"])
    # resumed: the parent is not trained again
    assert execute_run(cfg("random", epochs=1, pretrain_steps=3), tmp_path, RT).skipped
    # a mask chosen on the weights: rewinding keeps the choice made on the step-3 parent and trains it from
    # the initial weights
    lk = execute_run(cfg("l1", epochs=1, pretrain_steps=3), tmp_path, RT)
    lr = execute_run(cfg("l1", epochs=1, pretrain_steps=3, rewind=True), tmp_path, RT)
    assert lr.path != lk.path and lr.summary["init"] == lk.summary["init"]
    assert lr.summary["final"]["test_loss"] != lk.summary["final"]["test_loss"]


def test_random_runs_that_never_train_from_the_parent_are_the_runs_without_it(tmp_path):
    """A random mask is drawn from the seed alone, so a random run that rewinds is the run without
    pretraining, step for step; the config says so rather than paying for a copy."""
    plain = cfg("random", epochs=1)
    assert cfg("random", epochs=1, pretrain_steps=3, rewind=True) == plain
    assert cfg("random", epochs=1, pretrain_steps=3, reinit=True) == cfg("random", epochs=1, reinit=True)
    assert cfg("dense", 0.0, epochs=1, pretrain_steps=3, rewind=True) == cfg("dense", 0.0, epochs=1)
    assert cfg("weedout", pretrain_steps=3, rewind=True).pretrain_steps == 3  # chosen on the parent
    # what the normalisation relies on: built without it, the rewound run trains exactly the plain run
    rewound = execute_run(dataclasses.replace(plain, pretrain_steps=3, rewind=True), tmp_path, RT)
    base = execute_run(plain, tmp_path, RT)
    assert rewound.path != base.path
    a, b = (torch.load(os.path.join(r.path, runs.MASK_NAME), weights_only=True)["masks"] for r in (rewound, base))
    assert all(torch.equal(a[n], b[n]) for n in a)
    epochs = [records.strip_timing([x for x in records.read_jsonl(os.path.join(r.path, runs.RESULTS_NAME))
                                    if x.get("type") == "epoch"]) for r in (rewound, base)]
    assert epochs[0] == epochs[1] and epochs[0]
    assert records.strip_timing(rewound.summary["final"]) == records.strip_timing(base.summary["final"])
    assert rewound.summary["init"] != base.summary["init"]  # only the score before training saw the parent


def test_throughout_arm(tmp_path):
    from fastweedout.config import ThroughoutConfig

    c = make_run_config("throughout", 0.5, data=DATA, model=ModelConfig("wrn_10_1"), seed=0,
                        search=SearchConfig(population=3, batch_size=32),
                        throughout=ThroughoutConfig(interval=2, mask_every=1, finetune_epochs=1),
                        training=TrainConfig(epochs=2, batch_size=64))
    out = execute_run(c, tmp_path, RT)
    recs = records.read_jsonl(os.path.join(out.path, "results.jsonl"))
    pops = [x for x in recs if x["type"] == "population"]
    assert [p["step"] for p in pops] == [2, 4, 6, 8]  # before steps 2, 4, 6 of 2 x 4, and once at the end
    assert any(x["type"] == "finetune_epoch" for x in recs) and out.summary["final"]["epoch"] == 1
    search = next(x for x in recs if x.get("phase") == "search")
    assert search["flops"] > 0 and search["scorings"] == 4
    mask = torch.load(os.path.join(out.path, "mask.pt"), weights_only=True)["masks"]
    assert 0.45 < sum(int((~m).sum()) for m in mask.values()) / sum(m.numel() for m in mask.values()) < 0.55
    again = execute_run(c, os.path.join(tmp_path, "again"), RT)  # deterministic
    assert records.strip_timing(again.summary["final"]) == records.strip_timing(out.summary["final"])


def test_bn_recalibration_of_the_pruned_winner():
    """Without fine-tuning, the throughout arm's winner gets BN statistics of its own: each BN layer's
    running mean is the mean of its inputs over the recalibration images (equal batches: the mean of
    the batch means), whatever was there before."""
    import fastweedout as fw
    from fastweedout.data.loader import DeviceLoader
    from fastweedout.experiment.during_training import recalibrate_bn

    data = fw.load_dataset("synthetic", synthetic=dict(train_size=256, test_size=16, val_size=16, image_size=8))
    net = fw.WideResNet(10, 2, num_classes=10, in_channels=1).prune(
        fw.sample_masks(fw.WideResNet(10, 2, num_classes=10, in_channels=1), 1, 0.5, generator=0).member(0))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.running_mean.fill_(100.0)
    first = bns[0]
    inputs = []
    hook = first.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
    seen = recalibrate_bn(net.eval(), data, batch_size=32, images=128, seed=3)
    hook.remove()
    assert seen == 128 and len(inputs) == 4 and not net.training and first.momentum == 0.1
    expected = torch.cat(inputs).mean(dim=(0, 2, 3))
    assert torch.allclose(first.running_mean, expected, atol=1e-5)
    assert all(float(m.running_mean.abs().max()) < 100 for m in bns)
    x = next(iter(DeviceLoader(data.test, 16, mean=data.mean, std=data.std)))[0]
    assert torch.isfinite(net.eval()(x)).all()


def test_throughout_without_finetuning_recalibrates(tmp_path):
    from fastweedout.config import ThroughoutConfig

    c = make_run_config("throughout", 0.5, data=DATA, model=ModelConfig("wrn_10_1"), seed=0,
                        search=SearchConfig(population=3, batch_size=32),
                        throughout=ThroughoutConfig(interval=2, finetune_epochs=0),
                        training=TrainConfig(epochs=1, batch_size=64))
    out = execute_run(c, tmp_path, RT)
    final = [x for x in records.read_jsonl(os.path.join(out.path, "results.jsonl")) if x["type"] == "final"][-1]
    assert final["phase"] == "pruned" and final["bn_recalibration_images"] == 256  # 320 images, batches of 64


@pytest.mark.parametrize("arm", ["l1", "snip", "grasp", "synflow"])
def test_pruning_at_initialisation_arms(arm, tmp_path):
    out = execute_run(cfg(arm, epochs=1), tmp_path, RT)
    random = execute_run(cfg("random", epochs=1), tmp_path, RT)
    recs = records.read_jsonl(os.path.join(out.path, "results.jsonl"))
    sel = next(x for x in recs if x.get("phase") == "search")
    assert sel["method"] == arm and (sel["flops"] > 0) == (arm != "l1")
    mask = torch.load(os.path.join(out.path, "mask.pt"), weights_only=True)["masks"]
    rmask = torch.load(os.path.join(random.path, "mask.pt"), weights_only=True)["masks"]
    # exactly Weedout's (and the control's) live count in every node set
    assert {k: int(v.sum()) for k, v in mask.items()} == {k: int(v.sum()) for k, v in rmask.items()}
    assert out.summary["final"]["epoch"] == 1 and out.config.prune is not None and out.config.search is None


def test_weight_granularity_run(tmp_path):
    w = execute_run(cfg("weedout", epochs=1, granularity="weight"), tmp_path, RT)
    r = execute_run(cfg("random", epochs=1, granularity="weight"), tmp_path, RT)
    for out in (w, r):
        recs = records.read_jsonl(os.path.join(out.path, "results.jsonl"))
        info = next(x for x in recs if x["type"] == "mask")
        assert info["granularity"] == "weight" and 0.45 < info["sparsity"] < 0.55
        final = next(x for x in recs if x["type"] == "final")
        # the full network trains with its masked weights held at zero: executed FLOPs are the dense ones
        assert final["live_forward_flops"] < final["forward_flops"] and final["live_params"] < final["params"]
        state = torch.load(os.path.join(out.path, "train", CHECKPOINT_NAME), weights_only=True)
        mask = torch.load(os.path.join(out.path, "mask.pt"), weights_only=True)["masks"]
        for name, m in mask.items():
            assert bool((state["model"][name].flatten()[~m[0]] == 0).all()), name
    assert "-weight-" in os.path.basename(w.path)
