"""Compacted population convolution: a grouped implicit-GEMM Triton kernel with a fused epilogue.

Each member p has its own weights ``[K_out, K_in, kh, kw]`` over its live channels:
``x [B, P*K_in, H, W] -> y [B, P*K_out, H', W']`` (member-major channels), i.e. ``F.conv2d(...,
groups=P)`` (reference: :func:`fastweedout.functional.grouped_conv`). Per member it is a GEMM of
``M = B*H'*W'`` output pixels by ``N = K_out`` by ``K = K_in*kh*kw``; the kernel walks the kh*kw
taps and K_in in blocks, loading the shifted input tile directly
(no im2col buffer), all in one flat loop over (tap, K_in block) that Triton software-pipelines.
Any strides work for x and y, but only channels_last x (K_in contiguous) gives vector loads / cp.async
for the A tile: feed it channels_last (an NCHW x works, slowly). The weight is used K_out-contiguous
(:func:`pack_weight`; the launcher repacks other layouts, a copy of the weights per call, which
:func:`gather_weight` avoids by gathering straight into that layout). Checked with ptxas for sm_90
(tests/test_kernels_aot.py): with these layouts the bf16 configs compile to wgmma with cp.async
pipelining and (all but two configs) no register spills; with unknown strides they spill heavily.

Epilogues (``EPI: tl.constexpr``):
  0. none: y = conv(x).
  1. running BN: y = mask * relu(conv(x) * scale + shift), scale/shift folded in the prologue of the
     epilogue from (bn_weight, bn_bias, running_mean, running_var) -- one write, no extra pass.
  2. batch BN via partial sums: y = conv(x) is written and each (M-tile, channel) writes the tile's
     mean and M2 (of the values as rounded to y's dtype, as the reference sees them). Then
     ``bn_act.finalize_stats`` merges them (Chan) and ``bn_act.apply_bn_act`` normalises y in place:
     conv write + one read + one write, instead of conv write + stats read + apply read + write.

The fused entry point :func:`grouped_conv_bn_act` takes the BN parameters, mask and running
statistics per output channel (``[P*K_out]`` or ``[P, K_out]``) -- the compact engine's layout, where
``population_bn_act`` is called with ``members=1, C=P*K_out``. Its reference is
:func:`fastweedout.functional.grouped_conv_bn_act`.

Backward: the grouped convolution's input and weight gradients use PyTorch
(``aten.convolution_backward`` with ``groups=P``, i.e. cuDNN); the fused op recomputes the raw
convolution with the Triton kernel and chains the Triton BN backward into it.

Registration: ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` (see
``bn_act.py``: ``triton_op`` fails opcheck's fake-tensor tests under ``TRITON_INTERPRET=1``; a
custom_op passes and stays one opaque node under ``torch.compile(fullgraph=True)``).

Block sizes: one config from a heuristic (default), or on a GPU with ``FASTWEEDOUT_AUTOTUNE=1`` the best
of a few configs timed once per shape with ``triton.testing.do_bench`` and cached in-process (each
config compiles once per machine: ~0.5 s each, Triton's disk cache keeps them). Not
``triton.autotune``: the launcher must know BLOCK_M to size the partial-sum buffer.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastweedout import functional as ref

from . import bn_act
from ._common import INTERPRET, acc_dtype, cdiv, memory_format, npow2, stat_dtype

__all__ = ["grouped_conv", "grouped_conv_bn_act", "grouped_conv_forward", "grouped_conv_bn_act_forward",
           "pack_weight", "gather_weight", "reference", "reference_bn_act"]

reference = ref.grouped_conv


def reference_bn_act(*args, **kwargs):
    return ref.grouped_conv_bn_act(*args, **kwargs)


EPI_NONE, EPI_RUNNING, EPI_STATS = 0, 1, 2


@triton.jit
def _gconv_kernel(x_ptr, w_ptr, y_ptr,
                  bnw_ptr, bnb_ptr, mask_ptr, rm_ptr, rv_ptr, pmean_ptr, pm2_ptr,
                  H, W, HO, WO, M, KIN, KOUT, CTOT, eps,
                  sxb, sxc, sxh, sxw,
                  swp, swo, swi, swr, sws,
                  syb, syc, syh, syw,
                  STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  EPI: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    p = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < KOUT
    howo = HO * WO
    b = (offs_m // howo).to(tl.int64)
    rem = offs_m % howo
    oh = rem // WO
    ow = rem % WO
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    x_base = x_ptr + p * KIN * sxc                    # this member's first input channel
    x_rows = b * sxb                                  # [BM] int64
    w_base = w_ptr + p * swp
    w_cols = offs_n * swo                             # [BN]
    acc = tl.zeros([BM, BN], ACC)
    # One flat loop over (tap, K_in block) so the pipeliner (num_stages) prefetches across taps.
    nkb = tl.cdiv(KIN, BK)
    for it in range(0, KH * KW * nkb):
        tap = it // nkb
        kb = it - tap * nkb
        r = tap // KW
        s = tap - r * KW
        ih = ih0 + r
        iw = iw0 + s
        a_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        kk = kb * BK + offs_k
        k_ok = kk < KIN
        a_off = x_rows + ih * sxh + iw * sxw
        a = tl.load(x_base + a_off[:, None] + kk[None, :] * sxc, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + r * swr + s * sws + kk[:, None] * swi + w_cols[None, :],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PREC, out_dtype=ACC)

    ch = p * KOUT + offs_n                                # global output channel, [BN]
    ok = m_ok[:, None] & n_ok[None, :]
    y_rows = b * syb + oh * syh + ow * syw              # [BM] int64
    y_offs = p * KOUT * syc + y_rows[:, None] + (offs_n * syc)[None, :]
    if EPI == 1:
        g = tl.load(bnw_ptr + ch, mask=n_ok, other=0.0).to(ACC)
        beta = tl.load(bnb_ptr + ch, mask=n_ok, other=0.0).to(ACC)
        rm = tl.load(rm_ptr + ch, mask=n_ok, other=0.0).to(ACC)
        rv = tl.load(rv_ptr + ch, mask=n_ok, other=1.0).to(ACC)
        scale = g / tl.sqrt(rv + eps)
        shift = beta - rm * scale
        out = tl.maximum(acc * scale[None, :] + shift[None, :], 0.0)
        if HAS_MASK:
            mk = tl.load(mask_ptr + ch, mask=n_ok, other=0.0).to(ACC)
            out = out * mk[None, :]
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        yv = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + y_offs, yv, mask=ok)
        if EPI == 2:
            yf = tl.where(ok, yv.to(ACC), 0.0)
            cnt = tl.sum(m_ok.to(ACC), 0)
            t_mean = tl.sum(yf, 0) / cnt
            d = tl.where(ok, yf - t_mean[None, :], 0.0)
            t_m2 = tl.sum(d * d, 0)
            pidx = pid_m.to(tl.int64) * CTOT + ch
            tl.store(pmean_ptr + pidx, t_mean, mask=n_ok)
            tl.store(pm2_ptr + pidx, t_m2, mask=n_ok)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
def _out_size(n: int, k: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - k) // stride + 1


def _check(x: Tensor, weight: Tensor, stride: int, padding: int):
    if weight.dim() != 5:
        raise ValueError(f"weight must be [P, K_out, K_in, kh, kw], got {list(weight.shape)}")
    p, ko, ki, kh, kw = weight.shape
    if x.dim() != 4 or x.shape[1] != p * ki:
        raise ValueError(f"x must be [B, {p}*{ki}, H, W] for weight {list(weight.shape)}, got {list(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight dtypes differ: {x.dtype} vs {weight.dtype}")
    if stride < 1 or padding < 0:
        raise ValueError(f"bad stride {stride} / padding {padding}")
    ho, wo = _out_size(x.shape[2], kh, stride, padding), _out_size(x.shape[3], kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"empty output for input {list(x.shape)}, kernel {kh}x{kw}, padding {padding}")
    return p, ko, ki, kh, kw, ho, wo


def _out(x: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not INTERPRET:
        return "tf32"  # what cuDNN does for fp32 convolutions by default
    return "ieee"


# (BM, BN, BK, num_warps, num_stages)
_GPU_CONFIGS = [(128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (128, 32, 32, 4, 4),
                (64, 128, 64, 4, 3), (256, 64, 32, 8, 3), (128, 128, 64, 8, 3), (64, 32, 64, 4, 4),
                (256, 128, 32, 8, 3), (128, 64, 64, 4, 3)]
_TUNED: dict = {}


def _fit(cfg, ko: int, ki: int):
    bm, bn, bk, nw, ns = cfg
    bn = min(bn, max(16, npow2(ko)))
    bk = min(bk, max(16, npow2(ki)))
    return bm, bn, bk, nw, ns


def _default_config(M: int, ko: int, ki: int, dtype: torch.dtype):
    if INTERPRET:  # big tiles: fewer programs, fewer NumPy calls
        return 32 if M <= 32 else 64, max(16, min(npow2(ko), 64)), max(16, min(npow2(ki), 64)), 4, 1
    if dtype == torch.float64 or dtype == torch.float32:
        return _fit((64, 64, 32, 4, 3), ko, ki)
    # bf16/fp16, from ptxas -v on sm_90 (tests/test_kernels_aot.py --ptxas): no spills, wgmma + cp.async
    if ko >= 128 and M >= 4096:
        return _fit((128, 128, 32, 8, 3), ko, ki)
    if ko >= 64:
        return _fit((128, 64, 32, 4, 3), ko, ki)
    return _fit((128, 32, 32, 4, 4), ko, ki)


def _launch(x, weight, stride, padding, epi, bnw=None, bnb=None, mask=None, rm=None, rv=None, eps=1e-5,
            config=None):
    """Launch the conv kernel. Returns (y, pmean, pm2, BM); partials only for EPI_STATS."""
    p, ko, ki, kh, kw, ho, wo = _check(x, weight, stride, padding)
    weight = pack_weight(weight)
    B, _, H, W = x.shape
    M = B * ho * wo
    y = _out(x, (B, p * ko, ho, wo))
    if y.numel() == 0:
        z = torch.zeros((1, 0, p * ko), dtype=stat_dtype(x.dtype), device=x.device)
        return y, z, z.clone(), 1
    if config is None:
        key = (tuple(x.shape), tuple(weight.shape), tuple(x.stride()), tuple(weight.stride()), stride, padding,
               x.dtype, epi, x.device)
        config = _TUNED.get(key)
        if config is None:
            if x.is_cuda and os.environ.get("FASTWEEDOUT_AUTOTUNE", "0") == "1":
                config = _tune(x, weight, stride, padding, epi, bnw, bnb, mask, rm, rv, eps, ko, ki, M)
            else:
                config = _default_config(M, ko, ki, x.dtype)
            _TUNED[key] = config
    BM, BN, BK, nw, ns = config
    T = cdiv(M, BM)
    sdt = stat_dtype(x.dtype)
    if epi == EPI_STATS:
        pmean = torch.empty((1, T, p * ko), dtype=sdt, device=x.device)
        pm2 = torch.empty_like(pmean)
    else:
        pmean = pm2 = y  # unused
    dummy = y
    grid = (T, cdiv(ko, BN), p)
    _gconv_kernel[grid](
        x, weight, y,
        bnw if bnw is not None else dummy, bnb if bnb is not None else dummy,
        mask if mask is not None else dummy, rm if rm is not None else dummy, rv if rv is not None else dummy,
        pmean, pm2,
        H, W, ho, wo, M, ki, ko, p * ko, eps,
        *x.stride(), *weight.stride(), *y.stride(),
        STRIDE=stride, PAD=padding, KH=kh, KW=kw, EPI=epi, HAS_MASK=mask is not None,
        PREC=_precision(x.dtype), BM=BM, BN=BN, BK=BK, ACC=acc_dtype(x.dtype), num_warps=nw, num_stages=ns)
    return y, pmean, pm2, BM


def _tune(x, weight, stride, padding, epi, bnw, bnb, mask, rm, rv, eps, ko, ki, M):
    """Time each candidate config once for this shape (GPU only)."""
    best, best_t = None, float("inf")
    for cfg in dict.fromkeys(_fit(c, ko, ki) for c in _GPU_CONFIGS):
        try:
            t = triton.testing.do_bench(
                lambda: _launch(x, weight, stride, padding, epi, bnw, bnb, mask, rm, rv, eps, config=cfg),
                warmup=5, rep=20)
        except Exception:  # e.g. out of shared memory for this config
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best if best is not None else _default_config(M, ko, ki, x.dtype)


def pack_weight(weight: Tensor) -> Tensor:
    """weight [P, K_out, K_in, kh, kw] with the same values, stored K_out-contiguous (memory order
    [kh, kw, P, K_in, K_out]): the layout the kernel's B tile loads with vector loads / cp.async.
    A no-op if weight already has K_out stride 1."""
    if weight.stride(1) == 1 or weight.shape[1] == 1:
        return weight
    return weight.permute(3, 4, 0, 2, 1).contiguous().permute(2, 4, 3, 0, 1)


def gather_weight(weight: Tensor, idx_out: Tensor, idx_in: Tensor) -> Tensor:
    """The compact engine's per-member weights in one gather, already in :func:`pack_weight`'s layout.

    weight ``[C_out, C_in, kh, kw]``, idx_out ``[P, K_out]``, idx_in ``[P, K_in]`` (long) ->
    ``[P, K_out, K_in, kh, kw]`` equal to ``weight[idx_out[:, :, None], idx_in[:, None, :]]``.
    Plain PyTorch (one advanced-indexing gather): its cost is one read and one write of the
    gathered weights, small next to the convolution, so it needs no kernel of its own.
    """
    g = weight.permute(2, 3, 1, 0)[:, :, idx_in[:, :, None], idx_out[:, None, :]]  # [kh, kw, P, K_in, K_out]
    return g.permute(2, 4, 3, 0, 1)


def _flat(t: Optional[Tensor], n: int, name: str) -> Optional[Tensor]:
    if t is None:
        return None
    if t.numel() != n:
        raise ValueError(f"{name} must have P*K_out = {n} elements ([P*K_out] or [P, K_out]), got {list(t.shape)}")
    return t.reshape(n).contiguous()


def grouped_conv_forward(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Launcher for the plain grouped convolution."""
    return _launch(x, weight, stride, padding, EPI_NONE)[0]


