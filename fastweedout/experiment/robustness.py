"""Robustness to further pruning after training (Van Gelder et al. 2020): a finished run's trained
network loses a further fraction f of the live nodes of every node set, without fine-tuning, and its
test accuracy is measured.

Two ways to choose the nodes removed: ``random`` (one seeded random order per node set, so the nodes
removed at f are among those removed at every larger f) and ``bn_gamma`` (the smallest BN scale |γ|:
a node's score is the mean |γ| over the BNs that read it: a block's bn2 for its inner node set, every
block's bn1 reading a stage's stream and the final BN for the stream of stage 3; network slimming's
criterion in a pre-activation network). A node set of w live nodes loses round(f·w) of them, never
its last one. BN uses the running statistics of training (evaluation mode), as the final test does;
with ``recalibrate=N`` each pruned network's BN running statistics are also recomputed from N training
images (no augmentation, no gradient, weights untouched), a second curve per method: removing nodes
shifts the statistics of every sum they fed, and without recalibration that shift alone can send a
network to chance.

The trained weights are the final training checkpoint a run keeps (``train/checkpoint.pt``; git-ignored,
so runs committed without it cannot be measured). Results go to ``robustness.json`` in the run
directory, rewritten atomically after every measured point; a rerun computes only what is missing.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from fastweedout import atomic
from fastweedout.config import RunConfig, Runtime
from fastweedout.data.loader import DeviceLoader
from fastweedout.experiment import runs
from fastweedout.experiment.inputs import derive_seed, load_data
from fastweedout.experiment.records import RunError
from fastweedout.experiment.runtime import resolve_runtime
from fastweedout.masks import round_half_up
from fastweedout.model.wrn import WideResNet
from fastweedout.training import checkpoint
from fastweedout.training.loop import evaluate

ROBUSTNESS_NAME = "robustness.json"
FORMAT = "fastweedout.robustness/1"
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("random", "bn_gamma")


def trained_network(run_dir: str, cfg: RunConfig) -> WideResNet:
    """The network a finished run trained (its pruned network: node sets at their live widths)."""
    if cfg.training is None or cfg.arm == "throughout":
        raise RunError(f"{run_dir}: robustness needs a run trained on one fixed mask (arm {cfg.arm})")
    if cfg.granularity != "node" or cfg.training.masked:
        raise RunError(f"{run_dir}: robustness removes nodes of the pruned network; this run trained "
                       f"{'weight masks' if cfg.granularity != 'node' else 'the masked full network'}")
    path = os.path.join(run_dir, runs.TRAIN_DIR, checkpoint.CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise RunError(f"{run_dir}: no trained weights ({os.path.relpath(path, run_dir)}; runs keep it locally, it "
                       "is not committed)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("epoch") != cfg.training.epochs:
        raise RunError(f"{path}: a checkpoint of epoch {state.get('epoch')}, not the final epoch {cfg.training.epochs}")
    m = state["identity"]["model"]
    net = WideResNet(m["depth"], m["width"], m["num_classes"], m["in_channels"], m["dropout"],
                     widths=state["identity"]["widths"])
    net.load_state_dict(state["model"])
    return net.eval()


def gamma_scores(net: WideResNet) -> OrderedDict[str, torch.Tensor]:
    """Per node set, the mean |γ| over the BNs that read each node."""
    readers: dict[str, list] = {k: [] for k in net.node_layers()}
    for b in net.blocks():
        readers[b.in_set].append(b.bn1.weight)
        readers[b.inner_set].append(b.bn2.weight)
    readers["stage3"].append(net.bn.weight)
    return OrderedDict((k, torch.stack([w.detach().abs() for w in ws]).mean(0)) for k, ws in readers.items())


def removal_orders(net: WideResNet, method: str, seed: int) -> OrderedDict[str, torch.Tensor]:
    """Per node set, its nodes in the order they are removed."""
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return OrderedDict((k, torch.randperm(w, generator=g)) for k, w in net.node_layers().items())
    if method == "bn_gamma":
        return OrderedDict((k, torch.sort(s, stable=True).indices) for k, s in gamma_scores(net).items())
    raise ValueError(f"unknown removal method {method!r}; choose one of {list(METHODS)}")


def further_mask(net: WideResNet, order: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """The mask removing round(f·w) nodes of every node set (w: its live width), never the last one."""
    out = {}
    for k, w in net.node_layers().items():
        m = torch.ones(w, dtype=torch.bool)
        m[order[k][:min(round_half_up(fraction * w), w - 1)]] = False
        out[k] = m
    return out


def curve_key(point: dict) -> str:
    """The curve a point belongs to: its removal method, with BN recalibration marked."""
    return point["method"] + ("+bn_recal" if point.get("recalibration_images") else "")


@torch.no_grad()
def recalibrate_bn(net: WideResNet, loader: DeviceLoader) -> WideResNet:
    """``net`` with every BN's running statistics recomputed from ``loader``'s batches (momentum None:
    the average of the per-batch statistics, exact for one batch); the weights are untouched and
    ``net`` is left in evaluation mode."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    try:
        for x, _ in loader:
            net(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        net.eval()
    return net


def _load(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) and d.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def measure_run(run_dir: str, data, *, fractions: Sequence[float] = FRACTIONS, methods: Sequence[str] = METHODS,
                test_images: int | None = None, recalibrate: int = 0, device: str | torch.device = "cpu") -> dict:
    """Test accuracy of a finished run's network after removing a further fraction of its nodes, for
    every (method, fraction), with the trained BN statistics and, when ``recalibrate`` > 0, also with
    them recomputed from that many training images; writes and returns the run's robustness.json
    (points already in it with the same test images are kept, not recomputed)."""
    if isinstance(recalibrate, bool) or not isinstance(recalibrate, int) or recalibrate < 0:
        raise ValueError(f"recalibrate must be a number of training images >= 0, got {recalibrate!r}")
    cfg = RunConfig.from_dict(runs.verify_run_dir(run_dir))
    if not os.path.exists(os.path.join(run_dir, runs.DONE_NAME)):
        raise RunError(f"{run_dir}: not finished")
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"fractions must lie in (0, 1), got {f}")
    net = trained_network(run_dir, cfg).to(device)
    test = data.test if test_images is None else data.test.subset(torch.arange(min(test_images, len(data.test))))
    loader = DeviceLoader(test.to(device), cfg.training.eval_batch_size, mean=data.mean, std=data.std)
    path = os.path.join(run_dir, ROBUSTNESS_NAME)
    old = _load(path)
    res = old if old is not None and old.get("test_images") == len(test.labels) else None
    if res is None:
        loss, acc = evaluate(net, loader)
        res = dict(format=FORMAT, test_images=len(test.labels), seed=derive_seed(cfg.seed, "robustness"),
                   live=dict(net.node_layers()), intact=dict(test_acc=acc, test_loss=loss), points=[])
        atomic.atomic_write_json(path, res)
    calib = None
    if recalibrate:
        n = min(recalibrate, len(data.train))
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(res["seed"]))[:n]
        calib = DeviceLoader(data.train.subset(pick.sort().values).to(device), cfg.training.eval_batch_size,
                             mean=data.mean, std=data.std)
    done = {(p["method"], p["fraction"], p.get("recalibration_images", 0)) for p in res["points"]}
    for method in methods:
        order = removal_orders(net, method, res["seed"])
        for f in fractions:
            for images in (0,) + ((len(calib.split.labels),) if calib is not None else ()):
                if (method, float(f), images) in done:
                    continue
                mask = further_mask(net, order, f)
                small = net.prune(mask).eval()
                if images:
                    recalibrate_bn(small, calib)
                loss, acc = evaluate(small, loader)
                removed = sum(int((~m).sum()) for m in mask.values())
                point = dict(method=method, fraction=float(f), removed=removed,
                             live=sum(int(m.sum()) for m in mask.values()), test_acc=acc,
                             test_loss=loss if math.isfinite(loss) else None)
                if images:
                    point["recalibration_images"] = images
                res["points"].append(point)
                res["points"].sort(key=lambda p: (p["method"], p.get("recalibration_images", 0), p["fraction"]))
                atomic.atomic_write_json(path, res)
    return res


