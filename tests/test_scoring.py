import pytest
import torch

import fastweedout as fw
from fastweedout.masks import Masks
from helpers import batch, randomize_bn, state_snapshot
from tolerances import FITNESS_RTOL

ENGINES = ["folded", "compact"]
ARCHS = [(10, 1, 3), (10, 2, 1), (16, 4, 3), (22, 1, 1)]


def assert_fitness_close(a, ref):
    rel = ((a - ref).abs() / ref.abs().clamp_min(1e-6)).max().item()
    assert rel < FITNESS_RTOL, rel


@pytest.mark.parametrize("depth,width,cin", ARCHS)
@pytest.mark.parametrize("bn", ["batch", "running"])
@pytest.mark.parametrize("mode", ["layerwise", "global"])
@pytest.mark.parametrize("engine", ENGINES)
def test_engines_match_loop(depth, width, cin, bn, mode, engine):
    m = randomize_bn(fw.WideResNet(depth, width, num_classes=7, in_channels=cin))
    x, y = batch(m, n=5, h=9, w=11)
    masks = fw.sample_masks(m, 4, 0.6, mode, generator=2)
    ref = fw.score_population(m, masks, x, y, engine="loop", bn=bn)
    assert_fitness_close(fw.score_population(m, masks, x, y, engine=engine, bn=bn), ref)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["all_live", "single_live", "mixed"])
