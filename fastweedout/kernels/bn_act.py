"""Fused population epilogue: ``mask * relu(bn(x))`` for P members folded into the batch.

Layout: x is ``[P*B, C, H, W]`` (member-major), NCHW or channels_last. weight/bias and running
statistics are ``[C]`` (shared) or ``[P, C]``; mask is ``[P, C]`` or None. The reference is
:func:`fastweedout.functional.population_bn_act` (imported, never copied; it is also the fallback
that ``fastweedout.ops`` uses where Triton cannot run).

Passes over memory
------------------
* running statistics: **one** pass (``_bn_apply_kernel`` folds scale/shift from the running stats
  in its prologue, then affine + ReLU + mask).
* batch statistics: a statistics pass (``_bn_stats_kernel``, per-chunk mean and M2 written as
  partials; chunks merged with Chan's formula, so no ``E[x^2]-E[x]^2`` cancellation), a tiny
  ``_bn_finalize_kernel`` over the [P, C] partials, and the apply pass: 2 reads + 1 write of x.
  (The grouped convolution in ``grouped_conv.py`` writes the same partials from its epilogue and
  skips the statistics pass.)
* backward, batch statistics: a reduction pass (sum g, sum g*xhat, sum dy*relu(z)) and an apply
  pass for dx; running statistics: one pass that writes dx and the reductions together.

Internally each member's slab is viewed as a 3-D array ``[R, C, S]`` with strides: NCHW is
``R=B, S=H*W`` (S contiguous) and channels_last is ``R=B*H*W, S=1`` (C contiguous), so one kernel
serves both layouts with coalesced tiles ``[BR, BC, BS]``.

Registration: ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` (backward is a
custom op too, so AOTAutograd traces it). Chosen over ``triton_op``/``wrap_triton`` because under
``TRITON_INTERPRET=1`` (CI, CPU) the latter fails ``opcheck``'s fake-tensor tests, while custom_op
passes all four; on a GPU a custom_op is an opaque node that ``torch.compile(fullgraph=True)``
keeps without a graph break (Inductor cannot fuse into it, which is the point: it is already fused).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastweedout import functional as ref

from ._common import (INTERPRET, acc_dtype, as_layout, cdiv, is_channels_last, memory_format, npow2,
                      num_sms, stat_dtype)

__all__ = ["population_bn_act", "population_bn_act_forward", "population_bn_act_backward", "reference",
           "finalize_stats", "apply_bn_act"]

reference = ref.population_bn_act


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(sr, sc, ss, BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    """int32 offsets of a [BR, BC, BS] tile relative to its first element (a tile spans < 2^31)."""
    rr = tl.arange(0, BR)
    cc = tl.arange(0, BC)
    s = tl.arange(0, BS)
    return rr[:, None, None] * sr + cc[None, :, None] * sc + s[None, None, :] * ss, rr, cc, s


@triton.jit
def _bn_stats_kernel(x_ptr, pmean_ptr, pm2_ptr,
                     R, C, S, sp, sr, sc, ss, T, CHUNK,
                     BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """Per (member p, row-chunk t, channel block): mean and M2 of the chunk -> partials [P, T, C]."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid // T
    t = pid % T
    c0 = tl.program_id(1) * BC
    offs, rr, cc, s_ar = _tile_offsets(sr, sc, ss, BR, BC, BS)
    c_ok = (c0 + cc) < C
    r0 = t * CHUNK
    r_end = tl.minimum(r0 + CHUNK, R)
    cnt = tl.zeros([BC], ACC)
    mean = tl.zeros([BC], ACC)
    m2 = tl.zeros([BC], ACC)
    for rs in range(r0, r_end, BR):
        r_ok = (rs + rr) < r_end
        n_r = tl.sum(r_ok.to(ACC), 0)
        for s0 in range(0, S, BS):
            s_ok = (s0 + s_ar) < S
            n_t = n_r * tl.sum(s_ok.to(ACC), 0)
            ok = r_ok[:, None, None] & c_ok[None, :, None] & s_ok[None, None, :]
            base = x_ptr + (p * sp + rs * sr + c0 * sc + s0 * ss)
            v = tl.load(base + offs, mask=ok, other=0.0).to(ACC)
            t_mean = tl.sum(tl.sum(v, 2), 0) / n_t
            d = tl.where(ok, v - t_mean[None, :, None], 0.0)
            t_m2 = tl.sum(tl.sum(d * d, 2), 0)
            new = cnt + n_t
            delta = t_mean - mean
            mean += delta * (n_t / new)
            m2 += t_m2 + delta * delta * (cnt * n_t / new)
            cnt = new
    out = (p * T + t) * C + c0 + cc
    tl.store(pmean_ptr + out, mean, mask=c_ok)
    tl.store(pm2_ptr + out, m2, mask=c_ok)


