"""The population engines against the ``loop`` reference: folded and compact, eager, with the Triton
kernels (the interpreter on CPU) and the compact engine's fused pass; odd image shapes, all-live,
single-live and global-sparsity masks, both BN modes; NaN members; channels_last; padded widths;
memory-safe chunks that count the gathered weights."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastweedout as fw
from fastweedout.engines import PAD_MULTIPLE, CompactBackend, FoldedBackend
from fastweedout.engines.scoring import auto_chunk, population_logits, score_population
from fastweedout.masks import Masks
from fastweedout.ops import dispatch as ops
from helpers import randomize_bn
from tolerances import GPU_LOGITS_TOL, TOL

DEV = "cuda" if torch.cuda.is_available() else "cpu"
try:
    from fastweedout.ops.triton import common
    KERNELS = common.INTERPRET or torch.cuda.is_available()
except ImportError:  # pragma: no cover - no Triton
    KERNELS = False
needs_kernels = pytest.mark.skipif(not KERNELS, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
# Logits of every engine against loop's, (atol, rtol) by the precision that runs. On a GPU fp32 convolutions
# run as tf32 in cuDNN and in the Triton conv alike, so engines agree with loop to ~1e-2 there, not 1e-4.
FP32 = TOL[torch.float32] if DEV == "cpu" else GPU_LOGITS_TOL["tf32"]


def _model(depth=10, width=1, classes=5, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(fw.WideResNet(depth, width, num_classes=classes), seed).to(DEV).eval()


def single_live(model, population: int) -> Masks:
    """One live node per node set, a different one per member."""
    out = {}
    for name, c in model.node_layers().items():
        m = torch.zeros(population, c, dtype=torch.bool)
        m[torch.arange(population), (torch.arange(population) * 3) % c] = True
        out[name] = m
    return Masks(out)


def _masks(model, kind: str, population: int = 3) -> Masks:
    if kind == "single":
        return single_live(model, population)
    eta, mode = {"all": (0.0, "layerwise"), "half": (0.5, "layerwise"), "global": (0.6, "global")}[kind]
    return fw.sample_masks(model, population, eta, mode, torch.Generator().manual_seed(1))


def _loop(model, masks, x, bn):
    with ops.use_kernels(False):
        return population_logits(model, masks, x, "loop", bn)


def _close(got, expected, tol):
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), atol=tol[0], rtol=tol[1])


# ------------------------------------------------------------------------ with the Triton kernels
KERNEL_CASES = [  # (engine, depth, width, masks, bn): odd 5x7 images, 2 of them
    ("compact", 10, 1, "half", "batch"), ("compact", 10, 1, "half", "running"),
    ("compact", 10, 2, "global", "batch"), ("compact", 10, 1, "single", "batch"),
    ("compact", 10, 2, "all", "running"),
    ("folded", 10, 1, "half", "batch"), ("folded", 10, 2, "single", "running"),
]


@needs_kernels
@pytest.mark.parametrize("engine,depth,width,kind,bn", KERNEL_CASES)
def test_engines_with_kernels_match_loop(engine, depth, width, kind, bn):
    """Kernels on: folded runs the fused epilogue; compact (no gradients) runs the fused pass on widths
    padded to 16, both against the PyTorch loop."""
    model = _model(depth, width)
    masks = _masks(model, kind)
    x = torch.randn(2, 3, 5, 7, device=DEV)
    with ops.use_kernels(True), torch.no_grad():
        if engine == "compact":
            be = CompactBackend(masks, bn, torch.device(DEV), torch.float32)
            assert be.fused and all(i.shape[1] % PAD_MULTIPLE == 0 for i in be.idx.values())
            got = model.walk(be, x)
        else:
            got = population_logits(model, masks, x, engine, bn)
    _close(got, _loop(model, masks, x, bn), FP32)


@needs_kernels
@pytest.mark.parametrize("engine", ["folded", "compact"])
def test_engines_with_kernels_fp16(engine):
    model = _model(10, 1)
    masks = _masks(model, "half")
    x = torch.randn(2, 3, 6, 6, device=DEV)
    expected = _loop(model, masks, x, "batch")
    with ops.use_kernels(True):
        got = population_logits(model.half(), masks, x.half(), engine, "batch")
    _close(got, expected, (5e-2, 5e-2))


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["folded", "compact"])
@pytest.mark.parametrize("bn", ["batch", "running"])
def test_engines_bf16_on_gpu(engine, bn):
    """bf16 (the GPU headline precision; the interpreter has no bf16): kernels, fused pass and padding."""
    model = _model(16, 2)
    masks = _masks(model, "global", population=5)
    x = torch.randn(4, 3, 11, 9, device=DEV)
    expected = _loop(model, masks, x, bn)
    with ops.use_kernels(True):
        got = population_logits(model.bfloat16(), masks, x.bfloat16(), engine, bn)
    _close(got, expected, GPU_LOGITS_TOL["bf16"])


# ------------------------------------------------------------------------ the engines' own logic (fast)
@pytest.mark.parametrize("bn", ["batch", "running"])
@pytest.mark.parametrize("kind", ["all", "half", "global", "single"])
@pytest.mark.parametrize("depth,width", [(10, 1), (16, 2)])
def test_compact_fused_and_padded_paths_match_loop(depth, width, kind, bn):
    """The fused pass's bookkeeping (pending activations, residual in conv2, statistics handed on) and
    the padding to 16, with the reference ops (ops.fused_conv falls back to functional.fused_conv)."""
    model = _model(depth, width)
    masks = _masks(model, kind, population=4)
    x = torch.randn(3, 3, 7, 5, device=DEV)
    expected = _loop(model, masks, x, bn)
    with ops.use_kernels(False), torch.no_grad():
        for fused, pad in ((True, 1), (True, 16), (False, 16)):
            be = CompactBackend(masks, bn, torch.device(DEV), torch.float32, fused=fused, pad_to=pad)
            _close(model.walk(be, x), expected, FP32)


def test_folded_channels_last_matches_loop():
    model = _model(10, 2)
    masks = _masks(model, "half")
    x = torch.randn(2, 3, 6, 6, device=DEV)
    for bn in ("batch", "running"):
        fm = {k: v.to(device=DEV, dtype=torch.float32) for k, v in masks.items()}
        with ops.use_kernels(False), torch.no_grad():
            got = model.walk(FoldedBackend(fm, bn, masks.population, 2, channels_last=True), x)
        _close(got, _loop(model, masks, x, bn), FP32)


def test_padding_to_16_is_zero_masked_duplicates():
    model = _model(10, 1)
    masks = _masks(model, "half")  # 8 of 16, 16 of 32, 32 of 64 live
    be = CompactBackend(masks, "batch", torch.device("cpu"), torch.float32, fused=False, pad_to=16)
    for name, idx in be.idx.items():
        live = masks[name].sum(1)
        assert idx.shape[1] == -(-int(live.max()) // 16) * 16
        pad = be.pad[name]
        if idx.shape[1] > int(live.min()):
            assert pad is not None and pad.view(3, -1).sum(1).tolist() == live.float().tolist()
        for p in range(3):  # the padded slots repeat a live channel of that member
            assert bool(masks[name][p, idx[p]].all())


# ------------------------------------------------------------------------ NaN members
def _nan_model():
    """WRN-10-1 whose conv1 in stage 2 writes NaN into inner channel 0: every member with that
    channel live has NaN logits (and in loop/folded, 0 * NaN = NaN makes the others NaN too)."""
    model = _model(10, 1)
    with torch.no_grad():
        model.stage2[0].conv1.weight[0] = float("nan")
    masks = _masks(model, "half", population=4)
    live = masks["stage2.block0"][:, 0]
    assert bool(live.any()) and not bool(live.all())
    return model, masks, live


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=needs_kernels)])
def test_nan_members_score_minus_inf_on_every_engine(kernels):
    model, masks, live = _nan_model()
    x, y = torch.randn(3, 3, 6, 6, device=DEV), torch.randint(0, 5, (3,), device=DEV)
    engines = ("folded", "compact") if kernels else ("loop", "folded", "compact")
    for engine in engines:
        with ops.use_kernels(kernels), warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            f = score_population(model, masks, x, y, engine=engine)
        assert bool((f[live] == -math.inf).all()), (engine, f)
        if engine == "compact":  # the members without the channel never compute it: finite
            assert bool(torch.isfinite(f[~live]).all()), (engine, f)


# ------------------------------------------------------------------------ chunking
def test_auto_chunk_counts_the_gathered_weights():
    """Tiny images, wide network: the compact engine's per-member weight copies set the chunk."""
    model = fw.create_model("wrn_16_8")
    masks = fw.sample_masks(model, 100, 0.0, generator=0)
    x = torch.randn(2, 3, 2, 2)
    budget = 2e8
    chunk = auto_chunk(model, x, "compact", masks, budget_bytes=budget)
    largest = 512 * 512 * 9  # stage 3's 3x3 conv, dense (eta = 0)
    assert 1 <= chunk < 100
    assert chunk * 2 * largest * 4 <= budget < (chunk + 1) * 2 * largest * 4 + 8 * 512 * 4 * (chunk + 1) * 64
    assert auto_chunk(model, x, "folded", masks, budget_bytes=budget) == 100  # shared weights: no copies
