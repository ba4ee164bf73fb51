import pytest
import torch

import fastweedout as fw
from helpers import batch


def _val(m, n=40):
    return batch(m, n=n, h=8, w=8, seed=5)


def search(m, x, y, *, sparsity=0.5, mode="layerwise", seed=0, checkpoint=None, **config):
    """random_search with the SearchConfig fields as keywords."""
    return fw.random_search(m, x, y, fw.SearchConfig(**config), sparsity=sparsity, mode=mode, seed=seed,
                            checkpoint=checkpoint)


@pytest.mark.parametrize("engine", ["loop", "folded", "compact"])
def test_random_search_elitism_and_result(engine):
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = _val(m)
    r = search(m, x, y, population=6, generations=4, sparsity=0.5, batch_size=16,
                         engine=engine, seed=3)
    assert r.fitness.shape == (4, 6) and len(r.best_fitness) == 4 == len(r.mean_fitness)
    assert r.winner.population == 1 and r.winner.is_uniform()
    assert r.engine == engine and r.wall_time_s > 0
    assert r.flops_useful > 0 and r.flops_executed > 0
    if engine == "loop":  # full-width convs for every member
        assert r.flops_executed > r.flops_useful
    # Elitism: from generation 1 on, member 0 is the previous generation's winner.
    masks_ok = r.winner.sparsity() == pytest.approx(0.5, abs=0.05)
    assert masks_ok
    for g in range(4):
        assert r.best_fitness[g] == pytest.approx(float(r.fitness[g].max()))
    assert r.summary()["fitness"] == r.fitness.tolist()


def test_same_seed_same_winner_across_engines():
    m = fw.WideResNet(10, 2, num_classes=4)
    x, y = _val(m)
    kw = dict(population=8, generations=3, sparsity=0.6, batch_size=20, seed=11)
    a = search(m, x, y, engine="loop", **kw)
    b = search(m, x, y, engine="compact", **kw)
    c = search(m, x, y, engine="loop", **kw)
    assert a.winner == b.winner == c.winner
    assert torch.equal(a.fitness, c.fitness)
    assert torch.equal(a.fitness.argsort(dim=1), b.fitness.argsort(dim=1))
    d = search(m, x, y, engine="loop", **{**kw, "seed": 12})
    assert not torch.equal(a.fitness, d.fitness)


def test_elite_is_rescored_and_kept():
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = _val(m)
    r = search(m, x, y, population=5, generations=3, sparsity=0.5, batch_size=10, seed=0,
                         engine="loop")
    # Re-score the final winner on a fresh batch alone vs. in the population: equal by construction,
    # and the winner of generation g (g>0) is either the elite (index 0) or a new member.
    assert all(0 <= i < 5 for i in r.elite_index)


def test_population_of_one_and_single_generation():
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = _val(m)
    r = search(m, x, y, population=1, generations=3, sparsity=0.3, batch_size=8)
    assert r.fitness.shape == (3, 1) and r.elite_index == [0, 0, 0]
    r = search(m, x, y, population=3, generations=1, sparsity=0.3, batch_size=8)
    assert r.fitness.shape == (1, 3)


def test_resume_from_checkpoint(tmp_path):
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = _val(m)
    kw = dict(population=5, generations=4, sparsity=0.5, batch_size=12, seed=7, engine="loop")
    full = search(m, x, y, **kw)
    ck = tmp_path / "search.pt"
    search(m, x, y, **{**kw, "generations": 4}, checkpoint=ck)
    again = search(m, x, y, **kw, checkpoint=ck)  # all done: nothing re-run
    assert again.winner == full.winner and torch.equal(again.fitness, full.fitness)
    # Interrupted after 2 generations: simulate by running a 2-generation search's state.
    ck2 = tmp_path / "s2.pt"
    import fastweedout.search.weedout as S
    calls = []
    real = S.score

    def boom(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    S.score = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            search(m, x, y, **kw, checkpoint=ck2)
    finally:
        S.score = real
    resumed = search(m, x, y, **kw, checkpoint=ck2)
    assert resumed.winner == full.winner and torch.equal(resumed.fitness, full.fitness)
    with pytest.raises(ValueError, match="different search configuration"):
        search(m, x, y, **{**kw, "seed": 8}, checkpoint=ck2)


def test_all_nan_is_an_error_and_nan_members_never_win():
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = _val(m)
    with torch.no_grad():
        m.fc.bias[0] = float("nan")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="NaN"):
        search(m, x, y, population=3, generations=1, sparsity=0.2, batch_size=8)


