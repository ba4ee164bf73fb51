"""GPU-path fixes and the fused pass, each against the reference (fastweedout.ops.reference).

Under TRITON_INTERPRET=1 on CPU (tiny odd shapes, fp32/fp16); the same tests run on a GPU. What
only a GPU shows is proved by tests/test_kernels_aot.py (PTX) and the ``gpu`` tests here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastweedout.ops import dispatch as ops
from fastweedout.ops import reference as ref

pytest.importorskip("triton")
from fastweedout.ops.triton import _conv, bn_act, bn_act_backward, bn_stats, common, grouped_conv
from fastweedout.ops.triton import fused_conv as conv_block

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if not (common.INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# (atol, rtol) against the float64 reference; fp32 on a GPU runs tl.dot as tf32
TOL = {torch.float32: (1e-4, 1e-4) if common.INTERPRET else (2e-2, 1e-2), torch.float16: (2e-2, 1e-2)}
if not common.INTERPRET:
    TOL[torch.bfloat16] = (1e-1, 5e-2)
CL = torch.channels_last


def _close(a, e, tol):
    torch.testing.assert_close(a.double().cpu(), e.double().cpu(), atol=tol[0], rtol=tol[1], equal_nan=True)


# ------------------------------------------------------------------------------------ NaN stays NaN
def _nan_case(kind: str):
    """(kernel result, reference result) with one NaN in the input."""
    g = torch.Generator().manual_seed(0)
    if kind.startswith("bn"):
        P, C = 3, 6
        x = torch.randn(P * 2, C, 3, 5, generator=g)
        x[3, 2, 1, 1] = float("nan")  # member 1, channel 2
        x = (x.to(memory_format=CL) if kind.endswith("cl") else x).to(DEV)
        w, b, m = torch.rand(P, C).to(DEV) + 0.5, torch.randn(C).to(DEV), torch.ones(P, C).to(DEV)
        rm, rv = (torch.randn(C).to(DEV), torch.rand(C).to(DEV) + 0.5) if "running" in kind else (None, None)
        return (bn_act.population_bn_act(x, P, w, b, m, rm, rv),
                ref.population_bn_act(x.double(), P, w.double(), b.double(), m.double(), _d(rm), _d(rv)))
    x = torch.randn(2, 3 * 4, 5, 5, generator=g)
    x[1, 5, 2, 2] = float("nan")  # member 1's input
    x = x.to(DEV)
    w = torch.randn(3, 2, 4, 3, 3, generator=g).to(DEV)
    if kind == "conv_running_epilogue":
        n = 6
        args = (torch.rand(n) + 0.5, torch.randn(n), torch.ones(n), torch.randn(n), torch.rand(n) + 0.5)
        args = [a.to(DEV) for a in args]
        return (grouped_conv.grouped_conv_bn_act(x, w, 1, 1, *args),
                ref.grouped_conv_bn_act(x.double(), w.double(), 1, 1, *[a.double() for a in args]))
    if kind == "fused_prologue":
        sc, sh = torch.rand(12).to(DEV) + 0.5, torch.randn(12).to(DEV)
        return (conv_block.fused_conv(x, w, 1, 1, sc, sh, None, True)[0],
                ref.fused_conv(x.double(), w.double(), 1, 1, sc, sh, None, True)[0])
    sc, sh = torch.rand(12).to(DEV), torch.randn(12).to(DEV)  # affine apply (the fused engine's head)
    with ops.use_kernels(True):
        return ops.affine_relu(x, sc, sh), ref.affine_relu(x.double(), sc, sh)


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("kind", ["bn_batch_nchw", "bn_batch_cl", "bn_running_cl", "conv_running_epilogue",
                                  "fused_prologue", "affine"])
def test_relu_keeps_nan(kind):
    """tl.maximum(v, 0) drops NaN (max.f32 on a GPU, np.fmax in the interpreter): a diverged member
    would score a finite fitness. Every kernel's ReLU keeps NaN exactly where the reference has it."""
    y, yr = _nan_case(kind)
    assert bool(yr.isnan().any())
    assert torch.equal(y.isnan().cpu(), yr.isnan().cpu())
    _close(y, yr, TOL[torch.float32])


# ------------------------------------------------------------------------------------ the fused pass
GEOMS = [(3, 1, 1), (3, 2, 1), (1, 2, 0)]
MODES = [(pro, res, st) for pro in (False, True) for res in (False, True) for st in (False, True)]


