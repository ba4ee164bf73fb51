"""Unstructured (weight-level) sparsity: mask space, scoring engines, FLOPs, training under a fixed mask."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastweedout as fw
from fastweedout.cost.flops import count_forward, counted_flops, train_step_flops
from fastweedout.engines import registry
from fastweedout.engines.grouped_weights import GroupedWeightBackend
from fastweedout.engines.scoring import auto_chunk, logits, score_weight_population
from fastweedout.masks import Masks
from fastweedout.model.masked import WeightMaskedNet, weight_sets
from fastweedout.ops import dispatch as ops
from fastweedout.spaces import weight as W
from helpers import batch, randomize_bn, state_snapshot
from tolerances import FITNESS_RTOL, TOL

ARCHS = [(10, 1, 1), (10, 2, 3)]  # WRN-10-2 has a separate stem node set and every shortcut


def tiny(depth=10, width=1, cin=1, classes=7, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(fw.WideResNet(depth, width, num_classes=classes, in_channels=cin), seed)


def assert_fitness_close(a, ref):
    assert a.dtype == torch.float32 and a.shape == ref.shape
    rel = ((a - ref).abs() / ref.abs().clamp_min(1e-6)).max().item()
    assert rel < FITNESS_RTOL, rel


def zeroed(model, member):
    """A copy of ``model`` whose masked weights are set to zero: what a weight mask means."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for k, m in member.items():
            params[k].masked_fill_(~m.reshape(params[k].shape), 0.0)
    return out


# ------------------------------------------------------------------------------------------- mask space
def test_weight_sets_are_conv_and_linear_weights_in_parameter_order():
    m = fw.WideResNet(10, 2, num_classes=5, in_channels=3)
    sets = weight_sets(m)
    expected = [n for n, p in m.named_parameters() if p.dim() in (2, 4)]
    assert list(sets) == expected
    assert sets["stem.weight"] == 3 * 16 * 9 and sets["fc.weight"] == 5 * 128
    assert {"stage1.0.shortcut.weight", "stage2.0.shortcut.weight", "stage3.0.shortcut.weight"} <= set(sets)
    assert not any("bn" in k or k.endswith("bias") for k in sets)
    params = dict(m.named_parameters())
    assert all(params[k].numel() == n for k, n in sets.items())
    # WRN-10-1: the stem feeds stage1 directly, no shortcut in the first block
    assert "stage1.0.shortcut.weight" not in weight_sets(fw.WideResNet(10, 1))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.999])
def test_layerwise_counts_are_exact_per_weight_tensor(sparsity):
    m = fw.WideResNet(10, 1, in_channels=1)
    masks = W.sample_weight_masks(m, 5, sparsity, generator=1)
    for name, n in weight_sets(m).items():
        off = min(int(math.floor(sparsity * n + 0.5)), n - 1)
        assert masks[name].shape == (5, n)
        assert (masks[name].sum(1) == n - off).all(), name


