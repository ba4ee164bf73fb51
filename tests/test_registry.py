"""The engine registry and the mask spaces: one table of engines read by the config, the CLI, the scoring
and the FLOP accounting; one interface per mask space. Includes the defects a twin implementation caused."""

import dataclasses

import pytest
import torch

import fastweedout as fw
from fastweedout.config import ENGINES, WEIGHT_ENGINES, SearchConfig, TrainConfig
from fastweedout.cost.flops import count_forward, padded_live
from fastweedout.engines import registry
from fastweedout.engines.scoring import score
from fastweedout.experiment import records
from fastweedout.model.masked import weight_sets
from fastweedout.ops import dispatch as ops
from fastweedout.spaces.registry import SPACES, get_space
from fastweedout.spaces.weight import sample_weight_masks, weight_forward_flops, weight_training_flops
from fastweedout.training.network import prepare_network
from helpers import batch


def test_config_and_cli_choices_come_from_the_registry():
    assert ENGINES == ("auto", *registry.ENGINES["node"]) and WEIGHT_ENGINES == ("auto", *registry.ENGINES["weight"])
    field = {f.name: f for f in dataclasses.fields(SearchConfig)}["engine"]
    assert set(field.metadata["choices"]) == set(registry.all_engine_names())
    assert set(SPACES) == set(registry.ENGINES)
    with pytest.raises(ValueError, match="weight masks are scored by the engines"):
        registry.get_engine("weight", "compact")
    with pytest.raises(ValueError, match="granularity must be one of"):
        get_space("channel")


def test_a_new_engine_is_one_entry(monkeypatch):
    """An engine added to the table is scored, validated and counted without any other change."""
    m = fw.WideResNet(10, 1, num_classes=5)
    x, y = batch(m, n=6)
    masks = fw.sample_masks(m, 3, 0.5, generator=1)
    loop = registry.ENGINES["node"]["loop"]
    monkeypatch.setitem(registry.ENGINES["node"], "loop2", dataclasses.replace(loop, name="loop2"))
    f, info = score(m, masks, x, y, engine="loop2", return_info=True)
    assert torch.equal(f, fw.score_population(m, masks, x, y, engine="loop"))
    assert info["engine"] == "loop2" and info["flops"]["executed"] == 6 * 3 * count_forward(m, x.shape[2:]).total