@pytest.mark.parametrize("kw,msg", [
    (dict(population=0), "population"), (dict(generations=0), "generations"),
    (dict(sparsity=1.0), "sparsity"), (dict(batch_size=1000), "search batch"),
    (dict(batch_size=0), "batch_size"), (dict(strategy="gradient"), "strategy"),
    (dict(mode="weird"), "mode"), (dict(engine="x"), "engine"),
])
def test_bad_search_args(kw, msg):
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = _val(m)
    args = dict(population=3, generations=1, sparsity=0.5, batch_size=8)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        search(m, x, y, **args)
    with pytest.raises(ValueError, match="SearchConfig"):
        fw.random_search(m, x, y, {"population": 3})


def test_random_mask_control():
    m = fw.WideResNet(10, 2)
    a, b = fw.random_mask(m, 0.4, seed=1), fw.random_mask(m, 0.4, seed=1)
    assert a == b and a.population == 1


@pytest.mark.parametrize("strategy", ["tournament", "evolution"])
def test_mutation_strategies_keep_sparsity_and_elite(strategy):
    m = fw.WideResNet(10, 2, num_classes=4)
    x, y = _val(m)
    kw = dict(population=6, generations=3, sparsity=0.5, batch_size=12, seed=1, engine="loop",
              strategy=strategy)
    r = search(m, x, y, **kw)
    assert r.fitness.shape == (3, 6) and r.winner.is_uniform()
    counts = fw.sample_masks(m, 1, 0.5).live_counts()
    assert all(int(r.winner.live_counts()[k][0]) == int(c[0]) for k, c in counts.items())
    again = search(m, x, y, **kw)
    assert again.winner == r.winner and torch.equal(again.fitness, r.fitness)


def test_mutate_swaps_within_layers():
    from fastweedout.search.strategies import mutate
    m = fw.WideResNet(10, 2)
    parent = fw.sample_masks(m, 1, 0.5, generator=0)
    kids = mutate(parent, 4, 0.25, torch.Generator().manual_seed(0))
    for k in parent:
        assert (kids[k].sum(1) == parent[k].sum()).all()
        diff = (kids[k] != parent[k]).sum(1)
        assert (diff > 0).all() and (diff % 2 == 0).all()