@triton.jit
def _bn_finalize_kernel(pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr,
                        T, C, CHUNK_CNT, TOTAL, eps,
                        BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Merge partials [P, T, C] (chunk t holds min(CHUNK_CNT, TOTAL - t*CHUNK_CNT) values) into
    mean and rstd = 1/sqrt(var + eps) (biased variance), [P, C]."""
    p = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < C
    tt = tl.arange(0, BT)
    acc = tl.zeros([BT, BC], ACC)
    for t0 in range(0, T, BT):
        t = t0 + tt
        t_ok = t < T
        n_t = tl.minimum(tl.maximum(TOTAL - t.to(tl.int64) * CHUNK_CNT, 0), CHUNK_CNT).to(ACC)
        ok = t_ok[:, None] & c_ok[None, :]
        pm = tl.load(pmean_ptr + (p * T + t[:, None]) * C + c[None, :], mask=ok, other=0.0).to(ACC)
        acc += n_t[:, None] * pm
    mean = tl.sum(acc, 0) / TOTAL
    acc = tl.zeros([BT, BC], ACC)
    for t0 in range(0, T, BT):
        t = t0 + tt
        t_ok = t < T
        n_t = tl.minimum(tl.maximum(TOTAL - t.to(tl.int64) * CHUNK_CNT, 0), CHUNK_CNT).to(ACC)
        ok = t_ok[:, None] & c_ok[None, :]
        idx = (p * T + t[:, None]) * C + c[None, :]
        pm = tl.load(pmean_ptr + idx, mask=ok, other=0.0).to(ACC)
        q = tl.load(pm2_ptr + idx, mask=ok, other=0.0).to(ACC)
        d = pm - mean[None, :]
        acc += tl.where(ok, q + n_t[:, None] * d * d, 0.0)
    var = tl.sum(acc, 0) / TOTAL
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + p * C + c, mean, mask=c_ok)
    tl.store(rstd_ptr + p * C + c, rstd, mask=c_ok)


@triton.jit
def _scale_shift(p, c, c_ok, w_ptr, b_ptr, mean_ptr, sd_ptr, swp, sbp, smup, ssdp, eps,
                 RUNNING: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (scale, shift, mean, rstd) of member p; sd is the running var or the batch rstd."""
    w = tl.load(w_ptr + p * swp + c, mask=c_ok, other=0.0).to(ACC)
    b = tl.load(b_ptr + p * sbp + c, mask=c_ok, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + p * smup + c, mask=c_ok, other=0.0).to(ACC)
    sd = tl.load(sd_ptr + p * ssdp + c, mask=c_ok, other=1.0).to(ACC)
    if RUNNING:
        rstd = 1.0 / tl.sqrt(sd + eps)
    else:
        rstd = sd
    scale = w * rstd
    shift = b - mean * scale
    return scale, shift, mean, rstd


@triton.jit
def _load_mask(m_ptr, p, c, c_ok, smp, HAS_MASK: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    if HAS_MASK:
        m = tl.load(m_ptr + p * smp + c, mask=c_ok, other=0.0).to(ACC)
    else:
        m = tl.full([BC], 1.0, ACC)
    return m


@triton.jit
def _bn_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, m_ptr, mean_ptr, sd_ptr,
                     R, C, S, sp, sr, sc, ss, RB, swp, sbp, smp, smup, ssdp, eps,
                     RUNNING: tl.constexpr, HAS_MASK: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """y = mask * relu(x * scale + shift), one tile [BR, BC, BS] per program (y may alias x)."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid // RB
    r0 = (pid % RB) * BR
    c0 = tl.program_id(1) * BC
    s0 = tl.program_id(2) * BS
    offs, rr, cc, s = _tile_offsets(sr, sc, ss, BR, BC, BS)
    c = c0 + cc
    c_ok = c < C
    scale, shift, mean, rstd = _scale_shift(p, c, c_ok, w_ptr, b_ptr, mean_ptr, sd_ptr, swp, sbp, smup, ssdp, eps,
                                            RUNNING, ACC)
    m = _load_mask(m_ptr, p, c, c_ok, smp, HAS_MASK, BC, ACC)
    ok = (r0 + rr < R)[:, None, None] & c_ok[None, :, None] & (s0 + s < S)[None, None, :]
    base = p * sp + r0 * sr + c0 * sc + s0 * ss
    v = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(ACC)
    y = tl.maximum(v * scale[None, :, None] + shift[None, :, None], 0.0)
    if HAS_MASK:
        y = y * m[None, :, None]
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, m_ptr, mean_ptr, sd_ptr, part_ptr,
                          P, R, C, S, sp, sr, sc, ss, T, CHUNK, swp, sbp, smp, smup, ssdp, eps,
                          RUNNING: tl.constexpr, HAS_MASK: tl.constexpr,
                          BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """Partials [3, P, T, C] of sum g, sum g*xhat, sum dy*relu(z), with z = x*scale + shift and
    g = dy * mask * (z > 0). In running mode dx = g * scale does not depend on them: written here."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid // T
    t = pid % T
    c0 = tl.program_id(1) * BC
    offs, rr, cc, s_ar = _tile_offsets(sr, sc, ss, BR, BC, BS)
    c = c0 + cc
    c_ok = c < C
    scale, shift, mean, rstd = _scale_shift(p, c, c_ok, w_ptr, b_ptr, mean_ptr, sd_ptr, swp, sbp, smup, ssdp, eps,
                                            RUNNING, ACC)
    m = _load_mask(m_ptr, p, c, c_ok, smp, HAS_MASK, BC, ACC)
    r0 = t * CHUNK
    r_end = tl.minimum(r0 + CHUNK, R)
    sg = tl.zeros([BC], ACC)
    sgx = tl.zeros([BC], ACC)
    sda = tl.zeros([BC], ACC)
    for rs in range(r0, r_end, BR):
        r_ok = (rs + rr) < r_end
        for s0 in range(0, S, BS):
            ok = r_ok[:, None, None] & c_ok[None, :, None] & ((s0 + s_ar) < S)[None, None, :]
            base = p * sp + rs * sr + c0 * sc + s0 * ss
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
    out = (p * T + t) * C + c
    plane = P * T * C
    tl.store(part_ptr + out, sg, mask=c_ok)
    tl.store(part_ptr + plane + out, sgx, mask=c_ok)
    tl.store(part_ptr + 2 * plane + out, sda, mask=c_ok)


@triton.jit
def _bn_bwd_apply_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, m_ptr, mean_ptr, sd_ptr, sums_ptr,
                         P, R, C, S, sp, sr, sc, ss, RB, swp, sbp, smp, smup, ssdp, eps, N,
                         HAS_MASK: tl.constexpr,
                         BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """Batch statistics: dx = w * rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid // RB
    r0 = (pid % RB) * BR
    c0 = tl.program_id(1) * BC
    s0 = tl.program_id(2) * BS
    offs, rr, cc, s = _tile_offsets(sr, sc, ss, BR, BC, BS)
    c = c0 + cc
    c_ok = c < C
    scale, shift, mean, rstd = _scale_shift(p, c, c_ok, w_ptr, b_ptr, mean_ptr, sd_ptr, swp, sbp, smup, ssdp, eps,
                                            False, ACC)
    m = _load_mask(m_ptr, p, c, c_ok, smp, HAS_MASK, BC, ACC)
    plane = P * C
    mg = tl.load(sums_ptr + p * C + c, mask=c_ok, other=0.0).to(ACC) / N
    mgx = tl.load(sums_ptr + plane + p * C + c, mask=c_ok, other=0.0).to(ACC) / N
    ok = (r0 + rr < R)[:, None, None] & c_ok[None, :, None] & (s0 + s < S)[None, None, :]
    base = p * sp + r0 * sr + c0 * sc + s0 * ss
    x = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(ACC)
    z = x * scale[None, :, None] + shift[None, :, None]
    g = tl.where(z > 0.0, dy * m[None, :, None], 0.0)
    xhat = (x - mean[None, :, None]) * rstd[None, :, None]
    dx = scale[None, :, None] * (g - mg[None, :, None] - xhat * mgx[None, :, None])
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _view3(x: Tensor, members: int):
    """(R, C, S, sp, sr, sc, ss, channels_last) of x [P*B, C, H, W] seen as P slabs [R, C, S]."""
    n, c, h, w = x.shape
    b, hw = n // members, h * w
    if is_channels_last(x):
        return b * hw, c, 1, b * hw * c, c, 1, 1, True
    return b, c, hw, b * c * hw, c * hw, hw, 1, False


_TILE, _WARPS = 2048, 4  # elements per tile and warps: 16 per thread (registers: pointers are 64-bit)


def _tiles(R: int, C: int, S: int, cl: bool):
    """Tile [BR, BC, BS] of about 4096 elements (bigger under the interpreter: fewer NumPy calls)."""
    budget = 1 << 14 if INTERPRET else _TILE
    if cl:
        bc = min(npow2(C), 128)
        br = max(1, min(npow2(R), budget // bc))
        return br, bc, 1
    bs = min(npow2(S), 1024)
    bc = max(1, min(npow2(C), budget // bs, 16), npow2(cdiv(C, 65535)))  # grid axis 1 is <= 65535
    br = max(1, min(npow2(R), budget // (bs * bc)))
    return br, bc, bs


def _split(x: Tensor, P: int, R: int, C: int, BR: int, BC: int):
    """Row chunks per member for the reductions: enough programs to fill the device."""
    programs = P * cdiv(C, BC)
    want = 4 * num_sms(x)
    t = max(1, min(cdiv(want, programs), cdiv(R, BR)))
    chunk = cdiv(cdiv(R, t), BR) * BR
    return cdiv(R, chunk), chunk


def _param(t: Tensor, members: int, C: int, name: str) -> tuple[Tensor, int]:
    """A [C] or [P, C] parameter, contiguous, and its member stride (0 when shared)."""
    if t.dim() == 1 and t.shape[0] == C:
        return t.contiguous(), 0
    if t.dim() == 2 and t.shape == (members, C):
        return t.contiguous(), C
    raise ValueError(f"{name} must be [{C}] or [{members}, {C}], got {list(t.shape)}")


def _check(x: Tensor, members: int):
    if x.dim() != 4 or members < 1 or x.shape[0] % members:
        raise ValueError(f"x must be [P*B, C, H, W] with P={members} dividing the batch, got {list(x.shape)}")


def finalize_stats(pmean: Tensor, pm2: Tensor, chunk_cnt: int, total: int, eps: float,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge partials [P, T, C] into (mean, rstd) [P, C]."""
    P, T, C = pmean.shape
    mean = torch.empty((P, C), dtype=pmean.dtype, device=pmean.device)
    rstd = torch.empty_like(mean)
    BC = min(npow2(C), 128)
    BT = max(1, min(npow2(T), (1 << 14 if INTERPRET else _TILE) // BC))
    _bn_finalize_kernel[(P, cdiv(C, BC))](pmean, pm2, mean, rstd, T, C, chunk_cnt, total, eps,
                                           BT=BT, BC=BC, ACC=acc_dtype(dtype), num_warps=4)
    return mean, rstd


def apply_bn_act(x: Tensor, out: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Optional[Tensor],
                 mean: Tensor, sd: Tensor, running: bool, eps: float) -> Tensor:
    """out = mask * relu(bn(x)) given per-member (mean, rstd) [P, C] or running (mean, var). out may be x."""
    R, C, S, sp, sr, sc, ss, cl = _view3(x, members)
    w, swp = _param(weight, members, C, "weight")
    b, sbp = _param(bias, members, C, "bias")
    mu, smup = _param(mean, members, C, "mean")
    sd, ssdp = _param(sd, members, C, "var")
    if mask is not None:
        m, smp = _param(mask, members, C, "mask")
    else:
        m, smp = w, 0
    BR, BC, BS = _tiles(R, C, S, cl)
    RB = cdiv(R, BR)
    grid = (members * RB, cdiv(C, BC), cdiv(S, BS))
    _bn_apply_kernel[grid](x, out, w, b, m, mu, sd, R, C, S, sp, sr, sc, ss, RB, swp, sbp, smp, smup, ssdp, eps,
                           RUNNING=running, HAS_MASK=mask is not None, BR=BR, BC=BC, BS=BS,
                           ACC=acc_dtype(x.dtype), num_warps=_WARPS)
    return out


def population_bn_act_forward(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Optional[Tensor],
                              running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                              eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Launcher. Returns (y, mean, rstd); mean/rstd are [P, C] in batch mode and empty in running mode."""
    _check(x, members)
    x = as_layout(x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    sdt = stat_dtype(x.dtype)
    if x.numel() == 0:
        z = torch.zeros((members, x.shape[1]) if running_mean is None else (0,), dtype=sdt, device=x.device)
        return y, z, z.clone()
    if running_mean is not None:
        apply_bn_act(x, y, members, weight, bias, mask, running_mean, running_var, True, eps)
        e = torch.empty((0,), dtype=sdt, device=x.device)
        return y, e, e.clone()
    R, C, S, sp, sr, sc, ss, cl = _view3(x, members)
    BR, BC, BS = _tiles(R, C, S, cl)
    T, chunk = _split(x, members, R, C, BR, BC)
    pmean = torch.empty((members, T, C), dtype=sdt, device=x.device)
    pm2 = torch.empty_like(pmean)
    _bn_stats_kernel[(members * T, cdiv(C, BC))](x, pmean, pm2, R, C, S, sp, sr, sc, ss, T, chunk,
                                                  BR=BR, BC=BC, BS=BS, ACC=acc_dtype(x.dtype), num_warps=_WARPS)
    mean, rstd = finalize_stats(pmean, pm2, chunk * S, R * S, eps, x.dtype)
    apply_bn_act(x, y, members, weight, bias, mask, mean, rstd, False, eps)
    return y, mean, rstd


def population_bn_act_backward(dy: Tensor, x: Tensor, members: int, weight: Tensor, bias: Tensor,
                               mask: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               mean: Tensor, rstd: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launcher. Returns (dx, dweight, dbias, dmask) (dmask empty when mask is None)."""
    _check(x, members)
    x = as_layout(x)
    dy = dy.contiguous(memory_format=memory_format(x))
    running = running_mean is not None
    R, C, S, sp, sr, sc, ss, cl = _view3(x, members)
    w, swp = _param(weight, members, C, "weight")
    b, sbp = _param(bias, members, C, "bias")
    mu, smup = _param(running_mean if running else mean, members, C, "mean")
    sd, ssdp = _param(running_var if running else rstd, members, C, "var")
    if mask is not None:
        m, smp = _param(mask, members, C, "mask")
    else:
        m, smp = w, 0
    sdt = stat_dtype(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    BR, BC, BS = _tiles(R, C, S, cl)
    if x.numel() == 0:
        sums = torch.zeros((3, members, C), dtype=sdt, device=x.device)
    else:
        T, chunk = _split(x, members, R, C, BR, BC)
        part = torch.empty((3, members, T, C), dtype=sdt, device=x.device)
        _bn_bwd_reduce_kernel[(members * T, cdiv(C, BC))](
            dy, x, dx, w, b, m, mu, sd, part, members, R, C, S, sp, sr, sc, ss, T, chunk,
            swp, sbp, smp, smup, ssdp, eps, RUNNING=running, HAS_MASK=mask is not None, BR=BR, BC=BC, BS=BS, ACC=acc_dtype(x.dtype), num_warps=_WARPS)
        sums = part.sum(dim=2)  # [3, P, C]
        if not running:
            RB = cdiv(R, BR)
            _bn_bwd_apply_kernel[(members * RB, cdiv(C, BC), cdiv(S, BS))](
                dy, x, dx, w, b, m, mu, sd, sums.contiguous(), members, R, C, S, sp, sr, sc, ss, RB,
                swp, sbp, smp, smup, ssdp, eps, R * S,
                HAS_MASK=mask is not None, BR=BR, BC=BC, BS=BS, ACC=acc_dtype(x.dtype), num_warps=_WARPS)
    # d/dweight of z = xhat * w + b is xhat; d/dmask of mask * relu(z) is relu(z).
    # Outputs of a custom op may not alias each other: reduce or copy out of `sums`.
    def grad_of(i: int, t: Tensor) -> Tensor:
        g = sums[i].sum(0) if t.dim() == 1 else sums[i].clone()
        return g.to(t.dtype)

    dm = grad_of(2, mask) if mask is not None else torch.empty((0,), dtype=sdt, device=x.device)
    return dx, grad_of(1, weight), grad_of(0, bias), dm


# ----------------------------------------------------------------------------------------------
# torch.library registration (see module docstring for why custom_op)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastweedout::population_bn_act", mutates_args=())
def _bn_act_op(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor],
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return population_bn_act_forward(x, members, weight, bias, mask, running_mean, running_var, eps)


@_bn_act_op.register_fake
def _(x, members, weight, bias, mask, running_mean, running_var, eps):
    _check(x, members)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    sdt = stat_dtype(x.dtype)
    shape = (members, x.shape[1]) if running_mean is None else (0,)
    return y, x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt)


@torch.library.custom_op("fastweedout::population_bn_act_backward", mutates_args=())
def _bn_act_bwd_op(dy: Tensor, x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return population_bn_act_backward(dy, x, members, weight, bias, mask, running_mean, running_var, mean, rstd, eps)


@_bn_act_bwd_op.register_fake
def _(dy, x, members, weight, bias, mask, running_mean, running_var, mean, rstd, eps):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    dm = torch.empty_like(mask, memory_format=torch.contiguous_format) if mask is not None else \
        x.new_empty((0,), dtype=stat_dtype(x.dtype))
    return (dx, torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format), dm)


def _setup_context(ctx, inputs, output):
    x, members, weight, bias, mask, running_mean, running_var, eps = inputs
    _, mean, rstd = output
    ctx.members, ctx.eps, ctx.has_mask = members, eps, mask is not None
    ctx.save_for_backward(x, weight, bias, mask, running_mean, running_var, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mask, running_mean, running_var, mean, rstd = ctx.saved_tensors
    dx, dw, db, dm = _bn_act_bwd_op(dy, x, ctx.members, weight, bias, mask, running_mean, running_var,
                                    mean, rstd, ctx.eps)
    # running statistics are buffers: no gradient flows to them.
    return dx, None, dw, db, (dm if ctx.has_mask else None), None, None, None


_bn_act_op.register_autograd(_backward, setup_context=_setup_context)


def population_bn_act(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Optional[Tensor],
                      running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                      eps: float = 1e-5) -> Tensor:
    """Same signature and semantics as :func:`fastweedout.functional.population_bn_act`."""
    return _bn_act_op(x, members, weight, bias, mask, running_mean, running_var, float(eps))[0]
