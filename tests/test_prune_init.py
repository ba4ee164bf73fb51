"""Pruning at initialisation (l1, snip, grasp, synflow): each method against a hand computation on a
tiny network, exact sparsity, determinism, the model left unchanged, bad input."""

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import fastweedout as fw
from fastweedout.cost.flops import count_forward, counted_flops
from fastweedout.model.backend import MaskedBackend
from fastweedout.search.prune_init import (
    METHODS,
    PruneConfig,
    keep_top,
    node_scores,
    off_counts,
    prune_at_init,
)
from helpers import batch, randomize_bn, state_snapshot

FAST = PruneConfig(iterations=4)
F64 = dict(dtype=torch.float64)


def tiny(width: int, seed: int = 0, double: bool = False) -> fw.WideResNet:
    """WRN-10-1 on 1x8x8 images (the stem is stage1) or WRN-10-2 on 3x6x6 (a separate stem set)."""
    torch.manual_seed(seed)
    m = randomize_bn(fw.WideResNet(10, width, num_classes=5, in_channels=1 if width == 1 else 3), seed)
    return m.double() if double else m


def data(m, n=6, seed=0, dtype=torch.float32):
    hw = 8 if m.width == 1 else 6
    x, y = batch(m, n, hw, hw, seed)
    return x.to(dtype), y


def float_masks(m, value=1.0):
    return OrderedDict((k, torch.full((c,), value, **F64)) for k, c in m.node_layers().items())


def loss_of(m, fm, x, y, bn="batch", temperature=1.0):
    """The reference masked network's loss at float masks (no code of prune_init)."""
    return F.cross_entropy(m.walk(MaskedBackend(fm, bn, False), x) / temperature, y)


def nudged(fm, name, c, eps):
    out = OrderedDict((k, v.clone()) for k, v in fm.items())
    out[name][c] += eps
    return out


def central_difference(fn, fm, name, i, eps=1e-6) -> float:
    """d fn / d m[name][i] by central differences (a small step: ReLU kinks are close in tiny batches)."""
    with torch.no_grad():
        return float((fn(nudged(fm, name, i, eps)) - fn(nudged(fm, name, i, -eps))) / (2 * eps))