def test_global_and_schedule_counts():
    m = fw.WideResNet(10, 1, in_channels=1)
    sets = weight_sets(m)
    total = sum(sets.values())
    g = W.sample_weight_masks(m, 4, 0.7, "global", generator=3)
    live = sum(v.sum(1) for _, v in g.items())
    assert (live == total - int(math.floor(0.7 * total + 0.5))).all()
    assert all(bool(v.any(1).all()) for _, v in g.items())  # at least one live weight per tensor
    sched = W.sample_weight_masks(m, 2, {"fc.weight": 0.5}, generator=0)
    assert (sched["fc.weight"].sum(1) == sets["fc.weight"] // 2).all()
    assert all(bool(sched[k].all()) for k in sets if k != "fc.weight")


def test_member_weights_shapes_and_masks_io(tmp_path):
    m = fw.WideResNet(10, 2, in_channels=3)
    masks = W.sample_weight_masks(m, 3, 0.5, generator=0)
    params = dict(m.named_parameters())
    mw = W.member_weights(m, masks, 2)
    assert list(mw) == list(weight_sets(m))
    for k, v in mw.items():
        assert v.dtype == torch.bool and v.shape == params[k].shape
        assert torch.equal(v.flatten(), masks[k][2])
    masks.save(tmp_path / "w.pt", granularity="weight")
    back = Masks.load(tmp_path / "w.pt", weight_sets(m))
    assert back == masks and back.meta == {"granularity": "weight"}
    assert W.check_weight_masks(m, dict(back.items())) == masks  # a plain mapping works too


def test_sampling_is_deterministic():
    m = fw.WideResNet(10, 1, in_channels=1)
    a = W.sample_weight_masks(m, 4, 0.5, "global", generator=7)
    assert a == W.sample_weight_masks(m, 4, 0.5, "global", generator=torch.Generator().manual_seed(7))
    assert a != W.sample_weight_masks(m, 4, 0.5, "global", generator=8)


# ------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("depth,width,cin", ARCHS)
@pytest.mark.parametrize("bn", ["batch", "running"])
@pytest.mark.parametrize("mode,sparsity", [("layerwise", 0.0), ("layerwise", 0.6), ("layerwise", 0.999),
                                           ("global", 0.6), ("global", 0.999)])
def test_grouped_matches_loop(depth, width, cin, bn, mode, sparsity):
    m = tiny(depth, width, cin)
    x, y = batch(m, n=5, h=9, w=11)
    masks = W.sample_weight_masks(m, 3, sparsity, mode, generator=2)
    for metric in ("loss", "accuracy"):
        ref = score_weight_population(m, masks, x, y, engine="loop", bn=bn, metric=metric)
        got = score_weight_population(m, masks, x, y, engine="grouped", bn=bn, metric=metric)
        if metric == "loss":
            assert_fitness_close(got, ref)
        else:
            assert torch.equal(got, ref)
    atol, rtol = TOL[torch.float32]
    assert torch.allclose(logits(m, masks, x, space="weight", bn=bn, engine="grouped"),
                          logits(m, masks, x, space="weight", bn=bn, engine="loop"), rtol=rtol, atol=atol)


@pytest.mark.parametrize("engine", ["loop", "grouped"])
@pytest.mark.parametrize("bn", ["batch", "running"])
def test_masked_weights_equal_zeroed_weights(engine, bn):
    """A member's logits are those of the network whose masked weights are zero (the plain model)."""
    m = tiny(10, 2, 3)
    x, y = batch(m, n=4, h=8, w=8)
    masks = W.sample_weight_masks(m, 3, 0.5, "global", generator=5)
    out = logits(m, masks, x, space="weight", bn=bn, engine=engine)
    atol, rtol = TOL[torch.float32]
    for i in range(3):
        with torch.no_grad():
            ref = zeroed(m, W.member_weights(m, masks, i))(x, bn=bn)
        assert torch.allclose(out[i], ref, rtol=rtol, atol=atol)
        expect = -F.cross_entropy(ref, y)
        got = score_weight_population(m, masks.select(i), x, y, engine=engine, bn=bn)
        assert math.isclose(float(got[0]), float(expect), rel_tol=FITNESS_RTOL)


def test_all_live_masks_score_the_dense_network():
    m = tiny(10, 1, 1)
    x, y = batch(m, n=6, h=7, w=13)
    masks = W.sample_weight_masks(m, 2, 0.0)
    assert all(bool(v.all()) for _, v in masks.items())
    dense = -F.cross_entropy(m(x, bn="batch"), y)
    for engine in ("loop", "grouped"):
        f = score_weight_population(m, masks, x, y, engine=engine)
        assert torch.allclose(f, dense.expand(2), rtol=FITNESS_RTOL)


@pytest.mark.parametrize("engine", ["loop", "grouped", "auto"])
@pytest.mark.parametrize("training", [True, False])
def test_scoring_leaves_model_unchanged(engine, training):
    m = tiny(10, 2, 3).train(training)
    before, mode = state_snapshot(m)
    grads = [p.requires_grad for p in m.parameters()]
    x, y = batch(m)
    for bn in ("batch", "running"):
        score_weight_population(m, W.sample_weight_masks(m, 3, 0.5, generator=0), x, y, engine=engine, bn=bn)
    after, mode_after = state_snapshot(m)
    assert mode_after == mode == training
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in m.parameters()] == grads and all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("engine", ["loop", "grouped"])
def test_scoring_is_deterministic(engine):
    m = tiny(10, 1, 1)
    x, y = batch(m, n=8)
    f1 = score_weight_population(m, W.sample_weight_masks(m, 5, 0.6, generator=11), x, y, engine=engine)
    f2 = score_weight_population(m, W.sample_weight_masks(m, 5, 0.6, generator=11), x, y, engine=engine)
    assert torch.equal(f1, f2)


