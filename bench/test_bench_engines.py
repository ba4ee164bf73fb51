"""pytest-benchmark microbenchmarks of the scoring engines and the fused ops (not part of tests/).

    pytest bench/test_bench_engines.py                      # CPU-sized shapes
    pytest bench/test_bench_engines.py --benchmark-json out.json
    FASTWEEDOUT_BENCH_SIZE=gpu pytest bench/               # WRN-16-4, P=100 on a GPU

Each timed function synchronises the device before it returns; FLOPs (2 per multiply-add), the
shapes and the device go to ``extra_info``. Engines run with the PyTorch ops; the ``*-triton`` cases
run the Triton kernels and are skipped where those would only run in the interpreter (no GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

import fastweedout as fw
from fastweedout import ops
from fastweedout.flops import scoring_flops
from fastweedout.scoring import score_population

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
GPU_SIZE = os.environ.get("FASTWEEDOUT_BENCH_SIZE", "gpu" if CUDA else "cpu") == "gpu"
# (model, P, B, image size)
SHAPE = ("wrn_16_4", 100, 128, 32) if GPU_SIZE else ("wrn_10_2", 8, 16, 16)
ETAS = [0.0, 0.4, 0.8]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _triton_ok() -> bool:
    if not CUDA:
        return False
    with ops.use_kernels(True):
        return ops.kernels_active(torch.empty(1, 1, 1, 1, device=DEV))


@pytest.fixture(scope="module")
def setup():
    name, p, b, s = SHAPE
    model = fw.create_model(name).to(DEV).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s, s, generator=g).to(DEV)
    y = torch.randint(0, 10, (b,), generator=g).to(DEV)
    return model, x, y


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("engine", ["loop", "folded", "compact", "folded-triton", "compact-triton"])
def test_score_population(benchmark, setup, engine, eta):
    model, x, y = setup
    name, p, b, s = SHAPE
    triton = engine.endswith("-triton")
    if triton and not _triton_ok():
        pytest.skip("Triton kernels run natively only on a CUDA device")
    base = engine.replace("-triton", "")
    masks = fw.sample_masks(model, p, eta, generator=torch.Generator().manual_seed(1))

    def run():
        with ops.use_kernels(triton):
            f = score_population(model, masks, x, y, engine=base)
        _sync()
        return f

    fl = scoring_flops(model, masks, b, s, base)
    benchmark.group = f"score_population {name} P={p} B={b} eta={eta}"
    benchmark.extra_info.update(engine=engine, eta=eta, model=name, population=p, batch=b, image_size=s,
                                device=str(DEV), useful_flops=fl["useful"], executed_flops=fl["executed"],
                                flops_convention=fl["convention"], threads=torch.get_num_threads())
    f = benchmark.pedantic(run, rounds=3 if not GPU_SIZE else 20, warmup_rounds=1, iterations=1)
    assert f.shape == (p,) and torch.isfinite(f).all()


# ------------------------------------------------------------------------------------ fused ops
OP_SHAPE = (100, 32, 160, 32) if GPU_SIZE else (4, 8, 32, 16)  # P, B, C, spatial


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_population_bn_act(benchmark, impl):
    if impl == "triton" and not _triton_ok():
        pytest.skip("Triton kernels run natively only on a CUDA device")
    p, b, c, s = OP_SHAPE
    x = torch.randn(p * b, c, s, s, device=DEV)
    w, bias = torch.rand(c, device=DEV) + 0.5, torch.randn(c, device=DEV)
    mask = (torch.rand(p, c, device=DEV) > 0.5).float()

    def run():
        with ops.use_kernels(impl == "triton"):
            y = ops.population_bn_act(x, p, w, bias, mask)
        _sync()
        return y

    benchmark.group = f"population_bn_act P={p} B={b} C={c} {s}x{s}"
    benchmark.extra_info.update(impl=impl, device=str(DEV), bytes_moved=2 * x.numel() * x.element_size(), flops=0)
    y = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    assert y.shape == x.shape


@pytest.mark.parametrize("eta", [0.4, 0.8])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_grouped_conv(benchmark, impl, eta):
    if impl == "triton" and not _triton_ok():
        pytest.skip("Triton kernels run natively only on a CUDA device")
    p, b, c, s = OP_SHAPE
    k = max(1, round((1 - eta) * c))
    x = torch.randn(b, p * k, s, s, device=DEV)
    w = torch.randn(p, k, k, 3, 3, device=DEV)

    def run():
        with ops.use_kernels(impl == "triton"):
            y = ops.grouped_conv(x, w, 1, 1)
        _sync()
        return y

    benchmark.group = f"grouped_conv P={p} B={b} K={k} {s}x{s} 3x3"
    benchmark.extra_info.update(impl=impl, eta=eta, device=str(DEV), flops=2 * b * p * k * k * 9 * s * s)
    y = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    assert y.shape == (b, p * k, s, s)
