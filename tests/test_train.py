"""Training: learning, masked == pruned, resume == uninterrupted, divergence, schedules, FLOPs."""

import importlib
import os

import pytest
import torch

from fastweedout import WideResNet, create_model, sample_masks
from fastweedout.config import TrainConfig
from fastweedout.cost.flops import forward_flops
from fastweedout.data.datasets import load_dataset
from fastweedout.model.masked import MaskedNet
from fastweedout.training.callbacks import TrainCallbacks
from fastweedout.training.checkpoint import CHECKPOINT_NAME, PREV_NAME
from fastweedout.training.loop import (
    EpochRecord,
    TrainingDiverged,
    lr_factor,
    make_optimizer,
    train,
)

T = importlib.import_module("fastweedout.training.loop")  # the module (fastweedout.train is the function)


def tiny_data(train_size=320, test_size=64, image_size=12, channels=1):
    return load_dataset("synthetic", synthetic=dict(train_size=train_size, test_size=test_size, val_size=32,
                                                    image_size=image_size, channels=channels))


def numbers(records):
    return [(r.epoch, r.lr, r.train_loss, r.train_acc, r.test_loss, r.test_acc) for r in records]


def test_learns_the_synthetic_set():
    data = load_dataset("synthetic", synthetic=dict(train_size=1200, test_size=300, val_size=200))
    model = create_model("wrn_10_1", num_classes=10, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(model, None, data, TrainConfig(epochs=2, batch_size=32), progress=False)
    assert [r.epoch for r in res.records] == [1, 2] and res.completed
    assert res.final.test_acc > 0.5 and res.final.train_acc > 0.5  # chance is 0.1
    assert res.records[1].train_loss < res.records[0].train_loss
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model is untouched
    assert res.phases["training"].images == 2 * (1000 // 32) * 32
    assert res.phases["training"].flops == res.train_step_flops * res.phases["training"].images
    assert 2 * res.forward_flops < res.train_step_flops <= 3 * res.forward_flops
    assert res.phases["evaluation"].flops == res.forward_flops * 2 * 300
    assert res.phases["training"].wall_s > 0 and res.final.wall_time_s > 0


def test_pruned_training_runs_the_small_network():
    data = tiny_data()
    model = create_model("wrn_10_2", num_classes=10, in_channels=1)
    mask = sample_masks(model, 1, 0.5, generator=1).member(0)
    res = train(model, mask, data, TrainConfig(epochs=1, batch_size=64), progress=False)
    assert isinstance(res.model, WideResNet)
    assert dict(res.model.node_layers()) == {k: int(v.sum()) for k, v in mask.items()}
    assert res.forward_flops == res.live_forward_flops < forward_flops(model, 12)
    assert res.params == res.live_params < sum(p.numel() for p in model.parameters())
    masked = train(model, mask, data, TrainConfig(epochs=1, batch_size=64, masked=True), progress=False)
    assert masked.forward_flops == forward_flops(model, 12) and masked.live_forward_flops == res.forward_flops


def test_masked_and_pruned_training_same_steps():
    """Momentum SGD with weight decay, several steps: the same losses and the same live weights."""
    torch.manual_seed(0)
    model = create_model("wrn_10_2", num_classes=5, in_channels=3)  # stem set separate from stage1
    mask = sample_masks(model, 1, 0.4, generator=3).member(0)
    cfg = TrainConfig(epochs=1, lr=0.05, weight_decay=5e-4, momentum=0.9, nesterov=True)
    masked, pruned = MaskedNet(__import__("copy").deepcopy(model), mask), model.prune(mask)
    masked.train(), pruned.train()
    om, op = make_optimizer(masked, cfg), make_optimizer(pruned, cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(16, 3, 10, 10, generator=g), torch.randint(0, 5, (16,), generator=g)
        losses = []
        for net, opt in ((masked, om), (pruned, op)):
            loss = T.criterion(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    again = masked.net.prune(mask)
    for (k, a), b in zip(again.state_dict().items(), pruned.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)

    # Through train(): per-epoch numbers and final weights agree too (up to fp32 rounding, which
    # eight steps at lr 0.1 amplify to ~1e-4).
    data = load_dataset("synthetic", synthetic=dict(train_size=160, test_size=48, val_size=32, image_size=10,
                                                    channels=3, num_classes=5))
    rp = train(model, mask, data, TrainConfig(epochs=2, batch_size=32), progress=False)
    rm = train(model, mask, data, TrainConfig(epochs=2, batch_size=32, masked=True), progress=False)
    for a, b in zip(numbers(rp.records), numbers(rm.records)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    for (k, a), b in zip(rm.model.prune(mask).state_dict().items(), rp.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4, msg=k)


def _stop_after(k):
    class Interrupt(Exception):
        pass

    def hook(rec: EpochRecord):
        if rec.epoch == k:
            raise Interrupt

    return hook, Interrupt


def test_resume_after_interruption_gives_identical_numbers(tmp_path):
    data = tiny_data()
    # Dropout and augmentation make the run depend on every saved random state.
    model = WideResNet(10, 1, num_classes=10, in_channels=1, dropout=0.3)
    mask = sample_masks(model, 1, 0.25, generator=2).member(0)
    cfg = TrainConfig(epochs=3, batch_size=64, schedule="step", label_smoothing=0.1)
    full = train(model, mask, data, cfg, seed=4, checkpoint_dir=tmp_path / "a", progress=False)

    hook, Interrupt = _stop_after(1)
    with pytest.raises(Interrupt):
        train(model, mask, data, cfg, seed=4, checkpoint_dir=tmp_path / "b", on_epoch=hook, progress=False)
    assert os.path.exists(tmp_path / "b" / CHECKPOINT_NAME) and os.path.exists(tmp_path / "b" / PREV_NAME)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    resumed = train(model, mask, data, cfg, seed=4, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.resumed_from == 1 and resumed.completed
    assert numbers(resumed.records) == numbers(full.records)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k

    # A finished run returns its result without training again.
    done = train(model, mask, data, cfg, seed=4, checkpoint_dir=tmp_path / "b", progress=False)
    assert done.resumed_from == 3 and numbers(done.records) == numbers(full.records)

    # A checkpoint of another config or mask is refused, not silently continued.
    with pytest.raises(ValueError, match="config.lr"):
        train(model, mask, data, TrainConfig(**{**cfg.__dict__, "lr": 0.05}), seed=4, checkpoint_dir=tmp_path / "b",
              progress=False)
    with pytest.raises(ValueError, match="seed"):
        train(model, mask, data, cfg, seed=5, checkpoint_dir=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="train_fingerprint"):
        other_split = load_dataset("synthetic", seed=1, synthetic=dict(train_size=320, test_size=64, val_size=32,
                                                                        image_size=12))
        train(model, mask, other_split, cfg, seed=4, checkpoint_dir=tmp_path / "b", progress=False)
    other = sample_masks(model, 1, 0.25, generator=9).member(0)
    with pytest.raises(ValueError, match="mask differs"):
        train(model, other, data, cfg, seed=4, checkpoint_dir=tmp_path / "b", progress=False)


def test_damaged_checkpoint_falls_back_to_the_copy_and_a_stale_copy_is_refreshed(tmp_path):
    data = tiny_data()
    model = WideResNet(10, 1, num_classes=10, in_channels=1)
    cfg = TrainConfig(epochs=2, batch_size=64)
    full = train(model, None, data, cfg, checkpoint_dir=tmp_path / "a", progress=False)
    hook, Interrupt = _stop_after(1)
    d = tmp_path / "b"
    with pytest.raises(Interrupt):
        train(model, None, data, cfg, checkpoint_dir=d, on_epoch=hook, progress=False)
    (d / CHECKPOINT_NAME).write_bytes(b"garbage")  # a damaged disk block
    with pytest.warns(RuntimeWarning, match="damaged"):
        res = train(model, None, data, cfg, checkpoint_dir=d, progress=False)
    assert res.resumed_from == 1 and numbers(res.records) == numbers(full.records)
    # A kill between a checkpoint and its copy leaves the copy an epoch behind: refreshed on resume.
    import shutil
    shutil.copy(tmp_path / "a" / PREV_NAME, d / PREV_NAME)
    prev = torch.load(d / PREV_NAME, weights_only=True)["epoch"]
    import fastweedout.training.checkpoint as C
    state = C.load(d, torch.load(d / CHECKPOINT_NAME, weights_only=True)["identity"], None)
    assert state["epoch"] == 2 and torch.load(d / PREV_NAME, weights_only=True)["epoch"] == 2 and prev == 2
    C.finish(d)
    assert not os.path.exists(d / PREV_NAME) and os.path.exists(d / CHECKPOINT_NAME)


def test_max_steps_stops_mid_epoch():
    data = tiny_data()
    model = create_model("wrn_10_1", num_classes=10, in_channels=1)
    res = train(model, None, data, TrainConfig(epochs=3, batch_size=64), max_steps=7, progress=False)
    assert res.steps == 7 and not res.completed and [r.epoch for r in res.records] == [1]
    assert res.phases["training"].images == 7 * 64


def test_on_epoch_can_stop_early(tmp_path):
    data = tiny_data()
    model = create_model("wrn_10_1", num_classes=10, in_channels=1)
    res = train(model, None, data, TrainConfig(epochs=3, batch_size=64), on_epoch=lambda r: r.epoch == 2,
                progress=True)  # the tqdm path too
    assert [r.epoch for r in res.records] == [1, 2] and not res.completed


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    data = tiny_data()
    model = create_model("wrn_10_1", num_classes=10, in_channels=1)
    cfg = TrainConfig(epochs=3, batch_size=64)
    steps = (len(data.train)) // 64
    calls = {"n": 0}
    real = T.criterion

    def poisoned(logits, labels, label_smoothing=0.0, reduction="mean"):
        loss = real(logits, labels, label_smoothing, reduction)
        if logits.requires_grad:  # a training step (evaluation runs without gradients)
            calls["n"] += 1
            if calls["n"] == steps + 2:  # the second step of epoch 2
                return loss * float("nan")
        return loss

    monkeypatch.setattr(T, "criterion", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 2") as e:
        train(model, None, data, cfg, checkpoint_dir=tmp_path, progress=False)
    assert e.value.epoch == 2 and e.value.checkpoint == str(tmp_path)
    state = torch.load(os.path.join(tmp_path, CHECKPOINT_NAME), weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    bad = create_model("wrn_10_1", num_classes=10, in_channels=1)
    with torch.no_grad():
        bad.fc.weight[0, 0] = float("inf")
    monkeypatch.setattr(T, "criterion", real)
    with pytest.raises(TrainingDiverged, match="no checkpoint"):
        train(bad, None, data, TrainConfig(epochs=1, batch_size=64), progress=False)


def test_schedules():
    cos = lr_factor(TrainConfig(epochs=4), steps_per_epoch=10)
    assert cos(0) == 1.0 and cos(20) == pytest.approx(0.5) and cos(40) == pytest.approx(0.0, abs=1e-12)
    step = lr_factor(TrainConfig(epochs=10, schedule="step"), steps_per_epoch=5)  # milestones 3, 6, 8
    got = [step(e * 5) for e in range(10)]
    assert got == pytest.approx([1, 1, 1, 0.2, 0.2, 0.2, 0.04, 0.04, 0.008, 0.008])
    assert step(14) == 1 and step(15) == pytest.approx(0.2)


def test_recorded_lr_follows_the_schedule():
    data = tiny_data()
    model = create_model("wrn_10_1", num_classes=10, in_channels=1)
    res = train(model, None, data, TrainConfig(epochs=2, batch_size=96, lr=0.2), progress=False)
    assert [r.lr for r in res.records] == pytest.approx([0.2, 0.1])


def test_config_validation():
    for bad in (dict(epochs=0), dict(epochs=1, schedule="linear"), dict(epochs=1, lr=0),
                dict(epochs=1, momentum=0, nesterov=True), dict(epochs=1, label_smoothing=1.0),
                dict(epochs=1, batch_size=0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    assert TrainConfig(epochs=1).resolved(torch.device("cpu")) == dict(compile=False, amp=False, channels_last=False)
    assert TrainConfig(epochs=1).resolved(torch.device("cuda")) == dict(compile=True, amp=True, channels_last=True)
    data = tiny_data()
    with pytest.raises(ValueError, match="classes"):
        train(create_model("wrn_10_1", num_classes=3, in_channels=1), None, data, TrainConfig(epochs=1),
              progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(create_model("wrn_10_1", num_classes=10, in_channels=1), None, data,
              TrainConfig(epochs=1, batch_size=4096), progress=False)


class CountSteps(TrainCallbacks):
    """A callback with state: counts steps, stops after epoch ``stop_at``."""

    def __init__(self, stop_at=None):
        self.steps, self.seen_epochs, self.stop_at = 0, [], stop_at

    def before_step(self, step, net):
        assert step == self.steps  # global step, 0-based, continued across a resume
        self.steps += 1

    def after_epoch(self, loop, record):
        assert loop.epoch == record.epoch and loop.records[-1] is record
        self.seen_epochs.append(record.epoch)
        return record.epoch == self.stop_at

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_callbacks_run_in_order_stop_the_loop_and_resume_with_it(tmp_path):
    data = tiny_data()
    cfg = TrainConfig(epochs=3, batch_size=64)
    model = WideResNet(10, 1, num_classes=data.num_classes, in_channels=data.in_channels)
    a, b = CountSteps(stop_at=2), CountSteps()
    res = train(model, None, data, cfg, callbacks=[a, b], checkpoint_dir=tmp_path, progress=False)
    steps = res.steps // 2  # per epoch
    assert steps > 0 and a.seen_epochs == b.seen_epochs == [1, 2] and not res.completed and a.steps == 2 * steps
    # a second call resumes from epoch 2 with the callbacks' state: steps keep counting from there
    a2, b2 = CountSteps(), CountSteps()
    res2 = train(model, None, data, cfg, callbacks=[a2, b2], checkpoint_dir=tmp_path, progress=False)
    assert res2.resumed_from == 2 and res2.completed and a2.seen_epochs == [3] and a2.steps == b2.steps == 3 * steps
    # the same three epochs without a stop give the same records
    full = train(model, None, data, cfg, callbacks=CountSteps(), progress=False)
    assert numbers(res2.records) == numbers(full.records)
