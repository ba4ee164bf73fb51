"""The baselines a user would write to score a population of channel masks without this library's
engines, each as a callable that returns the fitness ``[P]`` (CPU, float32) of one call.

* ``pruned-loop``: per member ``model.prune(member)`` (the library's physical pruning) and a forward
  of the pruned network; the pruning is inside the timed call (a search draws new members every
  generation);
* ``vmap-pruned``: the members' pruned networks (``model.prune``) stacked with
  ``torch.func.stack_module_state`` and run with ``torch.func.vmap`` of ``functional_call``: one
  batched forward. Under layerwise sparsity every member's pruned network has the same shapes;
  members whose live counts differ (global sparsity) cannot be stacked and the row is skipped. Both
  BN modes: batch statistics per member, or each pruned network's own (pruned) running statistics;
* ``torch-pruning``: Torch-Pruning's DepGraph (``pip install -e '.[bench]'``): per member a copy of
  the dense network, its dependency graph traced, every node set's dead channels removed through
  the group of the convolution that writes it (a stage's residual stream is one group: DepGraph
  couples the convolutions whose outputs are added), then a forward. Skipped with the reason when
  the package is missing, or when the pruned shapes differ from ``model.prune``'s (what DepGraph
  could not express is named);
* ``compact-compile`` / ``compact-max-autotune``: the compact engine (PyTorch ops) under
  ``torch.compile`` (Inductor; ``mode="max-autotune"`` on a GPU only); the member indices are
  computed outside the graph, as the engine does per call; compile time is the first call's extra;
* ``pruned-graph`` (CUDA only): one pruned network captured once in a CUDA graph
  (``torch.cuda.CUDAGraph``) and replayed per member after that member's gathered weights and BN
  state are copied into its static buffers (layerwise sparsity only: one graph, one set of shapes).

Every function takes the dense model, a validated :class:`fastweedout.Masks`, images, labels, the BN
mode and the metric; a baseline that cannot run raises :class:`Unavailable` with the reason, which
the scoring benchmark records as a skipped row.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import Tensor, nn

import fastweedout as fw
from fastweedout.engines import CompactBackend
from fastweedout.engines.scoring import member_losses
from fastweedout.ops import dispatch as ops

from .env import cold_compile

#: the baselines the "x fastest baseline" column is taken over (the fastest of those that ran)
BASELINE_SET = ("pruned-loop", "vmap-pruned", "torch-pruning", "pruned-graph", "compact-compile",
                "compact-max-autotune")
BN_BUFFERS = ("running_mean", "running_var")


class Unavailable(Exception):
    """A baseline that cannot run here or on these masks; the message is the reason."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Scorer:
    """One baseline's call, with the host seconds each call spent pruning / gathering weights."""

    def __init__(self, fn, prunes: bool = True):
        self._fn = fn
        self.prunes = prunes
        self.prune_times: list[float] = []

    def __call__(self) -> Tensor:
        return self._fn(self)


def _even_chunks(p: int, chunk: int) -> list[tuple[int, int]]:
    n = math.ceil(p / max(1, chunk))
    size = math.ceil(p / n)
    return [(s, min(s + size, p)) for s in range(0, p, size)]


def _prune(model: fw.WideResNet, member: dict, channels_last: bool) -> fw.WideResNet:
    small = model.prune(member)
    return small.to(memory_format=torch.channels_last) if channels_last else small


# ------------------------------------------------------------------------------------ pruned-loop
def make_pruned_loop(model, masks, x, y, bn: str, metric: str) -> Scorer:
    cl = x.is_contiguous(memory_format=torch.channels_last)

    return _prune_then_forward(lambda member: _prune(model, member, cl), masks, x, y, bn, metric)


def _prune_then_forward(prune, masks, x, y, bn: str, metric: str) -> Scorer:
    """Per member: ``prune(member)`` (timed into the scorer's ``prune_times``), then its forward."""

    @torch.no_grad()
    def run(s: Scorer) -> Tensor:
        logits, pruning = [], 0.0
        for i in range(masks.population):
            t0 = time.perf_counter()
            net = prune(masks.member(i))
            pruning += time.perf_counter() - t0
            logits.append(net(x, bn=bn))
        s.prune_times.append(pruning)
        return member_losses(torch.stack(logits), y, metric).cpu()

    return Scorer(run)