def probe(c):  # a few channels of a node set: the first, a middle and the last
    return sorted({0, c // 2, c - 1})


# ------------------------------------------------------------------------ each method, by hand
@pytest.mark.parametrize("width", [1, 2])
def test_l1_is_the_filter_norm_of_the_stream_opening_conv(width):
    m = tiny(width)
    src = {"stage1.block0": m.stage1[0].conv1.weight, "stage2.block0": m.stage2[0].conv1.weight,
           "stage3.block0": m.stage3[0].conv1.weight, "stage2": m.stage2[0].shortcut.weight,
           "stage3": m.stage3[0].shortcut.weight}
    if width == 1:  # the stem writes stage1 (identity shortcut): the stem's filters decide it
        src["stage1"] = m.stem.weight
    else:  # a separate stem set; stage1 opens with a projection shortcut
        src["stem"], src["stage1"] = m.stem.weight, m.stage1[0].shortcut.weight
    s = node_scores("l1", m)
    assert list(s) == list(m.node_layers())
    for name, w in src.items():
        norms = torch.tensor([float(w[c].detach().abs().sum()) for c in range(w.shape[0])], **F64)
        torch.testing.assert_close(s[name], norms / norms.mean(), rtol=1e-6, atol=0)
    mask, info = prune_at_init("l1", m, 0.5)
    for name, w in src.items():
        keep = w.shape[0] - math.floor(0.5 * w.shape[0] + 0.5)
        top = w.abs().sum(dim=(1, 2, 3)).argsort(descending=True)[:keep]
        assert sorted(mask[name][0].nonzero().flatten().tolist()) == sorted(top.tolist())
    assert info["flops"] == 0  # norms only: no convolution or linear layer runs


@pytest.mark.parametrize("width,bn", [(1, "batch"), (2, "batch"), (1, "running")])
def test_snip_is_the_loss_sensitivity_by_central_differences(width, bn):
    m = tiny(width, double=True)
    x, y = data(m, dtype=torch.float64)
    s = node_scores("snip", m, x, y, config=PruneConfig(bn=bn))
    fm = float_masks(m)
    for name, c in m.node_layers().items():
        for i in probe(c):
            fd = central_difference(lambda f: loss_of(m, f, x, y, bn), fm, name, i)
            assert float(s[name][i]) == pytest.approx(abs(fd), rel=1e-4, abs=1e-9), (name, i)


def test_snip_at_a_mask_scores_masked_nodes_zero():
    m = tiny(1, double=True)
    x, y = data(m, dtype=torch.float64)
    member = fw.sample_masks(m, 1, 0.5, generator=3).member(0)
    s = node_scores("snip", m, x, y, masks=member)
    fm = OrderedDict((k, v.double()) for k, v in member.items())
    for name in m.node_layers():
        assert (s[name][~member[name]] == 0).all()
        i = int(member[name].nonzero()[0])
        fd = central_difference(lambda f: loss_of(m, f, x, y), fm, name, i)
        assert float(s[name][i]) == pytest.approx(abs(fd), rel=1e-4, abs=1e-9)


def _grad(m, fm, x, y, temperature):
    ms = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in fm.items())
    gs = torch.autograd.grad(loss_of(m, ms, x, y, temperature=temperature), list(ms.values()))
    return torch.cat(gs)


@pytest.mark.parametrize("width,temperature", [(1, 3.0), (2, 200.0)])
def test_grasp_is_m_times_hessian_gradient_by_differences_of_the_gradient(width, temperature):
    m = tiny(width, double=True)
    x, y = data(m, dtype=torch.float64)
    imp = node_scores("grasp", m, x, y, config=PruneConfig(temperature=temperature))
    fm = float_masks(m)
    flat = torch.cat(list(fm.values()))
    g = _grad(m, fm, x, y, temperature)
    eps = 1e-4 / float(g.abs().max())

    def at(v):
        out, start = OrderedDict(), 0
        for k, c in m.node_layers().items():
            out[k] = v[start:start + c]
            start += c
        return out

    hg = (_grad(m, at(flat + eps * g), x, y, temperature) - _grad(m, at(flat - eps * g), x, y, temperature)) / (2 * eps)
    got = torch.cat(list(imp.values()))
    torch.testing.assert_close(got, flat * hg, rtol=1e-5, atol=1e-7 * float(hg.abs().max()))
    # Kept: the highest importance, i.e. the LOWEST S(-m) = -m * Hg, as the official code keeps.
    mask, _ = prune_at_init("grasp", m, 0.5, "layerwise", x, y, config=PruneConfig(temperature=temperature))
    s_score = at(-flat * hg)
    for name in m.node_layers():
        kept, gone = s_score[name][mask[name][0]], s_score[name][~mask[name][0]]
        assert float(kept.max()) <= float(gone.min()) + 1e-9 * float(hg.abs().max())


def hand_synflow_R(m, fm, hw):
    """R = sum of the logits of the linearised network (|every parameter and BN statistic|, running BN, float64),
    on an all-ones input, written out with F.conv2d."""
    sd = {k: v.detach().double().abs() for k, v in m.state_dict().items()}

    def act(x, bn, name):
        v = lambda a: sd[f"{bn}.{a}"].view(1, -1, 1, 1)  # noqa: E731
        y = (x - v("running_mean")) / torch.sqrt(v("running_var") + 1e-5) * v("weight") + v("bias")
        return torch.relu(y) * fm[name].view(1, -1, 1, 1)

    x = F.conv2d(torch.ones(1, m.in_channels, *hw, **F64), sd["stem.weight"], padding=1)
    for s in (1, 2, 3):
        for b, blk in enumerate(getattr(m, f"stage{s}")):
            p = f"stage{s}.{b}"
            o = act(x, f"{p}.bn1", blk.in_set)
            sc = x if blk.shortcut is None else F.conv2d(o, sd[f"{p}.shortcut.weight"], stride=blk.stride)
            h = act(F.conv2d(o, sd[f"{p}.conv1.weight"], stride=blk.stride, padding=1), f"{p}.bn2", blk.inner_set)
            x = F.conv2d(h, sd[f"{p}.conv2.weight"], padding=1) + sc
    o = act(x, "bn", "stage3")
    return (o.mean(dim=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]).sum()


@pytest.mark.parametrize("width,sparse", [(1, False), (2, False), (1, True)])
def test_synflow_is_m_times_dR_dm_of_the_linearised_network(width, sparse):
    m = tiny(width)  # float32 parameters: synflow works on a float64 copy
    hw = (8, 8) if width == 1 else (6, 6)
    member = fw.sample_masks(m, 1, 0.4, generator=1).member(0) if sparse else None
    s = node_scores("synflow", m, image_size=hw, masks=member)
    fm = float_masks(m) if member is None else OrderedDict((k, v.double()) for k, v in member.items())
    for name, c in m.node_layers().items():
        for i in range(c) if width == 1 else probe(c):
            fd = central_difference(lambda f: hand_synflow_R(m, f, hw), fm, name, i, eps=1e-4)
            assert float(s[name][i]) == pytest.approx(abs(float(fm[name][i] * fd)), rel=1e-7, abs=1e-12), (name, i)
    # Data-free: the images' values never matter, only their shape.
    x, _ = data(m)
    for k, v in node_scores("synflow", m, x * 7 - 3, masks=member).items():
        assert torch.equal(v, s[k])


def test_synflow_rounds_follow_the_exponential_schedule():
    m, eta, n = tiny(1), 0.7, 4
    layers = m.node_layers()
    mask, info = prune_at_init("synflow", m, eta, images=data(m)[0], config=PruneConfig(iterations=n), generator=5)
    assert info["rounds"] == n
    g = torch.Generator().manual_seed(5)
    ref = fw.sample_masks(m, 1, 0.0)
    for k in range(1, n + 1):  # keep (1-eta)^(k/n) after round k; masked nodes stay masked
        live = ref.member(0)
        s = node_scores("synflow", m, image_size=8, masks=live)
        s = {name: v.masked_fill(~live[name], float("-inf")) for name, v in s.items()}
        ref_next = keep_top(layers, s, eta if k == n else 1 - (1 - eta) ** (k / n), generator=g)
        assert all(bool((ref_next[name] <= ref[name]).all()) for name in layers)
        ref = ref_next
    assert mask == ref
    one, _ = prune_at_init("synflow", m, eta, image_size=8, config=PruneConfig(iterations=1))
    assert one == keep_top(layers, node_scores("synflow", m, image_size=8), eta, generator=0)


def test_synflow_last_round_is_exactly_eta():
    m, eta = tiny(1), 51 / 448  # 224 nodes: eta*N = 25.5, while (1 - (1 - eta)) * N rounds to 25
    mask, _ = prune_at_init("synflow", m, eta, "global", image_size=8, config=PruneConfig(iterations=3))
    assert mask.sparsity() * 224 == pytest.approx(26) == off_counts(m.node_layers(), eta, "global")


# ---------------------------------------------------------------------------- sparsity and ties
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["layerwise", "global"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 0.8, 0.999])
def test_exactly_weedouts_sparsity(method, mode, eta):
    m = tiny(2)
    x, y = data(m)
    mask, info = prune_at_init(method, m, eta, mode, x, y, config=FAST)
    ref = fw.sample_masks(m, 1, eta, mode, generator=0)
    got, want = mask.live_counts(), ref.live_counts()
    if mode == "layerwise":
        assert all(int(got[k]) == int(want[k]) for k in got)
    else:
        assert sum(int(v) for v in got.values()) == sum(int(v) for v in want.values())
    assert all(int(v) >= 1 for v in got.values())  # never an empty node set, even at eta near 1
    if eta == 0.0:
        assert mask == ref and info["flops"] == 0  # nothing to prune: no scoring
    assert torch.isfinite(m(x, mask.member(0))).all()