def test_member_steps_train_each_member_before_scoring():
    from fastweedout.search.member_steps import StepStream

    data = fw.load_dataset("synthetic", synthetic=dict(train_size=96, test_size=16, val_size=24, image_size=8))
    m = fw.WideResNet(10, 1, num_classes=10, in_channels=1)
    x = (data.val.images.float() / 255 - data.mean[0]) / data.std[0]
    y = data.val.labels
    stream = StepStream(data.train, steps=2, batch_size=16, mean=data.mean, std=data.std, augment="none", seed=0)
    kw = dict(population=3, generations=2, batch_size=24, sparsity=0.5, seed=1)
    cfg = fw.SearchConfig(member_steps=2, member_batch=16, **{k: kw[k] for k in ("population", "generations",
                                                                                "batch_size")})
    a = fw.random_search(m, x, y, cfg, sparsity=0.5, seed=1, train_stream=stream)
    b = fw.random_search(m, x, y, cfg, sparsity=0.5, seed=1, train_stream=stream)
    plain = search(m, x, y, **kw)
    assert a.winner == b.winner and torch.equal(a.fitness, b.fitness)  # deterministic
    assert not torch.allclose(a.fitness, plain.fitness)  # the steps changed the scores
    assert a.engine == "member-steps" and a.flops_useful > plain.flops_useful  # the steps are paid for (CPU path)
    # Member i's fitness equals its pruned network trained alone on the same batches, then scored.
    from fastweedout.search.member_steps import train_member
    pop = fw.sample_masks(m, 3, 0.5, generator=1)
    idx = torch.randperm(24, generator=torch.Generator().manual_seed(1 + 0x5EED))[:24]
    torch.manual_seed(2 * 7919 + 0)
    net = train_member(m, pop.member(0), stream, cfg.member_lr)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(net(x[idx], bn="batch"), y[idx])
    assert float(a.fitness[0, 0]) == pytest.approx(-float(loss), rel=1e-5)
    with pytest.raises(ValueError, match="train_stream"):
        fw.random_search(m, x, y, cfg, sparsity=0.5)


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_member_steps_batched_equals_one_member_at_a_time(metric):
    """The stacked (vmap) training of members gives each member's fitness as training it alone does;
    global masks (members of different shapes), running BN and dropout take the one-at-a-time path."""
    from fastweedout.search.member_steps import (
        StepStream,
        batched_fitness,
        batched_ok,
        one_at_a_time,
        score_after_steps,
        use_batched,
    )

    data = fw.load_dataset("synthetic", synthetic=dict(train_size=96, test_size=16, val_size=24, image_size=8))
    m = fw.WideResNet(10, 2, num_classes=10, in_channels=1)
    x = (data.val.images.float() / 255 - data.mean[0]) / data.std[0]
    y = data.val.labels
    stream = StepStream(data.train, steps=3, batch_size=16, mean=data.mean, std=data.std, augment="none", seed=0)
    cfg = fw.SearchConfig(member_steps=3, member_batch=16, member_lr=0.05, metric=metric)
    for sparsity in (0.0, 0.4, 0.9):  # all live, some, a single live channel in the narrow node sets
        pop = fw.sample_masks(m, 5, sparsity, generator=3)
        assert batched_ok(m, pop, cfg) and not use_batched(m, pop, cfg)  # eligible; on a CPU the loop is faster
        batched, _ = batched_fitness(m, pop, x, y, stream, cfg)
        alone = one_at_a_time(m, pop, x, y, stream, cfg)
        assert torch.allclose(batched, alone, rtol=1e-4, atol=1e-5), (sparsity, batched, alone)
    glob = fw.sample_masks(m, 4, 0.5, mode="global", generator=0)
    assert not glob.is_uniform() and not batched_ok(m, glob, cfg)
    assert score_after_steps(m, glob, x, y, stream, cfg)[1]["engine"] == "member-steps"
    pop = fw.sample_masks(m, 2, 0.5, generator=0)
    assert not batched_ok(m, pop, fw.SearchConfig(member_steps=3, member_batch=16, bn="running"))
    assert not batched_ok(fw.WideResNet(10, 2, num_classes=10, in_channels=1, dropout=0.3), pop, cfg)


@pytest.mark.gpu
def test_member_steps_batched_on_gpu():
    """On a GPU the stacked path runs by default and agrees with training each member alone (tf32)."""
    from fastweedout.search.member_steps import StepStream, one_at_a_time, score_after_steps
    from tolerances import GPU_LOGITS_TOL

    data = fw.load_dataset("synthetic", synthetic=dict(train_size=96, test_size=16, val_size=32, image_size=8))
    m = fw.WideResNet(10, 2, num_classes=10, in_channels=1).cuda()
    x = ((data.val.images.float() / 255 - data.mean[0]) / data.std[0]).cuda()
    y = data.val.labels.cuda()
    stream = StepStream(data.train, steps=3, batch_size=16, mean=data.mean, std=data.std, augment="none", seed=0)
    stream._batches = [(a.cuda(), b.cuda()) for a, b in stream.batches()]
    cfg = fw.SearchConfig(member_steps=3, member_batch=16, member_lr=0.05)
    pop = fw.sample_masks(m, 6, 0.5, generator=0)
    fit, info, _ = score_after_steps(m, pop, x, y, stream, cfg)
    assert info["engine"] == "member-steps-batched"
    atol, rtol = GPU_LOGITS_TOL["tf32"]
    assert torch.allclose(fit, one_at_a_time(m, pop, x, y, stream, cfg).float(), atol=atol, rtol=rtol)