# ------------------------------------------------------------------------------------ vmap-pruned
def make_vmap_pruned(model, masks, x, y, bn: str, metric: str, chunk: int) -> Scorer:
    from torch.func import functional_call, stack_module_state, vmap

    if not masks.is_uniform():
        raise Unavailable("members' live counts differ (not layerwise sparsity): their pruned networks have "
                          "different shapes, which stack_module_state cannot stack")
    cl = x.is_contiguous(memory_format=torch.channels_last)
    base = model.prune(masks.member(0)).to("meta")  # the structure; the state comes per call

    def one(params, buffers, xb):
        return functional_call(base, (params, buffers), (xb,), {"bn": bn})

    batched = vmap(one, in_dims=(0, 0, None))
    parts = _even_chunks(masks.population, chunk)

    @torch.no_grad()
    def run(s: Scorer) -> Tensor:
        out, pruning = [], 0.0
        for lo, hi in parts:
            t0 = time.perf_counter()
            params, buffers = stack_module_state([_prune(model, masks.member(i), cl) for i in range(lo, hi)])
            pruning += time.perf_counter() - t0
            out.append(member_losses(batched(params, buffers, x), y, metric).cpu())
        s.prune_times.append(pruning)
        return torch.cat(out)

    return Scorer(run)


# ------------------------------------------------------------------------------------ torch-pruning
def _producer(model: fw.WideResNet, node_set: str) -> nn.Conv2d:
    """The convolution whose output channels are ``node_set``'s nodes (the first one, for a residual
    stream written by several: DepGraph couples the rest through the additions)."""
    if node_set == model.stem_set:
        return model.stem
    stage, _, block = node_set.partition(".")
    blocks = list(getattr(model, stage))
    if block:
        return blocks[int(block.removeprefix("block"))].conv1
    first = blocks[0]
    return first.shortcut if first.shortcut is not None else first.conv2


def torch_pruning_prune(model: fw.WideResNet, member: dict, example: Tensor) -> fw.WideResNet:
    """A copy of ``model`` with ``member``'s dead channels removed by Torch-Pruning's DepGraph."""
    import torch_pruning as tp

    net = copy.deepcopy(model)
    with torch.enable_grad():  # DepGraph traces the autograd graph of one forward
        dg = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    groups = []
    for name in model.node_layers():
        dead = torch.nonzero(~member[name].cpu()).flatten().tolist()
        if dead:
            groups.append(dg.get_pruning_group(_producer(net, name), tp.prune_conv_out_channels, idxs=dead))
    for g in groups:  # all groups taken first: each names channels of the unpruned network
        g.prune()
    return net


def _shape_mismatch(got: nn.Module, want: nn.Module) -> list[str]:
    a = {k: tuple(v.shape) for k, v in got.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in want.state_dict().items()}
    keys = list(dict.fromkeys([*b, *a]))  # the network's order: the first differences are the earliest layers
    return [f"{k}: {a.get(k)} (model.prune: {b.get(k)})" for k in keys if a.get(k) != b.get(k)]


def make_torch_pruning(model, masks, x, y, bn: str, metric: str) -> Scorer:
    try:
        import torch_pruning  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"torch-pruning is not installed (pip install -e '.[bench]'): {e}") from e
    cl = x.is_contiguous(memory_format=torch.channels_last)
    example = x[:1]
    member0 = masks.member(0)
    try:
        got = torch_pruning_prune(model, member0, example)
    except Exception as e:  # DepGraph could not trace or group this network
        raise Unavailable(f"DepGraph cannot prune the WRN's node sets: {type(e).__name__}: {e}") from e
    bad = _shape_mismatch(got, model.prune(member0))
    if bad:
        raise Unavailable(f"DepGraph cannot express the WRN's node masks: {len(bad)} pruned tensors differ from "
                          f"model.prune's, e.g. {'; '.join(bad[:2])} (a residual stream's channels are one mask "
                          "shared by every convolution added into it, the projection shortcut included)")

    def prune(member):
        net = torch_pruning_prune(model, member, example)
        return net.to(memory_format=torch.channels_last) if cl else net

    return _prune_then_forward(prune, masks, x, y, bn, metric)


# ------------------------------------------------------------------------------------ compact-compile
def make_compact_compile(model, masks, x, y, bn: str, metric: str, chunk: int, mode: str | None = None,
                         backend: str = "inductor") -> Scorer:
    def fitness(xb, yb, be):
        return member_losses(model.walk(be, xb), yb, metric)

    cold_compile()
    # a mode is Inductor's (the aot_eager backend of dry runs takes none)
    compiled = torch.compile(fitness, dynamic=False, backend=backend, mode=mode if backend == "inductor" else None)
    parts = [masks.select(list(range(lo, hi))) for lo, hi in _even_chunks(masks.population, chunk)]

    @torch.no_grad()
    def run(s: Scorer) -> Tensor:
        with ops.use_kernels(False):  # Inductor compiles the engine's PyTorch ops, not the Triton custom ops
            return torch.cat([compiled(x, y, CompactBackend(part, bn, x.device, x.dtype)).cpu() for part in parts])

    return Scorer(run, prunes=False)


