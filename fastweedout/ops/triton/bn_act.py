"""Fused population epilogue: ``mask * relu(bn(x))`` for P members folded into the batch.

Layout: x is ``[P*B, C, H, W]`` (member-major), NCHW or channels_last (see ``bn_stats.view3``).
weight/bias and running statistics are ``[C]`` (shared) or ``[P, C]``; mask is ``[P, C]`` or None.
The reference is :func:`fastweedout.ops.reference.population_bn_act` (imported, never copied; it is
also what ``fastweedout.ops.dispatch`` runs where Triton cannot).

Passes over memory: running statistics, **one** (``_bn_apply_kernel`` folds scale/shift from the
running statistics in its prologue, then affine + ReLU + mask); batch statistics, the statistics
pass of ``bn_stats`` (partial moments, two-level merge) and the apply pass: 2 reads + 1 write.
The backward is ``bn_act_backward.py``.

Registration: ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` (the backward
is a custom op too, so AOTAutograd traces it). Chosen over ``triton_op``/``wrap_triton`` because
under ``TRITON_INTERPRET=1`` (CI, CPU) the latter fails ``opcheck``'s fake-tensor tests, while
custom_op passes all four; on a GPU a custom_op is one opaque node that
``torch.compile(fullgraph=True)`` keeps without a graph break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastweedout.ops import reference as ref
from fastweedout.ops.triton import bn_act_backward as bwd
from fastweedout.ops.triton.bn_stats import WARPS, batch_stats, check, param, tile_offsets, tiles, view3
from fastweedout.ops.triton.common import (
    acc_dtype,
    as_layout,
    cdiv,
    device_guard,
    load_mask,
    memory_format,
    relu,
    scale_shift,
    stat_dtype,
)

__all__ = ["population_bn_act", "population_bn_act_forward", "apply_bn_act", "param", "reference"]

reference = ref.population_bn_act


@triton.jit
def _bn_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, m_ptr, mean_ptr, var_ptr,
                     R, C, S, sp, sr, sc, ss, RB, swp, sbp, smp, smup, svp, eps,
                     AFFINE: tl.constexpr, HAS_MASK: tl.constexpr, CL: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """y = mask * relu(x * scale + shift), one tile [BR, BC, BS] per program (y may alias x).
    CL (channels_last, S == 1): no spatial grid axis, so the tile base keeps 16-byte alignment."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid // RB
    r0 = (pid % RB) * BR
    c0 = tl.program_id(1) * BC
    offs, rr, cc, s = tile_offsets(sr, sc, ss, BR, BC, BS)
    c = c0 + cc
    c_ok = c < C
    scale, shift, mean, rstd = scale_shift(p, c, c_ok, w_ptr, b_ptr, mean_ptr, var_ptr, swp, sbp, smup, svp, eps,
                                           AFFINE, ACC)
    m = load_mask(m_ptr, p, c, c_ok, smp, HAS_MASK, BC, ACC)
    if CL:
        ok = (r0 + rr < R)[:, None, None] & c_ok[None, :, None]
        base = p * sp + r0 * sr + c0  # i64
    else:
        s0 = tl.program_id(2) * BS
        ok = (r0 + rr < R)[:, None, None] & c_ok[None, :, None] & (s0 + s < S)[None, None, :]
        base = p * sp + r0 * sr + tl.cast(c0, tl.int64) * sc + tl.cast(s0, tl.int64) * ss  # i64
    v = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(ACC)
    y = relu(v * scale[None, :, None] + shift[None, :, None])
    if HAS_MASK:
        y = y * m[None, :, None]
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def apply_bn_act(x: Tensor, out: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Tensor | None,
                 mean: Tensor | None, var: Tensor | None, eps: float, affine: bool = False) -> Tensor:
    """out = mask * relu(x * scale + shift) with scale/shift from (weight, bias, mean, var) per
    channel (``[C]`` or ``[P, C]``), or ``affine=True``: weight and bias *are* scale and shift.
    ``out`` may be x; it must have x's layout."""
    R, C, S, sp, sr, sc, ss, cl = view3(x, members)
    w, swp = param(weight, members, C, "weight")
    b, sbp = param(bias, members, C, "bias")
    mu, smup = param(mean, members, C, "mean") if not affine else (w, 0)
    vr, svp = param(var, members, C, "var") if not affine else (w, 0)
    m, smp = param(mask, members, C, "mask") if mask is not None else (w, 0)
    BR, BC, BS = tiles(R, C, S, cl)
    RB = cdiv(R, BR)
    grid = (members * RB, cdiv(C, BC), 1 if cl else cdiv(S, BS))
    with device_guard(x):
        _bn_apply_kernel[grid](x, out, w, b, m, mu, vr, R, C, S, sp, sr, sc, ss, RB, swp, sbp, smp, smup, svp, eps,
                               AFFINE=affine, HAS_MASK=mask is not None, CL=cl, BR=BR, BC=BC, BS=BS,
                               ACC=acc_dtype(x.dtype), num_warps=WARPS)
    return out


def population_bn_act_forward(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Tensor | None,
                              running_mean: Tensor | None = None, running_var: Tensor | None = None,
                              eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Launcher. Returns (y, mean, var): per-member batch mean and biased variance [P, C] in batch
    mode, empty in running mode."""
    check(x, members)
    x = as_layout(x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    sdt = stat_dtype(x.dtype)
    if x.numel() == 0:
        z = torch.zeros((members, x.shape[1]) if running_mean is None else (0,), dtype=sdt, device=x.device)
        return y, z, z.clone()
    if running_mean is not None:
        apply_bn_act(x, y, members, weight, bias, mask, running_mean, running_var, eps)
        e = torch.empty((0,), dtype=sdt, device=x.device)
        return y, e, e.clone()
    mean, var = batch_stats(x, members)
    apply_bn_act(x, y, members, weight, bias, mask, mean, var, eps)
    return y, mean, var


# ----------------------------------------------------------------------------------------------
# torch.library registration (see the module docstring for why custom_op)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastweedout::population_bn_act", mutates_args=())
def _bn_act_op(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return population_bn_act_forward(x, members, weight, bias, mask, running_mean, running_var, eps)


@_bn_act_op.register_fake
def _(x, members, weight, bias, mask, running_mean, running_var, eps):
    check(x, members)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    sdt = stat_dtype(x.dtype)
    shape = (members, x.shape[1]) if running_mean is None else (0,)
    return y, x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt)


def _setup_context(ctx, inputs, output):
    x, members, weight, bias, mask, running_mean, running_var, eps = inputs
    _, mean, var = output
    ctx.members, ctx.eps, ctx.has_mask = members, eps, mask is not None
    ctx.save_for_backward(x, weight, bias, mask, running_mean, running_var, mean, var)


def _backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, mask, running_mean, running_var, mean, var = ctx.saved_tensors
    dx, dw, db, dm = bwd.population_bn_act_backward_op(dy, x, ctx.members, weight, bias, mask, running_mean,
                                                       running_var, mean, var, ctx.eps)
    # running statistics are buffers: no gradient flows to them.
    return dx, None, dw, db, (dm if ctx.has_mask else None), None, None, None


_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


def population_bn_act(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Tensor | None,
                      running_mean: Tensor | None = None, running_var: Tensor | None = None,
                      eps: float = 1e-5) -> Tensor:
    """Same signature and semantics as :func:`fastweedout.ops.reference.population_bn_act`."""
    return _bn_act_op(x, members, weight, bias, mask, running_mean, running_var, float(eps))[0]
