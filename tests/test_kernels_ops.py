"""fastweedout.ops.dispatch dispatch: kernels switched on give the reference's results (ops and engines end to
end); switched off (or where they cannot run) ops *are* the reference."""

from __future__ import annotations

import pytest
import torch

from fastweedout.ops import dispatch as ops
from fastweedout.ops import reference as ref

pytest.importorskip("triton")
from fastweedout.ops.triton import common

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if not (common.INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

TOL = dict(atol=1e-4, rtol=1e-4) if common.INTERPRET else dict(atol=2e-2, rtol=1e-2)  # fp32 (tf32 on GPU)


def _bn_args(running: bool):
    P, C = 3, 10
    x = torch.randn(P * 2, C, 7, 7, device=DEV)
    rm = torch.randn(C, device=DEV) if running else None
    rv = torch.rand(C, device=DEV) + 0.5 if running else None
    return (x, P, torch.rand(P, C, device=DEV), torch.randn(C, device=DEV),
            (torch.rand(P, C, device=DEV) > 0.5).float(), rm, rv, 1e-5)


def _conv_args():
    return (torch.randn(2, 3 * 4, 7, 7, device=DEV), torch.randn(3, 5, 4, 3, 3, device=DEV), 2, 1)


def _conv_bn_args(running: bool):
    x, w, s, p = _conv_args()
    return (x, w, s, p, torch.rand(15, device=DEV), torch.randn(3, 5, device=DEV),
            (torch.rand(15, device=DEV) > 0.5).float(),
            torch.randn(15, device=DEV) if running else None, torch.rand(15, device=DEV) + 0.5 if running else None,
            1e-5)


CASES = {
    "bn_batch": (ops.population_bn_act, ref.population_bn_act, lambda: _bn_args(False)),
    "bn_running": (ops.population_bn_act, ref.population_bn_act, lambda: _bn_args(True)),
    "conv": (ops.grouped_conv, ref.grouped_conv, _conv_args),
    "conv_bn_batch": (ops.grouped_conv_bn_act, ref.grouped_conv_bn_act, lambda: _conv_bn_args(False)),
    "conv_bn_running": (ops.grouped_conv_bn_act, ref.grouped_conv_bn_act, lambda: _conv_bn_args(True)),
}


def _spy(monkeypatch):
    """Count calls into the kernel entry points."""
    calls = []
    from fastweedout.ops.triton import bn_act, grouped_conv
    for mod, name in [(bn_act, "population_bn_act"), (grouped_conv, "grouped_conv"),
                      (grouped_conv, "grouped_conv_bn_act")]:
        orig = getattr(mod, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_ops_with_kernels_equal_reference(case, monkeypatch):
    op, reference, make = CASES[case]
    args = make()
    calls = _spy(monkeypatch)
    with ops.use_kernels(True):
        assert ops.kernels_active(args[0])
        y = op(*args)
    assert calls, "the kernels were not used"
    torch.testing.assert_close(y, reference(*args), **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_ops_without_kernels_are_the_reference(case, monkeypatch):
    op, reference, make = CASES[case]
    args = make()
    calls = _spy(monkeypatch)
    with ops.use_kernels(False):
        assert not ops.kernels_active(args[0])
        y = op(*args)
    assert not calls
    assert torch.equal(y, reference(*args))


def test_env_switch_and_context_override(monkeypatch):
    x = torch.randn(2, 3, 4, 4, device=DEV)
    monkeypatch.setenv("FASTWEEDOUT_KERNELS", "1")
    assert ops.kernels_enabled() is True and ops.kernels_active(x)
    monkeypatch.setenv("FASTWEEDOUT_KERNELS", "0")
    assert ops.kernels_enabled() is False and not ops.kernels_active(x)
    with ops.use_kernels(True):
        assert ops.kernels_active(x)
        with ops.use_kernels(None):  # back to the environment
            assert not ops.kernels_active(x)
    assert not ops.kernels_active(x)
    monkeypatch.delenv("FASTWEEDOUT_KERNELS")
    assert ops.kernels_enabled() is None
    assert ops.kernels_active(x) == (DEV == "cuda")  # auto: CUDA only


@pytest.mark.skipif(not common.INTERPRET, reason="interpreter-only fallback")
def test_bf16_under_interpreter_falls_back(monkeypatch):
    args = list(_bn_args(False))
    args[0] = args[0].bfloat16()
    calls = _spy(monkeypatch)
    with ops.use_kernels(True):
        assert not ops.kernels_active(args[0])
        y = ops.population_bn_act(*args)
    assert not calls
    assert torch.equal(y, ref.population_bn_act(*args))


def test_ops_kernels_backward_matches_reference():
    x, P, w, b, m, _, _, eps = _bn_args(False)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gy = torch.randn_like(x)
    with ops.use_kernels(True):
        ops.population_bn_act(xk, P, wk, b, m).backward(gy)
    ref.population_bn_act(xr, P, wr, b, m).backward(gy)
    torch.testing.assert_close(xk.grad, xr.grad, **TOL)
    torch.testing.assert_close(wk.grad, wr.grad, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# engines end to end with the kernels switched in
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn", ["batch", "running"])
@pytest.mark.parametrize("engine", ["folded", "compact"])
def test_engines_with_kernels_match_loop(engine, bn):
    scoring = pytest.importorskip("fastweedout.engines.scoring")
    from fastweedout import WideResNet, sample_masks
    torch.manual_seed(0)
    model = WideResNet(depth=10, width=1, num_classes=5, in_channels=3).to(DEV).eval()
    if bn == "running":  # non-trivial running statistics
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    masks = sample_masks(model, 3, 0.5, generator=0)
    images = torch.randn(2, 3, 8, 8, device=DEV)
    with ops.use_kernels(False):
        expected = scoring.population_logits(model, masks, images, "loop", bn)
    with ops.use_kernels(True):
        got = scoring.population_logits(model, masks, images, engine, bn)
    torch.testing.assert_close(got, expected, atol=2e-4 if common.INTERPRET else 5e-2, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the custom ops are single opaque nodes, no graph break
# ------------------------------------------------------------------------------------------------
def _compiled_step(backend: str):
    P, C = 3, 10
    x = torch.randn(P * 2, C, 5, 5, device=DEV, requires_grad=True)
    w, b, m = torch.rand(P, C, device=DEV), torch.randn(C, device=DEV), (torch.rand(P, C, device=DEV) > .5).float()
    cw = torch.randn(3, 4, 10, 3, 3, device=DEV) / 10

    def f(x):
        y = ops.population_bn_act(x, P, w, b, m).reshape(2, P * C, 5, 5)
        z = ops.grouped_conv(y, cw, 1, 1)
        return ops.grouped_conv_bn_act(z, cw[:, :2, :4, :1, :1].contiguous(), 1, 0, torch.ones(6, device=DEV),
                                       torch.zeros(6, device=DEV), None).square().sum()

    with ops.use_kernels(True):
        out = torch.compile(f, fullgraph=True, backend=backend)(x)
        (gx,) = torch.autograd.grad(out, x)
        expected = f(x)
        (ex,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(gx, ex, **TOL)


def test_compile_fullgraph_aot_eager():
    _compiled_step("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _compiled_step("inductor")


def test_gather_conv_weight_matches_indexing_and_conv():
    """One gather (functional.gather_conv_weight, re-exported by ops), straight into the packed layout."""
    from fastweedout.ops.triton import _conv, grouped_conv
    assert ops.gather_conv_weight is ref.gather_conv_weight
    assert not hasattr(grouped_conv, "gather_weight") and not hasattr(_conv, "gather_weight")
    w = torch.randn(7, 6, 3, 3, device=DEV)
    io = torch.stack([torch.randperm(7)[:4] for _ in range(3)]).to(DEV)
    ii = torch.stack([torch.randperm(6)[:2] for _ in range(3)]).to(DEV)
    g = ops.gather_conv_weight(w, io, ii)
    expected = w[io[:, :, None], ii[:, None, :]]
    assert torch.equal(g, expected) and g.stride(1) == 1
    assert torch.equal(_conv.pack_weight(expected), expected) and _conv.pack_weight(expected).stride(1) == 1
    x = torch.randn(2, 3 * 2, 5, 5, device=DEV).to(memory_format=torch.channels_last)
    with ops.use_kernels(True):
        y = ops.grouped_conv(x, g, 1, 1)
    torch.testing.assert_close(y, ref.grouped_conv(x, expected, 1, 1), **TOL)
