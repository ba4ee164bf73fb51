"""The Triton kernels against their PyTorch references (fastweedout.ops.reference), upcast to float64.

Runs under TRITON_INTERPRET=1 on CPU (conftest sets it): tiny, odd shapes; fp32 and fp16 (the
interpreter has no bf16 arithmetic). Tolerances are data, per dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastweedout.ops import reference as ref

bn_act = pytest.importorskip("fastweedout.ops.triton.bn_act")
gconv = pytest.importorskip("fastweedout.ops.triton.grouped_conv")
from fastweedout.ops.triton import _conv, bn_act_backward, bn_stats, common  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if not (common.INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# (atol, rtol) against the float64 reference. fp32 on a GPU: tl.dot is tf32 (as cuDNN by default).
FWD_TOL = {
    torch.float32: (1e-4, 1e-4) if common.INTERPRET else (2e-2, 1e-2),
    torch.float16: (2e-2, 1e-2),
}
BWD_TOL = {  # gradients sum over B*H*W values
    torch.float32: (2e-4, 1e-3) if common.INTERPRET else (5e-2, 2e-2),
    torch.float16: (5e-2, 2e-2),
}
if not common.INTERPRET:  # the interpreter has no bf16 arithmetic (triton#4972); a GPU does
    FWD_TOL[torch.bfloat16] = (1e-1, 5e-2)
    BWD_TOL[torch.bfloat16] = (2e-1, 5e-2)
DTYPES = list(FWD_TOL)
LAYOUTS = ["nchw", "channels_last"]
# (name, P): odd sizes; P=1 is the single-member population
POPULATIONS = ["all_live", "one_live", "random", "none", "single"]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


def _mask(kind: str, P: int, C: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind in ("all_live", "single"):
        return torch.ones(P, C)
    if kind == "one_live":  # all but one node dead, a different survivor per member
        m = torch.zeros(P, C)
        m[torch.arange(P), torch.arange(P) % C] = 1.0
        return m
    return (torch.rand(P, C) > 0.4).float()


def _close(actual: torch.Tensor, expected: torch.Tensor, tol):
    atol, rtol = tol
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def _d(t):
    return None if t is None else t.detach().double()


# ------------------------------------------------------------------------------------------------
# 1 + 2: population BN + ReLU + mask (batch and running statistics)
# ------------------------------------------------------------------------------------------------
def _bn_inputs(kind, dtype, layout, running, B=2, C=10, H=7, W=5):
    P = 1 if kind == "single" else 3
    x = _layout((torch.randn(P * B, C, H, W) * 1.5 + 0.7).to(dtype), layout).to(DEV)
    weight = (torch.randn(P, C) if kind == "random" else torch.rand(C) + 0.5).to(DEV)
    bias = (torch.randn(C) * 0.3).to(DEV)
    mask = _mask(kind, P, C)
    mask = mask.to(DEV) if mask is not None else None
    rm = rv = None
    if running:
        rm = (torch.randn(C) * 0.5).to(DEV)
        rv = (torch.rand(P, C) + 0.5).to(DEV)
    return P, x, weight, bias, mask, rm, rv


@pytest.mark.parametrize("running", [False, True], ids=["batch", "running"])
@pytest.mark.parametrize("kind", POPULATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_forward_backward(dtype, layout, kind, running):
    P, x, w, b, m, rm, rv = _bn_inputs(kind, dtype, layout, running)
    leaves = [x, w, b] + ([m] if m is not None else [])
    leaves = [t.clone().requires_grad_() for t in leaves]
    xk, wk, bk = leaves[:3]
    mk = leaves[3] if m is not None else None
    y = bn_act.population_bn_act(xk, P, wk, bk, mk, rm, rv)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")

    rleaves = [t.detach().double().requires_grad_() for t in leaves]
    rm_ = rleaves[3] if m is not None else None
    yr = ref.population_bn_act(rleaves[0], P, rleaves[1], rleaves[2], rm_, _d(rm), _d(rv))
    _close(y, yr, FWD_TOL[dtype])

    gy = torch.randn(y.shape).to(dtype).to(DEV)
    y.backward(gy)
    yr.backward(gy.double())
    for a, e in zip(leaves, rleaves):
        assert a.grad is not None and a.grad.shape == a.shape
        _close(a.grad, e.grad, BWD_TOL[dtype])


def test_bn_act_large_mean_no_cancellation():
    """Batch statistics merge chunk means and M2 (Chan), not E[x^2]-E[x]^2: a large offset is harmless."""
    P, B, C = 2, 3, 5
    x = (torch.randn(P * B, C, 6, 6, dtype=torch.float64) + 3000.0).float().to(DEV)
    w, b = torch.ones(C, device=DEV), torch.zeros(C, device=DEV)
    y = bn_act.population_bn_act(x, P, w, b, None)
    yr = ref.population_bn_act(x.double(), P, w.double(), b.double(), None)
    _close(y, yr, (2e-3, 1e-3))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_act_many_chunks_and_tiles(layout, monkeypatch):
    """Tiny tiles and forced row chunks: exercises the in-chunk and cross-chunk merges and masking."""
    tiles = lambda R, C, S, cl: (2, 4, 1) if cl else (1, 4, 8)  # noqa: E731
    split = lambda x, P, R, C, BR, BC, per_sm=4: (-(-R // 3), 3) if R > 3 else (1, R)  # noqa: E731
    for mod in (bn_stats, bn_act, bn_act_backward):
        monkeypatch.setattr(mod, "tiles", tiles)
    for mod in (bn_stats, bn_act_backward):
        monkeypatch.setattr(mod, "row_split", split)
    P, x, w, b, m, _, _ = _bn_inputs("random", torch.float32, layout, False, B=4, C=6, H=3, W=3)
    xk = x.clone().requires_grad_()
    y = bn_act.population_bn_act(xk, P, w, b, m)
    xr = x.double().requires_grad_()
    yr = ref.population_bn_act(xr, P, w.double(), b.double(), m.double())
    _close(y, yr, FWD_TOL[torch.float32])
    gy = torch.randn_like(y)
    y.backward(gy)
    yr.backward(gy.double())
    _close(xk.grad, xr.grad, BWD_TOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_stats_shifted_sums(layout, monkeypatch):
    """The statistics kernel sums deviations from the mean of each chunk's first tile: an outlier in
    that tile, a large mean with a small spread, and a constant channel (variance exactly >= 0) all
    match float64, with tiny tiles so that the first tile is 2 or 8 elements of a 72-element chunk."""
    monkeypatch.setattr(bn_stats, "tiles", lambda R, C, S, cl: (2, 4, 1) if cl else (1, 4, 8))
    P, B, C, H, W = 2, 8, 6, 3, 3
    g = torch.Generator().manual_seed(3)
    x = torch.randn(P * B, C, H, W, generator=g) * 0.1 + 1000.0
    x[0, 0, 0, 0] = 1050.0  # first element of member 0's first tile, channel 0
    x[:, 1] = 3.0  # constant channel
    x = _layout(x, layout).to(DEV)
    mean, var = bn_stats.batch_stats(x, P)
    v_ref, m_ref = torch.var_mean(x.double().cpu().view(P, B, C, H * W).transpose(1, 2).reshape(P, C, -1), -1,
                                  correction=0)
    _close(mean, m_ref, (1e-3, 1e-6))
    _close(var, v_ref, (1e-6, 1e-4))
    assert bool((var[:, 1] >= 0).all()) and float(var[:, 1].abs().max()) < 1e-9


def test_bn_act_zero_batch_and_bad_shapes():
    x = torch.randn(0, 4, 3, 3, device=DEV)
    y = bn_act.population_bn_act(x, 2, torch.ones(4, device=DEV), torch.zeros(4, device=DEV), None)
    assert y.shape == x.shape
    with pytest.raises(ValueError):
        bn_act.population_bn_act(torch.randn(5, 4, 3, 3, device=DEV), 2, torch.ones(4, device=DEV),
                                 torch.zeros(4, device=DEV), None)
    with pytest.raises(ValueError):
        bn_act.population_bn_act(torch.randn(4, 4, 3, 3, device=DEV), 2, torch.ones(3, device=DEV),
                                 torch.zeros(4, device=DEV), None)


@pytest.mark.parametrize("running", [False, True], ids=["batch", "running"])
def test_bn_act_gradcheck(running):
    P, B, C = 2, 2, 3
    x = torch.randn(P * B, C, 3, 2, dtype=torch.float64, device=DEV, requires_grad=True)
    w = (torch.rand(P, C, dtype=torch.float64, device=DEV) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64, device=DEV, requires_grad=True)
    m = torch.rand(P, C, dtype=torch.float64, device=DEV, requires_grad=True)
    rm = torch.randn(C, dtype=torch.float64, device=DEV) if running else None
    rv = torch.rand(P, C, dtype=torch.float64, device=DEV) + 0.5 if running else None
    fn = lambda x, w, b, m: bn_act.population_bn_act(x, P, w, b, m, rm, rv)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, m), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


# ------------------------------------------------------------------------------------------------
# 3: compacted population convolution (+ fused epilogue)
# ------------------------------------------------------------------------------------------------
CONVS = [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0)]  # (kernel, stride, padding)
# (P, K_in, K_out): odd sizes; single member; all-but-one-dead (one live channel in or out)
SHAPES = [(3, 10, 12), (1, 10, 12), (3, 1, 1), (3, 5, 1)]
EPIS = ["none", "batch", "running"]


def _conv_inputs(P, KI, KO, k, dtype, layout, B=2, H=7):
    x = _layout(torch.randn(B, P * KI, H, H).to(dtype), layout).to(DEV)
    w = (torch.randn(P, KO, KI, k, k) / (KI * k * k) ** 0.5).to(dtype).to(DEV)
    bnw = (torch.rand(P * KO) + 0.5).to(DEV)
    bnb = (torch.randn(P, KO) * 0.3).to(DEV)
    mask = (torch.rand(P * KO) > 0.3).float().to(DEV)
    rm = (torch.randn(P * KO) * 0.3).to(DEV)
    rv = (torch.rand(P * KO) + 0.5).to(DEV)
    return x, w, bnw, bnb, mask, rm, rv


def _conv_call(mod, epi, x, w, s, p, bnw, bnb, mask, rm, rv):
    if epi == "none":
        return mod.grouped_conv(x, w, s, p)
    if epi == "batch":
        return mod.grouped_conv_bn_act(x, w, s, p, bnw, bnb, mask)
    return mod.grouped_conv_bn_act(x, w, s, p, bnw, bnb, mask, rm, rv)


@pytest.mark.parametrize("epi", EPIS)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "k{}s{}p{}".format(*c))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_conv_forward(dtype, layout, conv, epi):
    k, s, p = conv
    x, w, bnw, bnb, mask, rm, rv = _conv_inputs(3, 10, 12, k, dtype, layout)
    y = _conv_call(gconv, epi, x, w, s, p, bnw, bnb, mask, rm, rv)
    yr = _conv_call(ref, epi, x.double(), w.double(), s, p, _d(bnw), _d(bnb), _d(mask), _d(rm), _d(rv))
    assert y.dtype == dtype and y.shape == yr.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    _close(y, yr, FWD_TOL[dtype])


@pytest.mark.parametrize("epi", EPIS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P{}ki{}ko{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_conv_populations(dtype, shape, epi):
    P, KI, KO = shape
    x, w, bnw, bnb, mask, rm, rv = _conv_inputs(P, KI, KO, 3, dtype, "channels_last", B=3, H=5)
    y = _conv_call(gconv, epi, x, w, 1, 1, bnw, bnb, mask, rm, rv)
    yr = _conv_call(ref, epi, x.double(), w.double(), 1, 1, _d(bnw), _d(bnb), _d(mask), _d(rm), _d(rv))
    _close(y, yr, FWD_TOL[dtype])


@pytest.mark.parametrize("epi", ["none", "batch", "running"])
def test_grouped_conv_small_tiles(epi, monkeypatch):
    """Many M, N and K tiles (and the cross-tile merge of the statistics partials); strided weight."""
    monkeypatch.setattr(_conv, "default_config", lambda M, ko, ki, dtype: (16, 16, 16, 4, 1))
    monkeypatch.setattr(_conv.TUNER, "cache", {})
    x, w, bnw, bnb, mask, rm, rv = _conv_inputs(2, 20, 18, 3, torch.float32, "nchw", B=2, H=6)
    w = w.permute(0, 3, 4, 2, 1).contiguous().permute(0, 4, 3, 1, 2)  # K_in-contiguous, same values
    y = _conv_call(gconv, epi, x, w, 1, 1, bnw, bnb, mask, rm, rv)
    yr = _conv_call(ref, epi, x.double(), w.double(), 1, 1, _d(bnw), _d(bnb), _d(mask), _d(rm), _d(rv))
    _close(y, yr, FWD_TOL[torch.float32])


@pytest.mark.parametrize("epi", ["none", "batch", "running"])
@pytest.mark.parametrize("persist", [1, 2])
def test_grouped_conv_persistent_schedule(epi, persist, monkeypatch):
    """The persistent grouped-GEMM schedule (few programs walking every member's tiles) computes what the
    one-tile-per-program grid does: odd M, several N and K tiles, 5 members, single live channel."""
    monkeypatch.setattr(_conv, "default_config", lambda M, ko, ki, dtype: (16, 16, 16, 4, 1, persist))
    monkeypatch.setattr(_conv.TUNER, "cache", {})
    launched = []
    real = _conv.persistent_programs
    monkeypatch.setattr(_conv, "persistent_programs", lambda *a: launched.append(real(*a)) or launched[-1])
    for ki, ko in ((20, 18), (1, 1)):
        x, w, bnw, bnb, mask, rm, rv = _conv_inputs(5, ki, ko, 3, torch.float32, "channels_last", B=2, H=5)
        y = _conv_call(gconv, epi, x, w, 1, 1, bnw, bnb, mask, rm, rv)
        yr = _conv_call(ref, epi, x.double(), w.double(), 1, 1, _d(bnw), _d(bnb), _d(mask), _d(rm), _d(rv))
        _close(y, yr, FWD_TOL[torch.float32])
    tiles = 2 * 2 * 5  # (2*5*5 rows / 16) x (18 channels / 16) x 5 members
    assert launched and launched[0] < tiles  # each program walked several tiles


@pytest.mark.parametrize("epi", EPIS)
def test_grouped_conv_backward(epi):
    x, w, bnw, bnb, mask, rm, rv = _conv_inputs(3, 4, 5, 3, torch.float32, "channels_last", B=2, H=5)
    leaves = [t.clone().requires_grad_() for t in (x, w, bnw, bnb)]
    y = _conv_call(gconv, epi, *leaves[:2], 2, 1, leaves[2], leaves[3], mask, rm, rv)
    rleaves = [t.detach().double().requires_grad_() for t in leaves]
    yr = _conv_call(ref, epi, *rleaves[:2], 2, 1, rleaves[2], rleaves[3], _d(mask), _d(rm), _d(rv))
    gy = torch.randn(y.shape, device=DEV)
    y.backward(gy)
    yr.backward(gy.double())
    n = 2 if epi == "none" else 4
    for a, e in zip(leaves[:n], rleaves[:n]):
        _close(a.grad, e.grad, BWD_TOL[torch.float32])


@pytest.mark.parametrize("epi", EPIS)
def test_grouped_conv_gradcheck(epi):
    P, KI, KO = 2, 2, 3
    f64 = dict(dtype=torch.float64, device=DEV)
    x = torch.randn(2, P * KI, 4, 4, **f64).requires_grad_()
    w = torch.randn(P, KO, KI, 3, 3, **f64).requires_grad_()
    bnw = (torch.rand(P * KO, **f64) + 0.5).requires_grad_()
    bnb = torch.randn(P, KO, **f64).requires_grad_()
    mask = torch.rand(P * KO, **f64).requires_grad_()
    rm, rv = torch.randn(P * KO, **f64), torch.rand(P * KO, **f64) + 0.5
    fn = lambda x, w, a, b, m: _conv_call(gconv, epi, x, w, 2, 1, a, b, m, rm, rv)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, bnw, bnb, mask), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


def test_grouped_conv_bad_shapes():
    with pytest.raises(ValueError):
        gconv.grouped_conv(torch.randn(1, 7, 5, 5, device=DEV), torch.randn(2, 3, 3, 3, 3, device=DEV))
    with pytest.raises(ValueError):
        gconv.grouped_conv_bn_act(torch.randn(1, 6, 5, 5, device=DEV), torch.randn(2, 3, 3, 3, 3, device=DEV), 1, 1,
                                  torch.ones(5, device=DEV), torch.zeros(6, device=DEV), None)


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck on every op (schema, autograd registration, fake tensor, AOT dispatch)
# ------------------------------------------------------------------------------------------------
def _opcheck_cases():
    P, C = 3, 5
    x = torch.randn(P * 2, C, 3, 3, device=DEV, requires_grad=True)
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(P, C, device=DEV, requires_grad=True)
    b = torch.randn(C, device=DEV, requires_grad=True)
    m = torch.rand(P, C, device=DEV, requires_grad=True)
    rm, rv = torch.randn(C, device=DEV), torch.rand(P, C, device=DEV) + 0.5
    mean, var = torch.randn(P, C, device=DEV), torch.rand(P, C, device=DEV) + 0.5
    gx = torch.randn(2, 3 * 4, 5, 5, device=DEV, requires_grad=True)
    gw = torch.randn(3, 6, 4, 3, 3, device=DEV, requires_grad=True)
    from fastweedout.ops.triton import fused_conv  # noqa: F401  (registers fastweedout::fused_conv)
    bnw, bnb = torch.rand(18, device=DEV, requires_grad=True), torch.randn(3, 6, device=DEV, requires_grad=True)
    gm = torch.rand(18, device=DEV)
    grm, grv = torch.randn(18, device=DEV), torch.rand(18, device=DEV) + 0.5
    ops = torch.ops.fastweedout
    return {
        "bn_batch": (ops.population_bn_act.default, (x, P, w, b, m, None, None, 1e-5)),
        "bn_batch_cl_nomask": (ops.population_bn_act.default, (xcl, P, w, b, None, None, None, 1e-5)),
        "bn_running": (ops.population_bn_act.default, (x, P, w, b, m, rm, rv, 1e-5)),
        "bn_backward_batch": (ops.population_bn_act_backward.default,
                              (torch.randn(P * 2, C, 3, 3, device=DEV), x.detach(), P, w.detach(), b.detach(),
                               m.detach(), None, None, mean, var, 1e-5)),
        "bn_backward_running": (ops.population_bn_act_backward.default,
                                (torch.randn(P * 2, C, 3, 3, device=DEV), xcl.detach(), P, w.detach(), b.detach(),
                                 None, rm, rv, mean, var, 1e-5)),
        "conv": (ops.grouped_conv.default, (gx, gw, 1, 1)),
        "conv_s2": (ops.grouped_conv.default, (gx.detach().to(memory_format=torch.channels_last), gw, 2, 0)),
        "conv_bn_batch": (ops.grouped_conv_bn_act.default, (gx, gw, 1, 1, bnw, bnb, gm, None, None, 1e-5)),
        "conv_bn_running": (ops.grouped_conv_bn_act.default, (gx, gw, 2, 1, bnw, bnb, None, grm, grv, 1e-5)),
        # the fused pass (forward only: scoring runs without gradients)
        "fused_conv_all": (ops.fused_conv.default,
                           (gx.detach().to(memory_format=torch.channels_last), gw.detach(), 1, 1,
                            torch.rand(12, device=DEV), torch.randn(12, device=DEV),
                            torch.randn(2, 18, 5, 5, device=DEV), True)),
        "fused_conv_plain": (ops.fused_conv.default, (gx.detach(), gw.detach(), 2, 0, None, None, None, False)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)
