import math

import pytest
import torch

import fastweedout as fw
from fastweedout.masks import Masks


@pytest.mark.parametrize("eta", [0.0, 0.2, 0.4, 0.6, 0.8, 0.99])
def test_layerwise_exact_counts(eta):
    m = fw.WideResNet(16, 2)
    masks = fw.sample_masks(m, 7, eta, generator=0)
    assert masks.population == 7
    for name, c in m.node_layers().items():
        off = min(math.floor(eta * c + 0.5), c - 1)
        assert masks[name].shape == (7, c)
        assert (masks[name].sum(1) == c - off).all()
    assert masks.is_uniform()


def test_members_differ_and_are_random():
    masks = fw.sample_masks(fw.WideResNet(10, 4), 20, 0.5, generator=0)
    rows = {tuple(masks["stage3"][i].tolist()) for i in range(20)}
    assert len(rows) == 20


@pytest.mark.parametrize("eta", [0.3, 0.8, 0.95])
def test_global_sparsity(eta):
    m = fw.WideResNet(16, 2)
    masks = fw.sample_masks(m, 9, eta, mode="global", generator=1)
    total = sum(m.node_layers().values())
    for i in range(9):
        off = sum(int((~masks[k][i]).sum()) for k in masks)
        assert off == min(math.floor(eta * total + 0.5), total - len(m.node_layers()))
        assert all(bool(masks[k][i].any()) for k in masks)
    assert not masks.is_uniform()


def test_extreme_global_keeps_one_per_layer():
    m = fw.WideResNet(10, 1)
    masks = fw.sample_masks(m, 4, 0.999, mode="global", generator=0)
    for k in masks:
        assert (masks[k].sum(1) == 1).all()


def test_per_layer_schedule():
    m = fw.WideResNet(10, 2)
    sched = {"stage1": 0.75, "stage3": 0.5}
    masks = fw.sample_masks(m, 3, sched, generator=0)
    assert (masks["stage1"].sum(1) == 8).all()
    assert (masks["stage3"].sum(1) == 64).all()
    assert (masks["stage2"].sum(1) == 64).all()  # unnamed: dense
    seq = [0.5] * len(m.node_layers())
    assert fw.sample_masks(m, 2, seq, generator=0).sparsity() == pytest.approx(0.5, abs=0.01)


def test_determinism():
    m = fw.WideResNet(16, 2)
    for mode in ("layerwise", "global"):
        a = fw.sample_masks(m, 5, 0.4, mode, generator=123)
        b = fw.sample_masks(m, 5, 0.4, mode, generator=torch.Generator().manual_seed(123))
        c = fw.sample_masks(m, 5, 0.4, mode, generator=124)
        assert a == b and a != c


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x", {"nope": 0.1}, [0.1, 0.2]])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError):
        fw.sample_masks(fw.WideResNet(10, 1), 2, bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_population(bad):
    with pytest.raises(ValueError, match="population"):
        fw.sample_masks(fw.WideResNet(10, 1), bad, 0.5)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        fw.sample_masks(fw.WideResNet(10, 1), 2, 0.5, mode="random")
    with pytest.raises(ValueError, match="global"):
        fw.sample_masks(fw.WideResNet(10, 1), 2, {"stage1": 0.5}, mode="global")


def test_select_member_cat_and_io(tmp_path):
    m = fw.WideResNet(10, 2)
    masks = fw.sample_masks(m, 6, 0.5, generator=0)
    sub = masks.select([4, 1])
    assert sub.population == 2 and torch.equal(sub["stage2"][0], masks["stage2"][4])
    assert torch.equal(masks.member(1)["stem"], masks["stem"][1])
    assert Masks.cat([sub, masks]).population == 8
    p = tmp_path / "m.pt"
    masks.save(p, model=m.config)
    back = Masks.load(p, m.node_layers())
    assert back == masks and back.meta["model"]["width"] == 2
    with pytest.raises(ValueError, match="nodes per member"):
        Masks.load(p, fw.WideResNet(10, 4).node_layers())
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        Masks.load(tmp_path / "bad.pt")


def test_masks_constructor_validation():
    with pytest.raises(ValueError, match="bool"):
        Masks({"a": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="same population"):
        Masks({"a": torch.ones(2, 3, dtype=torch.bool), "b": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="empty population"):
        Masks({"a": torch.ones(0, 3, dtype=torch.bool)})