def _fused_inputs(dtype, layout, k, s, p, P=3, KI=5, KO=4, B=2, H=5, W=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, P * KI, H, W, generator=g).to(dtype)
    x = (x.to(memory_format=CL) if layout == "cl" else x).to(DEV)
    w = (torch.randn(P, KO, KI, k, k, generator=g) / (KI * k * k) ** 0.5).to(dtype).to(DEV)
    ho, wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    res = torch.randn(B, P * KO, ho, wo, generator=g).to(dtype).to(DEV)
    sc = (torch.rand(P * KI, generator=g) + 0.5).to(DEV)
    sh = (torch.randn(P * KI, generator=g) + 0.5).to(DEV)  # positive shifts: relu(shift) != 0 at the padding
    return x, w, res, sc, sh


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "pro{}res{}stats{}".format(*map(int, m)))
@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "k{}s{}p{}".format(*g))
def test_fused_conv_matches_reference(geom, mode):
    k, s, p = geom
    pro, res_on, stats = mode
    x, w, res, sc, sh = _fused_inputs(torch.float32, "cl", k, s, p)
    args = (sc, sh) if pro else (None, None)
    y, mean, var = conv_block.fused_conv(x, w, s, p, *args, res if res_on else None, stats)
    yr, mr, vr = ref.fused_conv(x.double(), w.double(), s, p, *map(_d, args), _d(res) if res_on else None, stats)
    assert y.shape == yr.shape and y.is_contiguous(memory_format=CL)
    _close(y, yr, TOL[torch.float32])
    assert mean.numel() == (y.shape[1] if stats else 0)
    if stats:
        _close(mean, mr, TOL[torch.float32])
        _close(var, vr, TOL[torch.float32])


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "k{}s{}p{}".format(*g))
def test_fused_conv_persistent_schedule_matches_reference(geom, monkeypatch):
    """Prologue, residual and statistics partials under the persistent schedule (few programs, every
    member's tiles): the moments of each M tile land where the merge reads them."""
    k, s, p = geom
    monkeypatch.setattr(_conv, "default_config", lambda M, ko, ki, dtype: (16, 16, 16, 4, 1, 2))
    monkeypatch.setattr(_conv.TUNER, "cache", {})
    x, w, res, sc, sh = _fused_inputs(torch.float32, "cl", k, s, p)
    y, mean, var = conv_block.fused_conv(x, w, s, p, sc, sh, res, True)
    yr, mr, vr = ref.fused_conv(x.double(), w.double(), s, p, _d(sc), _d(sh), _d(res), True)
    _close(y, yr, TOL[torch.float32])
    _close(mean, mr, TOL[torch.float32])
    _close(var, vr, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [d for d in TOL if d != torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_fused_conv_low_precision_and_layouts(dtype, layout):
    x, w, res, sc, sh = _fused_inputs(dtype, layout, 3, 1, 1, P=2, KI=3, KO=5)
    y, mean, var = conv_block.fused_conv(x, w, 1, 1, sc, sh, res.contiguous(), True)  # residual in NCHW
    yr, mr, vr = ref.fused_conv(x, w, 1, 1, sc, sh, res, True)
    assert y.dtype == dtype
    _close(y, yr, TOL[dtype])
    _close(mean, mr, TOL[dtype])
    _close(var, vr, (TOL[dtype][0] * 4, TOL[dtype][1] * 4))


def test_fused_conv_keeps_padding_zero():
    """The prologue transforms loaded values only: out-of-image taps stay 0, not relu(shift)."""
    P, KI = 2, 3
    x = torch.zeros(1, P * KI, 4, 4, device=DEV).to(memory_format=CL)
    w = torch.ones(P, 1, KI, 3, 3, device=DEV)
    sc, sh = torch.zeros(P * KI, device=DEV), torch.ones(P * KI, device=DEV)  # a = relu(0 * x + 1) = 1
    y = conv_block.fused_conv(x, w, 1, 1, sc, sh)[0]
    taps = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.float32) * KI
    assert torch.equal(y.cpu(), taps.expand(1, P, 4, 4))
    assert torch.equal(y.cpu(), ref.fused_conv(x, w, 1, 1, sc, sh)[0].cpu())


def test_fused_conv_single_live_channel_and_bad_input():
    x, w, res, sc, sh = _fused_inputs(torch.float32, "cl", 3, 1, 1, P=4, KI=1, KO=1)
    y, mean, var = conv_block.fused_conv(x, w, 1, 1, sc, sh, res, True)
    yr, mr, vr = ref.fused_conv(x.double(), w.double(), 1, 1, _d(sc), _d(sh), _d(res), True)
    for a, e in ((y, yr), (mean, mr), (var, vr)):
        _close(a, e, TOL[torch.float32])
    with pytest.raises(ValueError, match="in_shift"):
        conv_block.fused_conv(x, w, 1, 1, sc, None)
    with pytest.raises(ValueError, match="residual"):
        conv_block.fused_conv(x, w, 1, 1, residual=res[:, :, :2])
    with pytest.raises(ValueError, match="in_scale"):
        conv_block.fused_conv(x, w, 1, 1, sc[:2], sh[:2])


class _Recorder:
    """Wraps a @triton.jit kernel: records each launch (its constexpr arguments and ``state()``), then
    launches it."""

    def __init__(self, kernel, log, name, state=lambda: None):
        self.kernel, self.log, self.name, self.state = kernel, log, name, state

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.name, self.state(), kwargs))
            return launch(*args, **kwargs)
        return run