# ------------------------------------------------------------------------------------ pruned-graph
def pruned_index_plan(model: fw.WideResNet) -> dict[str, tuple[str | None, str | None]]:
    """For every parameter and BN statistic of the pruned network: the node sets indexing its dims 0
    and 1 (None: not pruned), as :meth:`fastweedout.WideResNet.prune` selects them."""
    plan: dict[str, tuple[str | None, str | None]] = {"stem.weight": (model.stem_set, None)}

    def bn(prefix: str, node_set: str) -> None:
        for n in ("weight", "bias", *BN_BUFFERS):
            plan[f"{prefix}.{n}"] = (node_set, None)

    for s, stage in enumerate((model.stage1, model.stage2, model.stage3), start=1):
        for b, blk in enumerate(stage):
            p = f"stage{s}.{b}"
            bn(f"{p}.bn1", blk.in_set)
            plan[f"{p}.conv1.weight"] = (blk.inner_set, blk.in_set)
            bn(f"{p}.bn2", blk.inner_set)
            plan[f"{p}.conv2.weight"] = (blk.out_set, blk.inner_set)
            if blk.shortcut is not None:
                plan[f"{p}.shortcut.weight"] = (blk.out_set, blk.in_set)
    bn("bn", "stage3")
    plan["fc.weight"] = (None, "stage3")
    plan["fc.bias"] = (None, None)
    return plan


class StaticPruned:
    """One pruned network whose weights and BN state are overwritten in place by any member's (all
    members must have the same live counts): the static buffers a CUDA graph replays on."""

    def __init__(self, model: fw.WideResNet, masks, channels_last: bool = False):
        if not masks.is_uniform():
            raise Unavailable("members' live counts differ (not layerwise sparsity): one captured graph "
                              "holds one set of shapes")
        self.net = _prune(model, masks.member(0), channels_last)
        dense = dict(model.named_parameters()) | dict(model.named_buffers())
        static = dict(self.net.named_parameters()) | dict(self.net.named_buffers())
        plan = pruned_index_plan(model)
        missing = {k for k in static if not k.endswith("num_batches_tracked")} - set(plan)
        if missing:  # pragma: no cover - the plan follows WideResNet.prune
            raise RuntimeError(f"pruned_index_plan misses {sorted(missing)}")
        self.copies = [(static[k], dense[k], a, b) for k, (a, b) in plan.items()]
        self.masks = masks

    def live_indices(self) -> dict[str, Tensor]:
        """name -> long ``[P, K]``: each member's live channels in ascending order (as ``prune``)."""
        dev = self.net.stem.weight.device
        out = {}
        for name, m in self.masks.items():
            k = int(m[0].sum())
            out[name] = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :k].to(dev)
        return out

    @torch.no_grad()
    def load(self, idx: dict[str, Tensor], i: int) -> None:
        """Member i's gathered weights and BN state into the static buffers."""
        for dst, src, a, b in self.copies:
            t = src
            if a is not None:
                t = t.index_select(0, idx[a][i])
            if b is not None:
                t = t.index_select(1, idx[b][i])
            dst.copy_(t)


def make_pruned_graph(model, masks, x, y, bn: str, metric: str, *, capture: bool = True) -> Scorer:
    """``capture=False`` replays eagerly (the static-buffer path without a graph; how it is tested on CPU)."""
    if capture and x.device.type != "cuda":
        raise Unavailable("needs a CUDA device: a CUDA graph (torch.cuda.CUDAGraph) captures GPU kernel "
                          "launches, and a CPU has none to capture")
    cl = x.is_contiguous(memory_format=torch.channels_last)
    st = StaticPruned(model, masks, channels_last=cl)
    xs = x.clone()
    if capture:
        idx = st.live_indices()
        st.load(idx, 0)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the capture (cuDNN picks its algorithms, the allocator grows)
                st.net(xs, bn=bn)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = st.net(xs, bn=bn)

    @torch.no_grad()
    def run(s: Scorer) -> Tensor:
        logits, pruning = [], 0.0
        t0 = time.perf_counter()
        idx = st.live_indices()
        pruning += time.perf_counter() - t0
        for i in range(masks.population):
            t0 = time.perf_counter()
            st.load(idx, i)
            pruning += time.perf_counter() - t0
            if capture:
                graph.replay()
                logits.append(static_out.clone())
            else:
                logits.append(st.net(xs, bn=bn))
        s.prune_times.append(pruning)
        return member_losses(torch.stack(logits), y, metric).cpu()

    return Scorer(run)


__all__ = ["BASELINE_SET", "Scorer", "StaticPruned", "Unavailable", "make_compact_compile", "make_pruned_graph",
           "make_pruned_loop", "make_torch_pruning", "make_vmap_pruned", "pruned_index_plan", "torch_pruning_prune"]