def run_robustness(results: str | os.PathLike, runtime: Runtime | None = None, *,
                   fractions: Sequence[float] = FRACTIONS, methods: Sequence[str] = METHODS,
                   test_images: int | None = None, recalibrate: int = 0,
                   log=print) -> tuple[list[str], list[tuple[str, str]]]:
    """:func:`measure_run` for every finished run of ``results`` with trained weights; returns (the run
    directories measured, [(run directory, why skipped)])."""
    rt = resolve_runtime(runtime)
    measured, skipped = [], []
    cache: dict[str, object] = {}
    for path, cfg_dict in runs.iter_run_dirs(os.fspath(results)):
        if not os.path.exists(os.path.join(path, runs.DONE_NAME)) or cfg_dict.get("training") is None:
            continue
        try:
            cfg = RunConfig.from_dict(cfg_dict)
            trained_network(path, cfg)  # fails fast, before any data is loaded, when it cannot be measured
        except (RunError, ValueError) as e:
            skipped.append((path, str(e)))
            continue
        key = runs.canonical_json(cfg.data)
        if key not in cache:
            cache[key] = load_data(cfg.data, rt)
        measure_run(path, cache[key], fractions=fractions, methods=methods, test_images=test_images,
                    recalibrate=recalibrate, device=rt.device)
        measured.append(path)
        log(f"robustness: {os.path.basename(path)}")
    return measured, skipped


def read_robustness(run_dir: str) -> dict | None:
    """A run's robustness.json (None when absent or unreadable)."""
    return _load(os.path.join(run_dir, ROBUSTNESS_NAME))


def curves(results: Iterable[dict]) -> dict[str, dict[float, list[float]]]:
    """{curve (:func:`curve_key`): {fraction: [test accuracy of each run]}}, fraction 0 being the
    intact network."""
    out: dict[str, dict[float, list[float]]] = {}
    for r in results:
        for p in r["points"]:
            d = out.setdefault(curve_key(p), {0.0: []})
            d.setdefault(p["fraction"], []).append(p["test_acc"])
        for m in {curve_key(p) for p in r["points"]}:
            out[m][0.0].append(r["intact"]["test_acc"])
    return out


__all__ = ["FRACTIONS", "METHODS", "ROBUSTNESS_NAME", "curve_key", "curves", "further_mask", "gamma_scores",
           "measure_run",
           "read_robustness", "recalibrate_bn", "removal_orders", "run_robustness", "trained_network"]