def test_layerwise_schedule_counts():
    m = tiny(1)
    sched = {"stage2": 0.75, "stage3.block0": 0.5}
    mask, _ = prune_at_init("synflow", m, sched, image_size=8, config=FAST)
    assert fw.sample_masks(m, 1, sched).live_counts() == mask.live_counts()
    assert off_counts(m.node_layers(), sched)["stage2"] == 24


def test_keep_top_ranks_breaks_ties_by_seed_and_keeps_one_per_set_globally():
    layers = OrderedDict([("a", 4), ("b", 6)])
    scores = {"a": torch.tensor([0.1, 0.4, 0.3, 0.2]), "b": torch.tensor([9.0, 1.0, 8.0, 7.0, 2.0, 3.0])}
    lw = keep_top(layers, scores, 0.5)
    assert lw["a"][0].tolist() == [False, True, True, False]
    assert lw["b"][0].tolist() == [True, False, True, True, False, False]
    gl = keep_top(layers, scores, 0.8, "global")  # 8 of 10 off: b's best and a's best survive
    assert gl["a"][0].tolist() == [False, True, False, False]
    assert gl["b"][0].tolist() == [True, False, False, False, False, False]
    ties = {"a": torch.zeros(4), "b": torch.zeros(6)}
    draws = {tuple(torch.cat([keep_top(layers, ties, 0.5, generator=s)[k][0] for k in layers]).tolist())
             for s in range(8)}
    assert len(draws) > 1  # ties do not favour low indices
    assert keep_top(layers, ties, 0.5, generator=3) == keep_top(layers, ties, 0.5, generator=3)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    m = tiny(1)
    x, y = data(m)
    a, _ = prune_at_init(method, m, 0.6, "layerwise", x, y, config=FAST, generator=2)
    b, _ = prune_at_init(method, m, 0.6, "layerwise", x, y, config=FAST, generator=2)
    assert a == b and a.population == 1
    sa, sb = node_scores(method, m, x, y), node_scores(method, m, x, y)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("training", [True, False])