def grouped_conv_bn_act_forward(x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor,
                                bn_bias: Tensor, mask: Optional[Tensor], running_mean: Optional[Tensor],
                                running_var: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Launcher for conv + BN + ReLU + mask. Returns (y, mean, rstd): [1, P*K_out] batch stats, or empty."""
    p, ko = weight.shape[0], weight.shape[1]
    n = p * ko
    bnw, bnb = _flat(bn_weight, n, "bn_weight"), _flat(bn_bias, n, "bn_bias")
    mk = _flat(mask, n, "mask")
    sdt = stat_dtype(x.dtype)
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if running_mean is not None:
        rm, rv = _flat(running_mean, n, "running_mean"), _flat(running_var, n, "running_var")
        y = _launch(x, weight, stride, padding, EPI_RUNNING, bnw, bnb, mk, rm, rv, eps)[0]
        e = torch.empty((0,), dtype=sdt, device=x.device)
        return y, e, e.clone()
    y, pmean, pm2, BM = _launch(x, weight, stride, padding, EPI_STATS)
    if y.numel() == 0:
        z = torch.zeros((1, n), dtype=sdt, device=x.device)
        return y, z, z.clone()
    M = y.shape[0] * y.shape[2] * y.shape[3]
    mean, rstd = bn_act.finalize_stats(pmean, pm2, BM, M, eps, x.dtype)
    bn_act.apply_bn_act(y, y, 1, bnw, bnb, mk, mean, rstd, False, eps)  # in place: y is ours
    return y, mean, rstd


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
def _fake_out(x, weight, stride, padding):
    p, ko, ki, kh, kw, ho, wo = _check(x, weight, stride, padding)
    return _out(x, (x.shape[0], p * ko, ho, wo))


@torch.library.custom_op("fastweedout::grouped_conv", mutates_args=())
def _gconv_op(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    return grouped_conv_forward(x, weight, stride, padding)


@_gconv_op.register_fake
def _(x, weight, stride, padding):
    return _fake_out(x, weight, stride, padding)


def _conv_backward(dy: Tensor, x: Tensor, weight: Tensor, stride: int, padding: int,
                   need_x: bool = True, need_w: bool = True):
    """Input and weight gradients of the grouped convolution (PyTorch / cuDNN)."""
    p, ko, ki, kh, kw = weight.shape
    w = weight.reshape(p * ko, ki, kh, kw)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, w, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], p, [need_x, need_w, False])
    return dx, (dw.reshape(weight.shape) if dw is not None else None)


def _gconv_setup(ctx, inputs, output):
    x, weight, stride, padding = inputs
    ctx.stride, ctx.padding = stride, padding
    ctx.save_for_backward(x, weight)


def _gconv_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _conv_backward(dy, x, weight, ctx.stride, ctx.padding, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return dx, dw, None, None


_gconv_op.register_autograd(_gconv_backward, setup_context=_gconv_setup)


@torch.library.custom_op("fastweedout::grouped_conv_bn_act", mutates_args=())
def _gconv_bn_op(x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor, bn_bias: Tensor,
                 mask: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return grouped_conv_bn_act_forward(x, weight, stride, padding, bn_weight, bn_bias, mask, running_mean,
                                       running_var, eps)


@_gconv_bn_op.register_fake
def _(x, weight, stride, padding, bn_weight, bn_bias, mask, running_mean, running_var, eps):
    y = _fake_out(x, weight, stride, padding)
    sdt = stat_dtype(x.dtype)
    shape = (1, y.shape[1]) if running_mean is None else (0,)
    return y, x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt)


def _gconv_bn_setup(ctx, inputs, output):
    x, weight, stride, padding, bn_weight, bn_bias, mask, running_mean, running_var, eps = inputs
    _, mean, rstd = output
    ctx.stride, ctx.padding, ctx.eps, ctx.has_mask = stride, padding, eps, mask is not None
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mask, running_mean, running_var, mean, rstd)


def _gconv_bn_backward(ctx, dout, _dmean, _drstd):
    x, weight, bn_weight, bn_bias, mask, running_mean, running_var, mean, rstd = ctx.saved_tensors
    n = weight.shape[0] * weight.shape[1]
    y = torch.ops.fastweedout.grouped_conv(x, weight, ctx.stride, ctx.padding)  # recompute the raw conv
    flat = [t.reshape(n) if t is not None else None for t in (bn_weight, bn_bias, running_mean, running_var)]
    dy, dbw, dbb, dm = torch.ops.fastweedout.population_bn_act_backward(
        dout, y, 1, flat[0], flat[1], mask.reshape(1, n) if mask is not None else None, flat[2], flat[3],
        mean, rstd, ctx.eps)
    dx, dw = _conv_backward(dy, x, weight, ctx.stride, ctx.padding, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (dx, dw, None, None, dbw.reshape(bn_weight.shape), dbb.reshape(bn_bias.shape),
            dm.reshape(mask.shape) if ctx.has_mask else None, None, None, None)


_gconv_bn_op.register_autograd(_gconv_bn_backward, setup_context=_gconv_bn_setup)


def grouped_conv(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Same signature and semantics as :func:`fastweedout.functional.grouped_conv`."""
    return _gconv_op(x, weight, int(stride), int(padding))


def grouped_conv_bn_act(x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor, bn_bias: Tensor,
                        mask: Optional[Tensor], running_mean: Optional[Tensor] = None,
                        running_var: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``mask * relu(bn(grouped_conv(x, weight)))`` with per-output-channel BN parameters
    (``[P*K_out]`` or ``[P, K_out]``); same semantics as :func:`fastweedout.functional.grouped_conv_bn_act`."""
    return _gconv_bn_op(x, weight, int(stride), int(padding), bn_weight, bn_bias, mask, running_mean, running_var,
                        float(eps))[0]