def test_statistics_merge_in_two_parallel_levels(monkeypatch):
    """Many partials (small conv tiles, or many row chunks): a level of groups merged in parallel,
    then the final level; the same statistics as one pass in float64."""
    log = []
    monkeypatch.setattr(bn_stats, "_stats_merge_kernel", _Recorder(bn_stats._stats_merge_kernel, log, "merge"))
    monkeypatch.setattr(bn_stats, "LEVEL1_MIN_T", 2)
    monkeypatch.setattr(bn_stats, "num_sms", lambda x: 16)
    monkeypatch.setattr(_conv, "default_config", lambda M, ko, ki, dtype: (16, 16, 16, 4, 1))
    monkeypatch.setattr(_conv.TUNER, "cache", {})
    x, w, res, sc, sh = _fused_inputs(torch.float32, "cl", 3, 1, 1, P=2, KI=3, KO=3, B=3, H=6, W=7)
    x = x + 1000.0  # a large mean: Chan's merge has no E[x^2] - E[x]^2 cancellation
    y, mean, var = conv_block.fused_conv(x, w, 1, 1, None, None, res, True)  # M = 126 rows: 8 tiles of 16
    yr, mr, vr = ref.fused_conv(x.double(), w.double(), 1, 1, None, None, _d(res), True)
    assert [kw["FINAL"] for _, _, kw in log] == [False, True]
    _close(y, yr, TOL[torch.float32])
    # The merge against the statistics of the y it wrote: on a GPU the conv itself runs as tf32 (a 1e-3
    # relative error at this mean), which says nothing about the merge.
    v_own, m_own = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    _close(mean, m_own, (1e-3, 1e-5))
    _close(var, v_own, (1e-3, 1e-4))
    if common.INTERPRET:  # fp32 arithmetic: also the float64 reference's own statistics
        _close(mean, mr, (1e-3, 1e-5))
        _close(var, vr, (1e-3, 1e-4))
    log.clear()
    xb = torch.randn(4 * 8, 5, 3, 3, device=DEV) * 2 + 500.0
    m, v = bn_stats.batch_stats(xb, 4)
    v_ref, m_ref = torch.var_mean(xb.double().view(4, 8, 5, 9).transpose(1, 2).reshape(4, 5, -1), -1, correction=0)
    _close(m, m_ref, (1e-3, 1e-6))
    _close(v, v_ref, (1e-3, 1e-4))


# ------------------------------------------------------------------------------------ launches
def test_config_tuner_is_safe():
    from triton.runtime.errors import OutOfResources

    t = common.ConfigTuner()
    times = {(1,): 3.0, (2,): 1.0, (3,): 2.0}
    built = []

    def build(cfg):
        built.append(cfg)
        if cfg == (3,):
            raise OutOfResources(1, 0, "shared memory")

    pick = lambda key, **kw: t.pick(key, [(1,), (2,), (3,)], (9,), build=build,  # noqa: E731
                                    timer=lambda c: times[c], **kw)
    assert pick("a", enabled=False) == (9,) and "a" not in t.cache  # tuning off: the default, not cached
    assert pick("a", enabled=True, capturing=lambda: True) == (9,) and "a" not in t.cache  # CUDA graph capture
    assert not built
    assert pick("a", enabled=True) == (2,) and t.cache["a"] == (2,)  # the fastest; (3,) skipped (compile error)
    assert pick("a", enabled=True) == (2,) and built == [(1,), (2,), (3,)]  # cached: nothing rebuilt

    def sticky(cfg):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):  # never swallowed
        t.pick("b", [(1,)], (9,), enabled=True, build=sticky, timer=lambda c: 0.0)


KERNELS = [(bn_stats, "_bn_stats_kernel"), (bn_stats, "_stats_merge_kernel"), (bn_act, "_bn_apply_kernel"),
           (bn_act_backward, "_bn_bwd_reduce_kernel"), (bn_act_backward, "_bn_bwd_apply_kernel"),
           (_conv, "_conv_kernel")]