@pytest.mark.parametrize("engine", ["loop", "grouped"])
def test_chunking_does_not_change_fitness(engine):
    m = tiny(10, 2, 3)
    x, y = batch(m, n=5)
    masks = W.sample_weight_masks(m, 5, 0.5, generator=4)
    full, info = score_weight_population(m, masks, x, y, engine=engine, chunk_size=5, return_info=True)
    assert (info["engine"], info["chunk_size"]) == (engine, 5)
    for chunk in (1, 2, 3):
        part = score_weight_population(m, masks, x, y, engine=engine, chunk_size=chunk)
        assert torch.allclose(part, full, rtol=FITNESS_RTOL, atol=0)
    # a member scored alone gets its fitness inside the population
    alone = torch.cat([score_weight_population(m, masks.select(i), x, y, engine=engine) for i in range(5)])
    assert torch.allclose(alone, full, rtol=FITNESS_RTOL, atol=0)


def test_auto_engine_and_chunk():
    m = tiny(10, 1, 1)
    x, y = batch(m)
    masks = W.sample_weight_masks(m, 3, 0.5)
    _, info = score_weight_population(m, masks, x, y, return_info=True)
    assert info["engine"] == registry.choose_engine("weight", None, torch.device("cpu"))
    assert 1 <= info["chunk_size"] <= 3
    assert registry.choose_engine("weight", None, torch.device("cuda")) == "grouped"
    # the weight copies cap the grouped chunk: 2 * total weights * 4 bytes per member
    per_member = 2 * sum(weight_sets(m).values()) * 4
    assert auto_chunk(m, x, registry.get_engine("weight", "grouped"), masks, budget_bytes=per_member * 2.5) == 2
    assert auto_chunk(m, x, registry.get_engine("weight", "grouped"), masks, budget_bytes=1) == 1


@pytest.mark.parametrize("engine", ["loop", "grouped"])
def test_non_finite_fitness_becomes_minus_inf(engine):
    m = tiny(10, 1, 1)
    with torch.no_grad():
        m.fc.weight[0, 0] = math.inf
    x, y = batch(m, n=4)
    masks = W.sample_weight_masks(m, 2, 0.0)
    masks["fc.weight"][0, 0] = False  # member 0 masks the infinite weight out, member 1 keeps it
    with pytest.warns(RuntimeWarning, match="non-finite"):
        f = score_weight_population(m, masks, x, y, engine=engine)
    assert math.isfinite(float(f[0])) and float(f[1]) == -math.inf


def test_grouped_member_weights_packed_layout():
    """The K_out-contiguous layout built for the Triton conv holds the same values."""
    m = tiny(10, 2, 3)
    masks = W.sample_weight_masks(m, 3, 0.5, generator=0)
    be = GroupedWeightBackend(m, masks, "batch", torch.device("cpu"), torch.float32)
    conv = m.stage2[0].conv1
    with torch.no_grad():
        plain, packed = be.member_weight(conv), be.member_weight(conv, packed=True)
    assert packed.shape == plain.shape == (3, *conv.weight.shape) and packed.stride(1) == 1
    assert torch.equal(plain, packed)
    assert torch.equal(plain[1], conv.weight * masks["stage2.0.conv1.weight"][1].view_as(conv.weight))