def test_model_left_unchanged(method, training):
    m = tiny(2).train(training)
    x, y = data(m)
    before, mode = state_snapshot(m)
    flags = [(mod.training, [p.requires_grad for p in mod.parameters(recurse=False)]) for mod in m.modules()]
    prune_at_init(method, m, 0.5, "global", x, y, config=FAST)
    node_scores(method, m, x, y)
    after, mode2 = state_snapshot(m)
    assert mode == mode2 and list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [(mod.training, [p.requires_grad for p in mod.parameters(recurse=False)]) for mod in m.modules()]
    assert all(p.grad is None for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in m.parameters())


# --------------------------------------------------------------------------------- cost, batch
def test_flops_are_counted_and_no_weight_gradient_is_computed():
    m = tiny(1)
    x, y = data(m, n=6)
    c = count_forward(m, 8)
    _, snip = prune_at_init("snip", m, 0.5, "layerwise", x, y)
    assert snip["flops"] == 6 * (2 * c.total - c.stem)  # forward + grad-input (no weight grads, no stem input)
    _, syn = prune_at_init("synflow", m, 0.5, image_size=8, config=FAST)
    assert syn["flops"] == 4 * (2 * c.total - c.stem)  # one all-ones image per round
    _, grasp = prune_at_init("grasp", m, 0.5, "layerwise", x, y)
    assert grasp["flops"] > snip["flops"]  # the Hessian-gradient product: a second backward
    # Counted on a meta copy: exactly what FlopCounterMode counts around the real passes.
    assert counted_flops(node_scores, "grasp", m, x, y)[0] == grasp["flops"]
    assert counted_flops(node_scores, "synflow", m, image_size=8)[0] * 4 == syn["flops"]
    for info in (snip, syn, grasp):
        assert info["wall_s"] > 0 and info["rounds"] == (4 if info is syn else 1)


