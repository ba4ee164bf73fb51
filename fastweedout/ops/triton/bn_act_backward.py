"""Backward of the fused population epilogue ``mask * relu(bn(x))`` (forward: ``bn_act.py``).

Batch statistics: a reduction pass (partials of sum g, sum g*xhat, sum dy*relu(z), with
z = x*scale + shift and g = dy * mask * (z > 0)) and an apply pass for
``dx = w * rstd * (g - mean(g) - xhat * mean(g * xhat))``. Running statistics: one pass that
writes ``dx = g * scale`` and the reductions together. Registered as the custom op
``fastweedout::population_bn_act_backward`` (so AOTAutograd traces the backward as one node).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastweedout.ops.triton.bn_stats import WARPS, check, param, row_split, tile_offsets, tiles, view3
from fastweedout.ops.triton.common import (
    acc_dtype,
    as_layout,
    cdiv,
    device_guard,
    load_mask,
    memory_format,
    scale_shift,
    stat_dtype,
)

__all__ = ["population_bn_act_backward", "population_bn_act_backward_op"]


@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, m_ptr, mean_ptr, var_ptr, part_ptr,
                          P, R, C, S, sp, sr, sc, ss, T, CHUNK, swp, sbp, smp, smup, svp, eps,
                          RUNNING: tl.constexpr, HAS_MASK: tl.constexpr,
                          BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """Partials [3, P, T, C] of sum g, sum g*xhat, sum dy*relu(z). RUNNING: dx = g * scale written here."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid // T
    t = pid % T
    c0 = tl.program_id(1) * BC
    offs, rr, cc, s_ar = tile_offsets(sr, sc, ss, BR, BC, BS)
    c = c0 + cc
    c_ok = c < C
    scale, shift, mean, rstd = scale_shift(p, c, c_ok, w_ptr, b_ptr, mean_ptr, var_ptr, swp, sbp, smup, svp, eps,
                                           False, ACC)
    m = load_mask(m_ptr, p, c, c_ok, smp, HAS_MASK, BC, ACC)
    r0 = t * CHUNK
    r_end = tl.minimum(r0 + CHUNK, R)
    sg = tl.zeros([BC], ACC)
    sgx = tl.zeros([BC], ACC)
    sda = tl.zeros([BC], ACC)
    for rs in range(r0, r_end, BR):
        r_ok = (rs + rr) < r_end
        for s0 in range(0, S, BS):
            ok = r_ok[:, None, None] & c_ok[None, :, None] & ((s0 + s_ar) < S)[None, None, :]
            base = p * sp + rs * sr + tl.cast(c0, tl.int64) * sc + tl.cast(s0, tl.int64) * ss  # i64
            x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(ACC)
            z = x * scale[None, :, None] + shift[None, :, None]
            pos = ok & (z > 0.0)
            g = tl.where(pos, dy * m[None, :, None], 0.0)
            xhat = (x - mean[None, :, None]) * rstd[None, :, None]
            sg += tl.sum(tl.sum(g, 2), 0)
            sgx += tl.sum(tl.sum(g * xhat, 2), 0)
            sda += tl.sum(tl.sum(tl.where(pos, dy * z, 0.0), 2), 0)
            if RUNNING:
                tl.store(dx_ptr + base + offs, (g * scale[None, :, None]).to(dx_ptr.dtype.element_ty), mask=ok)
    out = (p * T + t) * C + c  # i64
    plane = P * T * C
    tl.store(part_ptr + out, sg, mask=c_ok)
    tl.store(part_ptr + plane + out, sgx, mask=c_ok)
    tl.store(part_ptr + 2 * plane + out, sda, mask=c_ok)