def test_grouped_through_the_kernels_matches_loop():
    """The grouped engine through the Triton kernels (the GPU path; here under the interpreter)."""
    m = tiny(10, 1, 1)
    x, y = batch(m, n=2, h=5, w=6)
    masks = W.sample_weight_masks(m, 2, 0.5, generator=1)
    for bn in ("batch", "running"):
        ref = score_weight_population(m, masks, x, y, engine="loop", bn=bn)
        with ops.use_kernels(True):
            if not ops.kernels_active(x):
                pytest.skip("Triton kernels unavailable here")
            got = score_weight_population(m, masks, x, y, engine="grouped", bn=bn)
        assert_fitness_close(got, ref)


# ------------------------------------------------------------------------------------------- bad input
def test_clear_errors_for_bad_masks():
    m = fw.WideResNet(10, 1, in_channels=1)
    x, y = batch(m)
    good = W.sample_weight_masks(m, 2, 0.5)
    score = lambda masks, **kw: score_weight_population(m, masks, x, y, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="missing weight tensors.*fc.weight"):
        score({k: v for k, v in good.items() if k != "fc.weight"})
    with pytest.raises(ValueError, match="unknown weight tensors.*fc.bias"):
        score({**dict(good.items()), "fc.bias": torch.ones(2, 10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown weight tensors"):
        score(fw.sample_masks(m, 2, 0.5))  # node masks are not weight masks
    with pytest.raises(ValueError, match="'stem.weight' has 10 entries per member; the weight has 144"):
        score({**dict(good.items()), "stem.weight": torch.ones(2, 10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be a bool tensor"):
        score({**dict(good.items()), "stem.weight": torch.ones(2, 144)})
    with pytest.raises(ValueError, match="same population"):
        score({**dict(good.items()), "stem.weight": torch.ones(3, 144, dtype=torch.bool)})
    with pytest.raises(ValueError, match="Masks or a mapping"):
        score([1, 2])
    with pytest.raises(ValueError, match="engines"):
        score(good, engine="compact")
    with pytest.raises(ValueError, match="bn"):
        score(good, bn="eval")
    with pytest.raises(ValueError, match="metric"):
        score(good, metric="f1")
    with pytest.raises(ValueError, match="chunk_size"):
        score(good, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        score_weight_population(m, good, x, y[:-1])
    with pytest.raises(ValueError, match="channels"):
        score_weight_population(m, good, torch.randn(2, 3, 8, 8), y[:2])
    with pytest.raises(ValueError, match="WideResNet"):
        score_weight_population(nn.Linear(2, 2), good, x, y)
    with pytest.raises(IndexError):
        W.member_weights(m, good, 2)
    with pytest.raises(ValueError, match="engine"):
        registry.scoring_flops(m, good, 4, 8, "auto", space="weight")


def test_clear_errors_for_bad_member():
    m = fw.WideResNet(10, 1, in_channels=1)
    member = W.member_weights(m, W.sample_weight_masks(m, 2, 0.5), 0)
    with pytest.raises(ValueError, match="parameter's shape"):
        WeightMaskedNet(copy.deepcopy(m), {**member, "stem.weight": torch.ones(16, 1, 3, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="missing weight tensors"):
        W.weight_training_flops(m, {k: v for k, v in member.items() if k != "stem.weight"}, 8)
    with pytest.raises(ValueError, match="population of 2"):
        W.weight_forward_flops(m, W.sample_weight_masks(m, 2, 0.5), 8)
    with pytest.raises(ValueError, match="bool"):
        WeightMaskedNet(copy.deepcopy(m), {k: v.float() for k, v in member.items()})


# ------------------------------------------------------------------------------------------------- FLOPs
def one_live_per_tensor(model):
    """A one-member weight mask keeping exactly the first weight of every tensor."""
    out = {}
    for k, n in weight_sets(model).items():
        row = torch.zeros(1, n, dtype=torch.bool)
        row[0, 0] = True
        out[k] = row
    return Masks(out)


@pytest.mark.parametrize("depth,width,cin", ARCHS)
def test_useful_flops_by_hand(depth, width, cin):
    """With one live weight per tensor, a conv weight costs 2*H_out*W_out per image, the linear one 2."""
    m = fw.WideResNet(depth, width, num_classes=5, in_channels=cin)
    h, w = 11, 9
    s2 = (((h - 1) // 2 + 1) * ((w - 1) // 2 + 1))  # after the first stride-2 stage
    s3 = (((h - 1) // 4 + 1) * ((w - 1) // 4 + 1))
    convs = {1: h * w, 2: s2, 3: s3}
    n = (depth - 4) // 6
    expect = 2 * h * w  # stem
    for stage, hw in convs.items():
        for b in range(n):
            blk = getattr(m, f"stage{stage}")[b]
            expect += 2 * hw * (2 + (blk.shortcut is not None))  # conv1 (strided), conv2, shortcut
    expect += 2  # fc
    member = one_live_per_tensor(m)
    assert W.weight_forward_flops(m, member, (h, w)) == expect
    f = registry.scoring_flops(m, member, 3, (h, w), "loop", space="weight")
    assert f["useful"] == 3 * expect and f["executed"] == 3 * count_forward(m, (h, w)).total
    t = W.weight_training_flops(m, member, (h, w))
    assert t["useful"] == 3 * expect - 2 * h * w and t["executed"] == train_step_flops(m, (h, w))


def test_useful_flops_add_up_over_members_and_match_dense():
    m = fw.WideResNet(10, 2, in_channels=3)
    masks = W.sample_weight_masks(m, 4, 0.6, "global", generator=0)
    f = registry.scoring_flops(m, masks, 5, 12, "grouped", space="weight")
    per = [W.weight_forward_flops(m, W.member_weights(m, masks, i), 12) for i in range(4)]
    assert f["useful"] == 5 * sum(per)
    dense = weight_sets(m)
    assert W.weight_forward_flops(m, {k: torch.ones(n, dtype=torch.bool) for k, n in dense.items()}, 12) \
        == count_forward(m, 12).total
    assert 0.3 < f["useful"] / f["executed"] < 0.5  # about 40% of the weights live


@pytest.mark.parametrize("engine", ["loop", "grouped"])
def test_executed_flops_match_flop_counter(engine):
    m = tiny(10, 2, 3)
    x, y = batch(m, n=3, h=10, w=7)
    for sparsity in (0.0, 0.7):
        masks = W.sample_weight_masks(m, 3, sparsity, generator=1)
        counted, _ = counted_flops(score_weight_population, m, masks, x, y, engine=engine, chunk_size=2)
        f = registry.scoring_flops(m, masks, 3, (10, 7), engine, space="weight")
        assert counted == f["executed"]
        if sparsity == 0.0:
            assert f["useful"] == f["executed"]


def test_training_flops_match_flop_counter():
    m = tiny(10, 1, 1)
    x, y = batch(m, n=4, h=8, w=8)
    member = W.member_weights(m, W.sample_weight_masks(m, 1, 0.5), 0)
    net = WeightMaskedNet(copy.deepcopy(m), member)

    def step():
        F.cross_entropy(net(x), y).backward()

    counted, _ = counted_flops(step)
    f = W.weight_training_flops(m, member, 8)
    assert counted == 4 * f["executed"]
    assert f["useful"] < f["executed"]
    dense = W.weight_training_flops(m, {k: torch.ones_like(v) for k, v in member.items()}, 8)
    assert dense["useful"] == dense["executed"]


# -------------------------------------------------------------------------------------- WeightMaskedNet
def sgd(net, nesterov=True):
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)


@pytest.mark.parametrize("nesterov", [True, False])
def test_masked_weights_stay_zero_through_sgd(nesterov):
    m = tiny(10, 2, 3)
    member = W.member_weights(m, W.sample_weight_masks(m, 1, 0.6, "global", generator=3), 0)
    net = WeightMaskedNet(copy.deepcopy(m), member)
    params = dict(net.net.named_parameters())
    start = {k: p.detach().clone() for k, p in params.items()}
    assert all(bool((params[k][~v] == 0).all()) and torch.equal(params[k][v], start[k][v])
               for k, v in member.items())
    opt = sgd(net, nesterov)
    net.train()
    for s in range(4):
        x, y = batch(m, n=6, seed=s)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for k, v in member.items():
            assert bool((params[k].grad[~v] == 0).all()), k
        opt.step()
    for k, v in member.items():
        assert bool((params[k][~v] == 0).all()), k
        assert bool((opt.state[params[k]]["momentum_buffer"][~v] == 0).all()), k
        assert not torch.equal(params[k][v], start[k][v]), k  # the live weights did train
    # BN ran in training mode on the held network: its running statistics moved
    assert not torch.equal(net.net.bn.running_mean, m.bn.running_mean)


@pytest.mark.parametrize("bn", [None, "batch", "running"])
def test_masked_net_forward_export_and_scoring_agree(bn):
    m = tiny(10, 1, 1)
    masks = W.sample_weight_masks(m, 1, 0.5, generator=9)
    held = copy.deepcopy(m)
    net = WeightMaskedNet(held, masks)  # a Masks of one member works too
    assert net.net is held and list(held.state_dict()) == list(m.state_dict())
    x, _ = batch(m, n=4)
    net.eval()
    out = net(x, bn=bn)
    plain = net.export()
    assert type(plain) is fw.WideResNet and plain is not held and not plain.training
    atol, rtol = TOL[torch.float32]
    assert torch.allclose(plain(x, bn=bn), out, rtol=rtol, atol=atol)
    if bn is not None:
        assert torch.allclose(logits(m, masks, x, space="weight", bn=bn)[0], out, rtol=rtol, atol=atol)
    params = dict(plain.named_parameters())
    assert all(torch.equal(params[k] == 0, ~v | (params[k] == 0))
               for k, v in W.member_weights(m, masks, 0).items())
    assert all(torch.equal(mk, v.to(mk.dtype)) for mk, v in zip(net.masks().values(),
                                                                   W.member_weights(m, masks, 0).values()))
    net.to(memory_format=torch.channels_last)  # as the trainer does: the mask buffers follow
    cl = net(x.contiguous(memory_format=torch.channels_last), bn=bn)
    assert torch.allclose(cl, out, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_masked_net_under_torch_compile(backend):
    """Dynamo traces the functional_call forward (aot_eager: tracing and autograd without code generation,
    seconds; inductor: the default backend, about a minute of C++ compilation on 2 cores when cold)."""
    m = tiny(10, 1, 1)
    member = W.member_weights(m, W.sample_weight_masks(m, 1, 0.5, generator=0), 0)
    eager = WeightMaskedNet(copy.deepcopy(m), member)
    compiled_net = WeightMaskedNet(copy.deepcopy(m), member)
    fwd = torch.compile(compiled_net, backend=backend)
    x, y = batch(m, n=4, h=8, w=8)
    losses = []
    for net, f in ((eager, eager), (compiled_net, fwd)):
        net.train()
        opt = sgd(net)
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(f(x), y)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert math.isclose(losses[0], losses[1], rel_tol=1e-4)
    params = dict(compiled_net.net.named_parameters())
    assert all(bool((params[k][~v] == 0).all()) for k, v in member.items())


# ------------------------------------------------------------------------------------------ the search
def test_random_search_over_weight_masks():
    """The search's sampling, selection and mutation work on weight masks unchanged."""
    m = tiny(10, 1, 1, classes=10)
    x, y = batch(m, n=16, h=8, w=8)
    sets = weight_sets(m)
    for strategy in ("random", "evolution"):
        cfg = fw.SearchConfig(population=4, generations=2, batch_size=8, strategy=strategy)
        res = fw.random_search(m, x, y, cfg, sparsity=0.5, granularity="weight", seed=0)
        W.check_weight_masks(m, res.winner)
        assert res.winner.population == 1 and res.flops_useful < res.flops_executed
        for k, n in sets.items():
            assert int(res.winner[k].sum()) == n - int(math.floor(0.5 * n + 0.5)), k