def test_batch_size_takes_the_first_images():
    m = tiny(1)
    x, y = data(m, n=9)
    cfg = PruneConfig(batch_size=5)
    a = node_scores("snip", m, x, y, config=cfg)
    b = node_scores("snip", m, x[:5], y[:5])
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, info = prune_at_init("snip", m, 0.5, "layerwise", x, y, config=cfg)
    assert info["images"] == 5


# ------------------------------------------------------------------------------------ bad input
def test_bad_input():
    m = tiny(1)
    x, y = data(m)
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_at_init("magnitude", m, 0.5, images=x, labels=y)
    with pytest.raises(ValueError, match="unknown pruning method"):
        node_scores("random", m)
    for eta in (-0.1, 1.0, float("nan"), "half"):
        with pytest.raises(ValueError, match="sparsity"):
            prune_at_init("l1", m, eta)
    with pytest.raises(ValueError, match="mode"):
        prune_at_init("l1", m, 0.5, "per-layer")
    with pytest.raises(ValueError, match="global sparsity takes one number"):
        prune_at_init("l1", m, {"stage1": 0.5}, "global")
    for method in ("snip", "grasp"):
        with pytest.raises(ValueError, match="validation batch"):
            prune_at_init(method, m, 0.5)
        with pytest.raises(ValueError, match="validation batch"):
            node_scores(method, m, x)
    with pytest.raises(ValueError, match="synflow needs the input's shape"):
        prune_at_init("synflow", m, 0.5)
    with pytest.raises(ValueError, match="image_size"):
        node_scores("synflow", m, image_size=(8, 0))
    with pytest.raises(ValueError, match=r"images must be a tensor \[B, 1, H, W\]"):
        prune_at_init("snip", m, 0.5, images=torch.randn(6, 3, 8, 8), labels=y)
    with pytest.raises(ValueError, match=r"images must be a tensor"):
        node_scores("synflow", m, torch.randn(8, 8))
    with pytest.raises(ValueError, match="labels must be a tensor"):
        prune_at_init("grasp", m, 0.5, images=x, labels=y[:4])
    with pytest.raises(ValueError, match="integer class indices"):
        node_scores("snip", m, x, y.float())
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        node_scores("snip", m, x, y + 5)
    with pytest.raises(ValueError, match="config must be a PruneConfig"):
        node_scores("snip", m, x, y, config={"batch_size": 4})
    with pytest.raises(ValueError, match="must have shape"):
        node_scores("snip", m, x, y, masks={k: torch.ones(c + 1, dtype=torch.bool) for k, c in m.node_layers().items()})
    with pytest.raises(ValueError, match="model must be a fastweedout WideResNet"):
        prune_at_init("l1", torch.nn.Linear(3, 3), 0.5)
    for bad in (dict(batch_size=0), dict(iterations=0), dict(temperature=0.0), dict(bn="train")):
        with pytest.raises(ValueError):
            PruneConfig(**bad)
    layers = m.node_layers()
    with pytest.raises(ValueError, match="missing node sets"):
        keep_top(layers, {"stage1": torch.zeros(16)}, 0.5)
    bad_shape = {k: torch.zeros(c) for k, c in layers.items()} | {"stage2": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"scores of 'stage2' must be a tensor of shape \[32\]"):
        keep_top(layers, bad_shape, 0.5)
    nan = {k: torch.zeros(c) for k, c in layers.items()} | {"stage3": torch.full((64,), float("nan"))}
    with pytest.raises(ValueError, match="NaN"):
        keep_top(layers, nan, 0.5)