def test_every_launch_is_guarded_by_its_inputs_device(monkeypatch):
    """Launchers run on the input's device, not the current one: every launch of every kernel happens
    inside ``device_guard`` of a tensor on the input's device."""
    active, log = [], []

    @contextlib.contextmanager
    def guard(x):
        active.append(x.device)
        try:
            yield
        finally:
            active.pop()

    for mod in (bn_stats, bn_act, bn_act_backward, _conv):
        monkeypatch.setattr(mod, "device_guard", guard)
    for mod, name in KERNELS:
        monkeypatch.setattr(mod, name, _Recorder(getattr(mod, name), log, name, lambda: active[-1] if active else None))
    x = torch.randn(4, 3, 3, 3, device=DEV, requires_grad=True)
    w, b = torch.rand(3, device=DEV) + 0.5, torch.randn(3, device=DEV)
    bn_act.population_bn_act(x, 2, w, b, None).sum().backward()
    bn_act.population_bn_act(x, 2, w, b, None, torch.zeros(3, device=DEV), torch.ones(3, device=DEV)).sum().backward()
    xc, wc, res, sc, sh = _fused_inputs(torch.float32, "cl", 3, 1, 1, P=2, KI=2, KO=2)
    grouped_conv.grouped_conv_bn_act(xc, wc, 1, 1, torch.ones(4, device=DEV), torch.zeros(4, device=DEV), None)
    conv_block.fused_conv(xc, wc, 1, 1, sc, sh, res, True)
    assert {name for name, _, _ in log} == {name for _, name in KERNELS}
    assert all(dev == x.device for _, dev, _ in log), [(n, d) for n, d, _ in log]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_the_second_device():
    x, w, res, sc, sh = (t.to("cuda:1") for t in _fused_inputs(torch.float32, "cl", 3, 1, 1))
    with torch.cuda.device(0):
        y = conv_block.fused_conv(x, w, 1, 1, sc, sh, res, True)[0]
        yb = bn_act.population_bn_act(y.contiguous(), 2, torch.ones(12, device="cuda:1"),
                                      torch.zeros(12, device="cuda:1"), None)
    _close(y, ref.fused_conv(x, w, 1, 1, sc, sh, res, True)[0], TOL[torch.float32])
    _close(yb, ref.population_bn_act(y.contiguous(), 2, torch.ones(12, device="cuda:1"),
                                     torch.zeros(12, device="cuda:1"), None), TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.slow
def test_gathered_weights_past_2_31_elements():
    """600 members at width 640: 2.2e9 weight elements (4.4 GB in bf16). int32 offsets would wrap."""
    P, K = 600, 640
    # [P, K_out, K_in, 3, 3] stored as [3, 3, P, K_in, K_out]: the packed layout the engine gathers into
    w = torch.empty(3, 3, P, K, K, device="cuda", dtype=torch.bfloat16).permute(2, 4, 3, 0, 1)
    assert w.numel() > 2**31 and w.stride(1) == 1
    w[-1].normal_(0, 0.02)
    w[:-1].zero_()
    x = torch.randn(1, P * K, 3, 3, device="cuda", dtype=torch.bfloat16).to(memory_format=CL)
    y = ops.grouped_conv(x, w, 1, 1)
    last = torch.nn.functional.conv2d(x[:, -K:].float(), w[-1].float(), padding=1)
    _close(y[:, -K:], last, (0.1, 0.05))
    assert not bool(y[:, :-K].any())


# ------------------------------------------------------------------------------------ dispatch
def test_kernels_unavailable_on_cuda_fail_loudly(monkeypatch):
    monkeypatch.setattr(ops, "_kernels_mod", ImportError("No module named 'triton'"))
    cuda_like = types.SimpleNamespace(is_cuda=True)
    with pytest.raises(ops.KernelsUnavailable, match="FASTWEEDOUT_KERNELS=0"):
        ops.kernels_active(cuda_like)
    with ops.use_kernels(False):
        assert not ops.kernels_active(cuda_like)  # the reference, chosen explicitly
    with ops.use_kernels(True):
        assert not ops.kernels_active(torch.zeros(1))  # CPU: the reference is the CPU path


def test_library_never_sets_triton_interpret():
    code = ("import os, torch, fastweedout as fw\n"
            "from fastweedout.ops import dispatch as ops\n"
            "m = fw.create_model('wrn_10_1')\n"
            "masks = fw.sample_masks(m, 2, 0.5, generator=0)\n"
            "x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))\n"
            "for e in ('folded', 'compact'):\n"
            "    fw.score_population(m, masks, x, y, engine=e)\n"
            "ops.kernels_active(x)\n"
            "print('TRITON_INTERPRET' in os.environ)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTWEEDOUT_KERNELS="1", CUDA_VISIBLE_DEVICES="")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
