"""Per-member BN batch statistics: partial moments and their two-level parallel merge.

Layout: x is ``[P*B, C, H, W]`` (member-major), NCHW or channels_last; each member's slab is viewed
as a 3-D array ``[R, C, S]`` with strides (:func:`view3`): NCHW is ``R=B, S=H*W`` (S contiguous),
channels_last is ``R=B*H*W, S=1`` (C contiguous; the ``CL`` constexpr drops the S axis, so the base
offset keeps its 16-byte alignment and loads are ``ld.global.v4``).

Partials are *moments* ``(count, mean, M2)`` of a chunk per (member, chunk, channel), ``[P, T, C]``,
written by :func:`_bn_stats_kernel` here or by the grouped convolution's epilogue
(``_conv.py``). Chunks merge with Chan's formula (no ``E[x^2]-E[x]^2`` cancellation). The merge is
parallel in two levels: groups of chunks in parallel (level 1), then the group results (level 2,
which writes mean and biased variance). One level when there are few chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastweedout.ops.triton.common import (
    INTERPRET,
    acc_dtype,
    cdiv,
    device_guard,
    is_channels_last,
    npow2,
    num_sms,
    stat_dtype,
)

__all__ = ["view3", "tiles", "row_split", "param", "check", "stats_partials", "merge_stats", "batch_stats"]


@triton.jit
def tile_offsets(sr, sc, ss, BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    """int32 offsets of a [BR, BC, BS] tile relative to its first element (a tile spans < 2^31)."""
    rr = tl.arange(0, BR)
    cc = tl.arange(0, BC)
    s = tl.arange(0, BS)
    return rr[:, None, None] * sr + cc[None, :, None] * sc + s[None, None, :] * ss, rr, cc, s


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Moments of the union of two disjoint sets (Chan et al.); empty sets (n == 0) are neutral."""
    n = n_a + n_b
    safe = tl.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe)
    return n, mean, m2