@pytest.mark.parametrize("space", ["node", "weight"])
def test_chunk_size_true_is_rejected_by_both_spaces(space):
    """The twins once disagreed: ``chunk_size=True`` was accepted for node masks only."""
    m = fw.WideResNet(10, 1, num_classes=5)
    x, y = batch(m, n=4)
    masks = get_space(space).sample(m, 2, 0.5, generator=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        score(m, masks, x, y, space=space, chunk_size=True)


def test_weight_run_reports_the_live_forward_flops():
    """Weight-mask training reported live forward FLOPs as (useful step FLOPs) // 3, a third of the live
    stem's FLOPs low (the step leaves out the stem's grad-input); it is the live weights' forward."""
    m = fw.WideResNet(10, 1, num_classes=10, in_channels=1)
    masks = sample_weight_masks(m, 1, 0.6, generator=3)
    member = {k: v[0] for k, v in masks.items()}
    *_, live_flops, live_params = prepare_network(m, member, False, torch.device("cpu"), False, 28, "weight")
    expected = weight_forward_flops(m, member, 28)
    assert live_flops == expected
    stem = 2 * 28 * 28 * int(member["stem.weight"].sum())
    assert expected - weight_training_flops(m, member, 28)["useful"] // 3 == -(-stem // 3) > 0  # the old rule
    assert live_params == sum(p.numel() for p in m.parameters()) - sum(int((~v).sum()) for v in member.values())
    assert sum(weight_sets(m).values()) < sum(p.numel() for p in m.parameters())


def test_search_counts_the_padding_the_engine_ran():
    """Where the kernels run, the compact engine rounds each node set's live width up to 16; the search
    once counted executed FLOPs at the unpadded width."""
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = batch(m, n=8, h=8, w=8)
    with ops.use_kernels(True):  # the Triton interpreter on this CPU (tests/conftest.py): padding 16
        r = fw.random_search(m, x, y, SearchConfig(population=2, generations=1, batch_size=4, engine="compact"),
                             sparsity=0.5, seed=0)
        pop = fw.sample_masks(m, 2, 0.5, generator=torch.Generator().manual_seed(0))
    assert registry.padding(registry.get_engine("node", "compact"), torch.device("cpu"), torch.float32) == 1
    c, dense = count_forward(m, 8, padded_live(pop, 16)), count_forward(m, 8)
    assert r.flops_executed == 4 * (2 * (c.total - c.stem) + dense.stem)
    assert r.flops_executed > registry.scoring_flops(m, pop, 4, 8, "compact")["executed"]  # unpadded, on CPU


def test_during_training_counts_the_engine_auto_chose(tmp_path, monkeypatch):
    """The throughout arm assumed ``auto`` means compact; where auto folds (a GPU, below its sparsity
    threshold: here forced on the CPU) it must count the folded engine's FLOPs."""
    monkeypatch.setattr(registry, "choose_engine", lambda space, masks, device: "folded")
    from fastweedout.config import DataConfig, ModelConfig, Runtime, ThroughoutConfig, make_run_config
    from fastweedout.experiment.pipeline import execute_run

    data = DataConfig("synthetic", val_size=64, synthetic=dict(train_size=128, test_size=32, image_size=8))
    c = make_run_config("throughout", 0.05, data=data, model=ModelConfig("wrn_10_1"), seed=0,
                        search=SearchConfig(population=2, batch_size=16),
                        throughout=ThroughoutConfig(interval=2, mask_every=1, finetune_epochs=0),
                        training=TrainConfig(epochs=1, batch_size=64))
    out = execute_run(c, tmp_path, Runtime(device="cpu", progress=False))
    recs = records.read_jsonl(f"{out.path}/results.jsonl")
    search = next(x for x in recs if x.get("phase") == "search")
    model = fw.WideResNet(10, 1, num_classes=10, in_channels=1)  # the synthetic set's
    masks = fw.sample_masks(model, 2, 0.05, generator=0)
    folded = registry.scoring_flops(model, masks, 16, 8, "folded")["executed"]
    compact = registry.scoring_flops(model, masks, 16, 8, "compact")["executed"]
    assert folded != compact and search["flops_executed"] == search["scorings"] * folded


def test_auto_compacts_on_a_cpu_and_folds_dense_masks_on_a_gpu():
    model = fw.WideResNet(10, 1, num_classes=10, in_channels=1)
    for eta in (0.0, 0.05, 0.5):
        masks = fw.sample_masks(model, 2, eta, generator=0)
        assert registry.choose_engine("node", masks, torch.device("cpu")) == "compact"
        assert registry.choose_engine("node", masks, torch.device("cuda")) == ("compact" if eta >= 0.2 else "folded")


def test_a_pruning_method_is_one_registry_entry(monkeypatch):
    """prune_at_init, node_scores and the config read the methods from one registry: a method added
    there works end to end, with no if-chain to extend."""
    from collections import OrderedDict

    from fastweedout import config as C
    from fastweedout.masks import sample_masks
    from fastweedout.model.wrn import WideResNet
    from fastweedout.search import prune_init as PI
    from fastweedout.search import prune_methods as PM

    assert C.PRUNE_METHODS == PM.METHOD_NAMES == tuple(PM.PRUNE_METHODS)
    assert set(C.ARMS) >= set(PM.METHOD_NAMES)

    def by_index(net, fm, x, y, hw, config):  # keeps the highest-indexed nodes of every set
        return OrderedDict((k, torch.arange(v.numel(), dtype=torch.float64) * v.double().cpu()) for k, v in fm.items())

    monkeypatch.setitem(PM.PRUNE_METHODS, "by_index", PM.PruneMethod("by_index", by_index, "weights", counted=False))
    net = WideResNet(10, 1, num_classes=10, in_channels=1)
    mask, info = PI.prune_at_init("by_index", net, 0.5)
    want = sample_masks(net.node_layers(), 1, 0.5)
    for k, m in mask.member(0).items():
        live = int(want.member(0)[k].sum())
        assert m.tolist() == [False] * (m.numel() - live) + [True] * live
    assert info["method"] == "by_index" and info["flops"] == 0 and info["rounds"] == 1
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        PI.prune_at_init("nope", net, 0.5)


def test_a_strategy_is_one_registry_entry(monkeypatch):
    from fastweedout import config as C
    from fastweedout.masks import sample_masks
    from fastweedout.search import strategies as ST

    assert C.STRATEGIES == ST.STRATEGY_NAMES == tuple(ST.STRATEGIES)
    pop = sample_masks({"a": 8, "b": 4}, 5, 0.5, generator=0)
    fit = torch.arange(5.0)
    monkeypatch.setitem(ST.STRATEGIES, "clone_best", lambda pop, fit, n, fresh, rate, g: clone_best(pop, fit, n))
    new = ST.next_generation("clone_best", pop, fit, 3, None, 0.1, torch.Generator().manual_seed(0))
    assert all(torch.equal(new[k], pop[k][4:5].repeat(3, 1)) for k in pop)
    assert ST.next_generation("random", pop, fit, 0, None, 0.1, torch.Generator()) is None
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        ST.next_generation("nope", pop, fit, 3, None, 0.1, torch.Generator())


def clone_best(pop, fitness, n):
    from fastweedout.masks import Masks

    return Masks.cat([pop.select(int(fitness.argmax()))] * n)