@triton.jit
def _bn_bwd_apply_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, m_ptr, mean_ptr, var_ptr, sums_ptr,
                         P, R, C, S, sp, sr, sc, ss, RB, swp, sbp, smp, smup, svp, eps, N,
                         HAS_MASK: tl.constexpr, CL: tl.constexpr,
                         BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """Batch statistics: dx = w * rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid // RB
    r0 = (pid % RB) * BR
    c0 = tl.program_id(1) * BC
    offs, rr, cc, s = tile_offsets(sr, sc, ss, BR, BC, BS)
    c = c0 + cc
    c_ok = c < C
    scale, shift, mean, rstd = scale_shift(p, c, c_ok, w_ptr, b_ptr, mean_ptr, var_ptr, swp, sbp, smup, svp, eps,
                                           False, ACC)
    m = load_mask(m_ptr, p, c, c_ok, smp, HAS_MASK, BC, ACC)
    plane = P * C
    mg = tl.load(sums_ptr + p * C + c, mask=c_ok, other=0.0).to(ACC) / N
    mgx = tl.load(sums_ptr + plane + p * C + c, mask=c_ok, other=0.0).to(ACC) / N
    if CL:
        ok = (r0 + rr < R)[:, None, None] & c_ok[None, :, None]
        base = p * sp + r0 * sr + c0  # i64
    else:
        s0 = tl.program_id(2) * BS
        ok = (r0 + rr < R)[:, None, None] & c_ok[None, :, None] & (s0 + s < S)[None, None, :]
        base = p * sp + r0 * sr + tl.cast(c0, tl.int64) * sc + tl.cast(s0, tl.int64) * ss  # i64
    x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(ACC)
    z = x * scale[None, :, None] + shift[None, :, None]
    g = tl.where(z > 0.0, dy * m[None, :, None], 0.0)
    xhat = (x - mean[None, :, None]) * rstd[None, :, None]
    dx = scale[None, :, None] * (g - mg[None, :, None] - xhat * mgx[None, :, None])
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def population_bn_act_backward(dy: Tensor, x: Tensor, members: int, weight: Tensor, bias: Tensor,
                               mask: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                               mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launcher. Returns (dx, dweight, dbias, dmask) (dmask empty when mask is None)."""
    check(x, members)
    x = as_layout(x)
    dy = dy.contiguous(memory_format=memory_format(x))
    running = running_mean is not None
    R, C, S, sp, sr, sc, ss, cl = view3(x, members)
    w, swp = param(weight, members, C, "weight")
    b, sbp = param(bias, members, C, "bias")
    mu, smup = param(running_mean if running else mean, members, C, "mean")
    vr, svp = param(running_var if running else var, members, C, "var")
    m, smp = param(mask, members, C, "mask") if mask is not None else (w, 0)
    sdt = stat_dtype(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    BR, BC, BS = tiles(R, C, S, cl)
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        sums = torch.zeros((3, members, C), dtype=sdt, device=x.device)
    else:
        T, chunk = row_split(x, members, R, C, BR, BC)
        part = torch.empty((3, members, T, C), dtype=sdt, device=x.device)
        with device_guard(x):
            _bn_bwd_reduce_kernel[(members * T, cdiv(C, BC))](
                dy, x, dx, w, b, m, mu, vr, part, members, R, C, S, sp, sr, sc, ss, T, chunk,
                swp, sbp, smp, smup, svp, eps, RUNNING=running, HAS_MASK=mask is not None, BR=BR, BC=BC, BS=BS,
                ACC=acc, num_warps=WARPS)
            sums = part.sum(dim=2)  # [3, P, C]
            if not running:
                RB = cdiv(R, BR)
                _bn_bwd_apply_kernel[(members * RB, cdiv(C, BC), 1 if cl else cdiv(S, BS))](
                    dy, x, dx, w, b, m, mu, vr, sums.contiguous(), members, R, C, S, sp, sr, sc, ss, RB,
                    swp, sbp, smp, smup, svp, eps, R * S, HAS_MASK=mask is not None, CL=cl, BR=BR, BC=BC, BS=BS,
                    ACC=acc, num_warps=WARPS)

    # d/dweight of z = xhat * w + b is xhat; d/dmask of mask * relu(z) is relu(z).
    # Outputs of a custom op may not alias each other: reduce or copy out of `sums`.
    def grad_of(i: int, t: Tensor) -> Tensor:
        g = sums[i].sum(0) if t.dim() == 1 else sums[i].clone()
        return g.to(t.dtype)

    dm = grad_of(2, mask) if mask is not None else torch.empty((0,), dtype=sdt, device=x.device)
    return dx, grad_of(1, weight), grad_of(0, bias), dm


@torch.library.custom_op("fastweedout::population_bn_act_backward", mutates_args=())
def population_bn_act_backward_op(dy: Tensor, x: Tensor, members: int, weight: Tensor, bias: Tensor,
                                  mask: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                                  mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return population_bn_act_backward(dy, x, members, weight, bias, mask, running_mean, running_var, mean, var, eps)


@population_bn_act_backward_op.register_fake
def _(dy, x, members, weight, bias, mask, running_mean, running_var, mean, var, eps):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    dm = torch.empty_like(mask, memory_format=torch.contiguous_format) if mask is not None else \
        x.new_empty((0,), dtype=stat_dtype(x.dtype))
    return (dx, torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format), dm)