@triton.jit
def _bn_stats_kernel(x_ptr, pcnt_ptr, pmean_ptr, pm2_ptr,
                     R, C, S, sp, sr, sc, ss, T, CHUNK,
                     CL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """Per (member p, row chunk t, channel block): count, mean and M2 of the chunk -> partials [P, T, C].

    The loop only streams: every lane accumulates its elements' deviations from a per-channel shift
    (the mean of the chunk's first tile: a mean of part of the same data, so in
    ``M2 = sum d^2 - (sum d)^2 / n`` the cancellation is bounded by the chunk's size over the tile's),
    and the lanes are reduced once at the end. No reduction, barrier or division inside the loop, so
    the next tile's load never waits on the last one's arithmetic.
    """
    pid = tl.program_id(0).to(tl.int64)
    p = pid // T
    t = pid % T
    c0 = tl.program_id(1) * BC
    offs, rr, cc, s_ar = tile_offsets(sr, sc, ss, BR, BC, BS)
    c_ok = (c0 + cc) < C
    r0 = t * CHUNK
    r_end = tl.minimum(r0 + CHUNK, R)
    if CL:  # S == 1: no spatial axis, the base stays aligned
        base0 = p * sp + r0 * sr + c0  # i64
    else:
        base0 = p * sp + r0 * sr + tl.cast(c0, tl.int64) * sc  # i64
    # the shift: mean of the first tile's valid elements, per channel
    ok0 = ((r0 + rr) < r_end)[:, None, None] & c_ok[None, :, None] & (s_ar < S)[None, None, :]
    v0 = tl.load(x_ptr + base0 + offs, mask=ok0, other=0.0).to(ACC)
    n0 = tl.sum(tl.sum(ok0.to(ACC), 2), 0)
    shift = tl.sum(tl.sum(v0, 2), 0) / tl.where(n0 > 0, n0, 1.0)  # n0 == 0: a channel past C
    acc1 = tl.zeros([BR, BC, BS], ACC)
    acc2 = tl.zeros([BR, BC, BS], ACC)
    for rs in range(r0, r_end, BR):
        r_ok = (rs + rr) < r_end
        if CL:
            ok = r_ok[:, None, None] & c_ok[None, :, None]
            v = tl.load(x_ptr + (base0 + (rs - r0) * sr) + offs, mask=ok, other=0.0).to(ACC)
            d = tl.where(ok, v - shift[None, :, None], 0.0)
            acc1 += d
            acc2 += d * d
        else:
            for s0 in range(0, S, BS):
                ok = r_ok[:, None, None] & c_ok[None, :, None] & ((s0 + s_ar) < S)[None, None, :]
                base = base0 + (rs - r0) * sr + tl.cast(s0, tl.int64) * ss  # i64
                v = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(ACC)
                d = tl.where(ok, v - shift[None, :, None], 0.0)
                acc1 += d
                acc2 += d * d
    cnt = ((r_end - r0) * S).to(ACC) + tl.zeros([BC], ACC)
    s1 = tl.sum(tl.sum(acc1, 2), 0)
    mean = shift + s1 / cnt
    # rounding can leave a constant channel's M2 a hair below 0; a NaN in the chunk must stay NaN
    m2 = tl.maximum(tl.sum(tl.sum(acc2, 2), 0) - s1 * (s1 / cnt), 0.0, propagate_nan=tl.PropagateNan.ALL)
    out = (p * T + t) * C + c0 + cc  # i64
    tl.store(pcnt_ptr + out, cnt, mask=c_ok)
    tl.store(pmean_ptr + out, mean, mask=c_ok)
    tl.store(pm2_ptr + out, m2, mask=c_ok)


@triton.jit
def _stats_merge_kernel(icnt_ptr, imean_ptr, im2_ptr, ocnt_ptr, omean_ptr, om2_ptr,
                        T, C, G, T2, FINAL: tl.constexpr,
                        BT: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Program (member p, group g, channel block) merges partials t in [g*G, (g+1)*G) of [P, T, C].
    FINAL (T2 == 1): writes mean and biased variance [P, C]; else the group's moments [P, T2, C]."""
    pid = tl.program_id(0).to(tl.int64)
    p = pid // T2
    g = pid % T2
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < C
    tt = tl.arange(0, BT)
    t_lo = g * G
    t_hi = tl.minimum(t_lo + G, T)
    n = tl.zeros([BC], ACC)
    mean = tl.zeros([BC], ACC)
    m2 = tl.zeros([BC], ACC)
    for t0 in range(t_lo, t_hi, BT):
        t = t0 + tt
        ok = (t < t_hi)[:, None] & c_ok[None, :]
        idx = (p * T + t[:, None]) * C + c[None, :]  # i64
        nb = tl.load(icnt_ptr + idx, mask=ok, other=0.0).to(ACC)
        mb = tl.load(imean_ptr + idx, mask=ok, other=0.0).to(ACC)
        qb = tl.load(im2_ptr + idx, mask=ok, other=0.0).to(ACC)
        n_blk = tl.sum(nb, 0)
        mean_blk = tl.sum(nb * mb, 0) / tl.where(n_blk > 0, n_blk, 1.0)
        d = mb - mean_blk[None, :]
        m2_blk = tl.sum(tl.where(ok, qb + nb * d * d, 0.0), 0)
        n, mean, m2 = chan_merge(n, mean, m2, n_blk, mean_blk, m2_blk)
    if FINAL:
        tl.store(omean_ptr + p * C + c, mean, mask=c_ok)
        tl.store(om2_ptr + p * C + c, m2 / tl.where(n > 0, n, 1.0), mask=c_ok)
    else:
        out = (p * T2 + g) * C + c  # i64
        tl.store(ocnt_ptr + out, n, mask=c_ok)
        tl.store(omean_ptr + out, mean, mask=c_ok)
        tl.store(om2_ptr + out, m2, mask=c_ok)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def view3(x: Tensor, members: int):
    """(R, C, S, sp, sr, sc, ss, channels_last) of x [P*B, C, H, W] seen as P slabs [R, C, S]."""
    n, c, h, w = x.shape
    b, hw = n // members, h * w
    if is_channels_last(x):
        return b * hw, c, 1, b * hw * c, c, 1, 1, True
    return b, c, hw, b * c * hw, c * hw, hw, 1, False


TILE, WARPS = 2048, 4  # elements per tile and warps: 16 per thread
STATS_PROGRAMS_PER_SM = 16


def tiles(R: int, C: int, S: int, cl: bool):
    """Tile [BR, BC, BS] of about TILE elements (bigger under the interpreter: fewer NumPy calls)."""
    budget = 1 << 14 if INTERPRET else TILE
    if cl:
        bc = min(npow2(C), 128)
        br = max(1, min(npow2(R), budget // bc))
        return br, bc, 1
    bs = min(npow2(S), 1024)
    bc = max(1, min(npow2(C), budget // bs, 16), npow2(cdiv(C, 65535)))  # grid axis 1 is <= 65535
    br = max(1, min(npow2(R), budget // (bs * bc)))
    return br, bc, bs


def row_split(x: Tensor, P: int, R: int, C: int, BR: int, BC: int, per_sm: int = 4):
    """(T, CHUNK): row chunks per member for the reductions, about ``per_sm`` programs per SM."""
    programs = P * cdiv(C, BC)
    want = per_sm * num_sms(x)
    t = max(1, min(cdiv(want, programs), cdiv(R, BR)))
    chunk = cdiv(cdiv(R, t), BR) * BR
    return cdiv(R, chunk), chunk


def param(t: Tensor, members: int, C: int, name: str) -> tuple[Tensor, int]:
    """A [C] or [P, C] parameter, contiguous, and its member stride (0 when shared)."""
    if t.dim() == 1 and t.shape[0] == C:
        return t.contiguous(), 0
    if t.dim() == 2 and t.shape == (members, C):
        return t.contiguous(), C
    raise ValueError(f"{name} must be [{C}] or [{members}, {C}], got {list(t.shape)}")


def check(x: Tensor, members: int) -> None:
    if x.dim() != 4 or members < 1 or x.shape[0] % members:
        raise ValueError(f"x must be [P*B, C, H, W] with P={members} dividing the batch, got {list(x.shape)}")


def stats_partials(x: Tensor, members: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) partials ``[P, T, C]`` of x's per-member channels (x non-empty)."""
    R, C, S, sp, sr, sc, ss, cl = view3(x, members)
    BR, BC, BS = tiles(R, C, S, cl)
    # Streaming programs: several waves of them keep enough loads in flight; one wave (4 per SM) with
    # two block reductions per tile was latency-bound, far below a device copy (bench/results/NOTES.md,
    # "Epilogues against a device copy"; the measurements in bench/results/kernels.jsonl).
    T, chunk = row_split(x, members, R, C, BR, BC, per_sm=STATS_PROGRAMS_PER_SM)
    sdt = stat_dtype(x.dtype)
    cnt = torch.empty((members, T, C), dtype=sdt, device=x.device)
    mean, m2 = torch.empty_like(cnt), torch.empty_like(cnt)
    with device_guard(x):
        _bn_stats_kernel[(members * T, cdiv(C, BC))](x, cnt, mean, m2, R, C, S, sp, sr, sc, ss, T, chunk, CL=cl,
                                                      BR=BR, BC=BC, BS=BS, ACC=acc_dtype(x.dtype), num_warps=WARPS)
    return cnt, mean, m2


#: a second level starts above this many partials per (member, channel block) when the first
#: level alone would leave the device mostly idle
LEVEL1_MIN_T = 64


def merge_stats(cnt: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge partial moments ``[P, T, C]`` into (mean, biased variance) ``[P, C]``."""
    P, T, C = mean.shape
    BC = min(npow2(C), 128)
    cblocks = cdiv(C, BC)
    budget = 1 << 14 if INTERPRET else TILE
    acc = acc_dtype(mean.dtype)
    with device_guard(mean):
        want = 4 * num_sms(mean)
        if T > LEVEL1_MIN_T and P * cblocks < want:
            G = max(8, cdiv(T, cdiv(want, P * cblocks)))  # chunks per group: a few groups per SM
            T2 = cdiv(T, G)
            c2, m_2, q2 = (torch.empty((P, T2, C), dtype=mean.dtype, device=mean.device) for _ in range(3))
            BT = max(1, min(npow2(G), budget // BC))
            _stats_merge_kernel[(P * T2, cblocks)](cnt, mean, m2, c2, m_2, q2, T, C, G, T2, FINAL=False,
                                                   BT=BT, BC=BC, ACC=acc, num_warps=4)
            cnt, mean, m2, T = c2, m_2, q2, T2
        out_mean = torch.empty((P, C), dtype=mean.dtype, device=mean.device)
        out_var = torch.empty_like(out_mean)
        BT = max(1, min(npow2(T), budget // BC))
        _stats_merge_kernel[(P, cblocks)](cnt, mean, m2, cnt, out_mean, out_var, T, C, T, 1, FINAL=True,
                                          BT=BT, BC=BC, ACC=acc, num_warps=4)
    return out_mean, out_var


def batch_stats(x: Tensor, members: int) -> tuple[Tensor, Tensor]:
    """Per-member (mean, biased variance) ``[P, C]`` of x ``[P*B, C, H, W]`` (x non-empty)."""
    return merge_stats(*stats_partials(x, members))
