import pytest
import torch

import fastweedout as fw
from helpers import batch, randomize_bn
from tolerances import TOL

ARCHS = [(10, 1, 1), (10, 2, 3), (16, 1, 3), (16, 4, 1), (22, 2, 3)]


def test_wrn_28_10_parameter_count():
    # Zagoruyko & Komodakis: 36,479,194 parameters (counting BN affine).
    m = fw.create_model("wrn_28_10")
    assert sum(p.numel() for p in m.parameters()) == 36_479_194


def test_node_layers_structure():
    m = fw.WideResNet(16, 4)
    nl = m.node_layers()
    assert list(nl)[:3] == ["stem", "stage1", "stage1.block0"]
    assert nl["stem"] == 16 and nl["stage1"] == 64 and nl["stage2"] == 128 and nl["stage3"] == 256
    assert len(nl) == 1 + 3 * (1 + 2)
    # Width 1: the stem feeds the first stream directly and shares its node set.
    m1 = fw.WideResNet(10, 1)
    assert "stem" not in m1.node_layers() and m1.stem_set == "stage1"
    assert m1.stage1[0].shortcut is None and m.stage1[0].shortcut is not None


def test_state_dict_keys_stable():
    keys = list(fw.WideResNet(10, 2).state_dict())
    assert keys[0] == "stem.weight"
    assert "stage1.0.conv1.weight" in keys and "stage2.0.shortcut.weight" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]


def test_factory_and_bad_args():
    assert fw.create_model("wrn-16-4").width == 4
    assert fw.create_model("wrn_40_2").depth == 40
    for bad in ["resnet50", "wrn_15_2"]:
        with pytest.raises(ValueError):
            fw.create_model(bad)
    with pytest.raises(ValueError):
        fw.WideResNet(16, 0)


def test_he_normal_init():
    m = fw.WideResNet(16, 8)
    w = m.stage3[0].conv2.weight
    fan_in = w[0].numel()
    assert abs(w.std().item() - (2 / fan_in) ** 0.5) / (2 / fan_in) ** 0.5 < 0.02


@pytest.mark.parametrize("depth,width,cin", ARCHS)
@pytest.mark.parametrize("bn", ["batch", "running"])
@pytest.mark.parametrize("kind", ["random", "all_live", "single_live"])
def test_masked_equals_pruned(depth, width, cin, bn, kind):
    m = randomize_bn(fw.WideResNet(depth, width, num_classes=7, in_channels=cin))
    x, _ = batch(m, n=5, h=11, w=9)
    if kind == "random":
        mem = fw.sample_masks(m, 1, 0.6, generator=1).member(0)
    elif kind == "all_live":
        mem = {k: torch.ones(c, dtype=torch.bool) for k, c in m.node_layers().items()}
    else:
        mem = {k: torch.arange(c) == (c - 1) for k, c in m.node_layers().items()}
    small = m.prune(mem)
    assert all(small.node_layers()[k] == int(v.sum()) for k, v in mem.items())
    a, b = m(x, mem, bn=bn), small(x, bn=bn)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_pruned_in_train_mode_matches_and_trains():
    m = fw.WideResNet(10, 2, num_classes=5)
    mem = fw.sample_masks(m, 1, 0.5, generator=3).member(0)
    x, y = batch(m, n=8)
    m.train()
    small = m.prune(mem)
    assert small.training
    # Module BN (train mode, updates running stats) on both gives the same output.
    torch.testing.assert_close(m(x, mem), small(x), atol=1e-5, rtol=1e-5)
    loss = torch.nn.functional.cross_entropy(small(x), y)
    loss.backward()
    assert all(p.grad is not None for p in small.parameters())


def test_masked_channel_beta_does_not_leak():
    # A large BN shift on masked channels must not change the output.
    m = randomize_bn(fw.WideResNet(10, 2))
    mem = fw.sample_masks(m, 1, 0.5, generator=0).member(0)
    x, _ = batch(m)
    before = m(x, mem, bn="running")
    with torch.no_grad():
        for blk in m.blocks():
            blk.bn2.bias[~mem[blk.inner_set]] = 1e3
    torch.testing.assert_close(m(x, mem, bn="running"), before)


def test_forward_bad_inputs():
    m = fw.WideResNet(10, 1, in_channels=3)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        m(x)
    x = torch.randn(2, 3, 8, 8)
    good = fw.sample_masks(m, 1, 0.5).member(0)
    bad = dict(good)
    bad["stage9"] = bad.pop("stage1")
    with pytest.raises(ValueError, match="unknown node sets.*stage9"):
        m(x, bad)
    with pytest.raises(ValueError, match=r"shape \["):
        m(x, {**good, "stage1": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool"):
        m(x, {**good, "stage1": torch.ones(16)})
    with pytest.raises(ValueError, match="at least one"):
        m(x, {**good, "stage1": torch.zeros(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bn"):
        m(x, bn="group")


def test_compiles_fullgraph():
    m = fw.WideResNet(10, 1, num_classes=3).eval()
    mem = {k: v.float() for k, v in fw.sample_masks(m, 1, 0.5).member(0).items()}
    x = torch.randn(2, 3, 8, 8)
    from fastweedout.model.backend import MaskedBackend
    f = torch.compile(lambda x, mk: m.walk(MaskedBackend(mk, "batch", False), x), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, mem), m.walk(MaskedBackend(mem, "batch", False), x))