def test_extreme_masks(engine, kind):
    m = randomize_bn(fw.WideResNet(10, 2, num_classes=5))
    x, y = batch(m, n=4)
    nl = m.node_layers()
    if kind == "all_live":
        masks = Masks({k: torch.ones(3, c, dtype=torch.bool) for k, c in nl.items()})
    elif kind == "single_live":
        masks = Masks({k: torch.nn.functional.one_hot(torch.tensor([0, c - 1, c // 2]), c).bool()
                       for k, c in nl.items()})
    else:  # one dense member next to single-live members: padded compaction
        masks = Masks({k: torch.cat([torch.ones(1, c, dtype=torch.bool),
                                     torch.nn.functional.one_hot(torch.tensor([1, 2]), c).bool()])
                       for k, c in nl.items()})
    for bn in ("batch", "running"):
        ref = fw.score_population(m, masks, x, y, engine="loop", bn=bn)
        assert_fitness_close(fw.score_population(m, masks, x, y, engine=engine, bn=bn), ref)


@pytest.mark.parametrize("engine", ["loop"] + ENGINES)
@pytest.mark.parametrize("bn", ["batch", "running"])
def test_member_alone_equals_in_population(engine, bn):
    m = randomize_bn(fw.WideResNet(10, 2))
    x, y = batch(m, n=6)
    masks = fw.sample_masks(m, 5, 0.5, generator=4)
    full = fw.score_population(m, masks, x, y, engine=engine, bn=bn)
    for i in (0, 3):
        alone = fw.score_population(m, masks.select(i), x, y, engine=engine, bn=bn)
        assert_fitness_close(alone, full[i:i + 1])


@pytest.mark.parametrize("engine", ["loop"] + ENGINES)
def test_chunks_do_not_change_fitness(engine):
    m = fw.WideResNet(10, 1)
    x, y = batch(m)
    masks = fw.sample_masks(m, 7, 0.4, generator=0)
    a = fw.score_population(m, masks, x, y, engine=engine, chunk_size=7)
    b, info = fw.score_population(m, masks, x, y, engine=engine, chunk_size=3, return_info=True)
    assert info["chunk_size"] == 3
    assert_fitness_close(b, a)


@pytest.mark.parametrize("engine", ["loop"] + ENGINES)
@pytest.mark.parametrize("train_mode", [True, False])
def test_scoring_leaves_model_untouched(engine, train_mode):
    m = randomize_bn(fw.WideResNet(10, 2, dropout=0.3))
    m.train(train_mode)
    before, mode = state_snapshot(m)
    x, y = batch(m)
    fw.score_population(m, fw.sample_masks(m, 3, 0.5), x, y, engine=engine, bn="batch")
    after, mode2 = state_snapshot(m)
    assert mode == mode2
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_accuracy_metric_and_auto():
    m = fw.WideResNet(10, 1)
    x, y = batch(m, n=10)
    masks = fw.sample_masks(m, 4, 0.5, generator=0)
    acc = fw.score_population(m, masks, x, y, engine="loop", metric="accuracy")
    assert ((acc >= 0) & (acc <= 1)).all()
    assert torch.equal(fw.score_population(m, masks, x, y, engine="compact", metric="accuracy"), acc)
    fit, info = fw.score_population(m, masks, x, y, return_info=True)
    assert info["engine"] in ("folded", "compact")


def test_nan_fitness_becomes_minus_inf():
    m = fw.WideResNet(10, 1)
    x, y = batch(m)
    with torch.no_grad():
        m.fc.weight[0, 0] = float("nan")
    masks = fw.sample_masks(m, 3, 0.0)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        f = fw.score_population(m, masks, x, y, engine="loop")
    assert torch.isinf(f).all() and (f < 0).all()


def test_bad_inputs():
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = batch(m)
    masks = fw.sample_masks(m, 2, 0.5)
    cases = [
        (dict(images=torch.randn(6, 1, 8, 8)), "channels"),
        (dict(images=torch.randn(0, 3, 8, 8), labels=torch.zeros(0, dtype=torch.long)), "empty"),
        (dict(labels=torch.full((6,), 9)), r"\[0, 4\)"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), "labels"),
        (dict(images=torch.zeros(6, 3, 8, 8, dtype=torch.uint8)), "floating"),
        (dict(engine="magic"), "engine"),
        (dict(metric="f1"), "metric"),
        (dict(bn="group"), "bn"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(masks={k: torch.ones(2, v.shape[1] + 1, dtype=torch.bool) for k, v in masks.items()}),
         "nodes per member"),
        (dict(masks=fw.sample_masks(fw.WideResNet(10, 2), 2, 0.5)), "unknown node sets"),
        (dict(masks=dict(list(masks.items())[1:])), "missing node sets"),
        (dict(masks={**dict(masks.items()), "extra": torch.ones(2, 3, dtype=torch.bool)}), "unknown node sets"),
        (dict(masks={k: torch.zeros_like(v) for k, v in masks.items()}), "switches off every node"),
        (dict(masks=[1, 2]), "Masks"),
    ]
    for kw, msg in cases:
        args = dict(model=m, masks=masks, images=x, labels=y)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            fw.score_population(**args)


def test_auto_chunk_fits_wrn_28_10_population_on_80gb():
    from fastweedout.engines.scoring import auto_chunk
    m = fw.create_model("wrn_28_10")
    masks = fw.sample_masks(m, 100, 0.0)
    images = torch.empty(1000, 3, 32, 32, device="meta")
    chunk = auto_chunk(m, images, "folded", masks, budget_bytes=0.6 * 80e9)
    assert 1 <= chunk < 100
    # Compacting at eta=0.8 leaves ~5x fewer live activations per member: bigger chunks.
    sparse = fw.sample_masks(m, 100, 0.8)
    assert auto_chunk(m, images, "compact", sparse, budget_bytes=0.6 * 80e9) > 3 * chunk
    # On a GPU a folded chunk holds at most 8,192 images (measured on an H200: more only adds traffic);
    # the compact engine's chunks follow memory alone.
    cuda = torch.device("cuda")
    small = torch.empty(64, 3, 32, 32, device="meta")
    assert auto_chunk(m, small, "folded", masks, budget_bytes=0.6 * 140e9, device=cuda) == 100  # 6,400 images
    assert auto_chunk(m, images, "folded", masks, budget_bytes=0.6 * 140e9, device=cuda) == 8
    assert auto_chunk(m, images, "folded", masks, budget_bytes=0.6 * 140e9) > 8  # memory alone elsewhere
    assert auto_chunk(m, images, "compact", sparse, budget_bytes=0.6 * 140e9, device=cuda) == \
        auto_chunk(m, images, "compact", sparse, budget_bytes=0.6 * 140e9)


def test_out_of_memory_halves_the_chunk(monkeypatch):
    import dataclasses

    from fastweedout.engines import registry
    m = fw.WideResNet(10, 1)
    x, y = batch(m)
    masks = fw.sample_masks(m, 6, 0.5, generator=0)
    ref = fw.score_population(m, masks, x, y, engine="folded", chunk_size=1)
    folded = registry.ENGINES["node"]["folded"]

    def small_memory(model, part, *a, **k):
        if part.population > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return folded.logits(model, part, *a, **k)

    monkeypatch.setitem(registry.ENGINES["node"], "folded", dataclasses.replace(folded, logits=small_memory))
    with pytest.warns(RuntimeWarning, match="retrying with chunks of"):
        f, info = fw.score_population(m, masks, x, y, engine="folded", chunk_size=6, return_info=True)
    assert_fitness_close(f, ref)
    assert info["chunk_size"] == 1  # 6 -> 3 -> 1
