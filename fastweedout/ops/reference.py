"""The PyTorch reference for every fused op: the engines' CPU path, the kernels' fallback, and what
tests and benchmarks compare against (imported, never copied). Also the one ``gather_conv_weight``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def population_bn_act(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Tensor | None,
                      running_mean: Tensor | None = None, running_var: Tensor | None = None,
                      eps: float = 1e-5) -> Tensor:
    """``mask * relu(bn(x))`` for P members folded into the batch.

    x: ``[P*B, C, H, W]`` (member-major). weight, bias, running stats: ``[C]`` (shared) or ``[P, C]``.
    mask: ``[P, C]`` multiplier or None. Batch mode (no running stats): each member's own mean and
    biased variance over its ``B*H*W`` values, exactly BN in training mode; half-precision inputs
    are normalised in fp32. Each member is a plain ``F.batch_norm`` call on its own slice.
    """
    if x.dim() != 4 or members < 1 or x.shape[0] % members:
        raise ValueError(f"x must be [P*B, C, H, W] with P={members} dividing the batch, got {list(x.shape)}")
    c = x.shape[1]
    training = running_mean is None
    low = x.dtype in (torch.float16, torch.bfloat16)

    def member(t: Tensor | None, p: int) -> Tensor | None:
        if t is None or t.dim() == 1:
            return None if t is None else (t.float() if low else t)
        if t.shape != (members, c):
            raise ValueError(f"per-member parameter must be [{c}] or [{members}, {c}], got {list(t.shape)}")
        return t[p].float() if low else t[p]

    outs = []
    for p, xp in enumerate(x.chunk(members)):
        y = F.batch_norm(xp.float() if low else xp, member(running_mean, p), member(running_var, p),
                         member(weight, p), member(bias, p), training, 0.0, eps)
        y = torch.relu_(y)
        if mask is not None:
            y = y * member(mask, p).view(1, c, 1, 1).to(y.dtype)
        outs.append(y)
    y = outs[0] if members == 1 else torch.cat(outs)
    return y.to(x.dtype)


def grouped_conv(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Each member's own convolution over its own channels.

    x: ``[B, P*K_in, H, W]`` (member-major channels); weight: ``[P, K_out, K_in, kh, kw]``.
    Returns ``[B, P*K_out, H', W']``.
    """
    p, ko, ki, kh, kw = weight.shape
    if x.dim() != 4 or x.shape[1] != p * ki:
        raise ValueError(f"x must be [B, {p}*{ki}, H, W] for weight {list(weight.shape)}, got {list(x.shape)}")
    return F.conv2d(x, weight.reshape(p * ko, ki, kh, kw), stride=stride, padding=padding, groups=p)


def grouped_conv_bn_act(x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor, bn_bias: Tensor,
                        mask: Tensor | None, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                        eps: float = 1e-5) -> Tensor:
    """``mask * relu(bn(grouped_conv(x, weight)))``: the compact layout's conv with its epilogue.

    BN parameters, mask and running statistics are per output channel: ``[P*K_out]`` or ``[P, K_out]``
    (``population_bn_act`` with ``members=1, C=P*K_out``). Reference of the fused Triton kernel.
    """
    y = grouped_conv(x, weight, stride, padding)
    n = y.shape[1]

    def flat(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(n)

    return population_bn_act(y, 1, flat(bn_weight), flat(bn_bias), None if mask is None else mask.reshape(1, n),
                             flat(running_mean), flat(running_var), eps)


def gather_conv_weight(weight: Tensor, idx_out: Tensor, idx_in: Tensor) -> Tensor:
    """Per-member weights ``[P, K_out, K_in, kh, kw]`` of a shared conv weight ``[C_out, C_in, kh, kw]``.

    The values of ``weight[idx_out[:, :, None], idx_in[:, None, :]]`` (idx_out ``[P, K_out]``, idx_in
    ``[P, K_in]``, long), gathered in one indexing op straight into the K_out-contiguous layout
    (memory order ``[kh, kw, P, K_in, K_out]``) that the Triton conv loads with 16-byte accesses; any
    device, and :func:`grouped_conv` accepts it too. Its cost is one read and one write of the
    gathered weights, small next to the convolution, so it needs no kernel of its own.
    """
    g = weight.permute(2, 3, 1, 0)[:, :, idx_in[:, :, None], idx_out[:, None, :]]  # [kh, kw, P, K_in, K_out]
    return g.permute(2, 4, 3, 0, 1)


def scale_shift(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, mask: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with ``mask * relu(bn(x)) == relu(x * scale + shift)``.

    The mask is folded in (``m * relu(z) == relu(m * z)`` for a mask >= 0, such as the 0/1 node masks
    and the zero padding of the compact engine). Computed in float32 (float64 for float64 statistics).
    """
    dt = torch.float64 if mean.dtype == torch.float64 else torch.float32
    scale = weight.to(dt) * torch.rsqrt(var.to(dt) + eps)
    shift = bias.to(dt) - mean.to(dt) * scale
    if mask is not None:
        m = mask.to(dt)
        scale, shift = scale * m, shift * m
    return scale, shift


def fused_conv(x: Tensor, weight: Tensor, stride: int, padding: int, in_scale: Tensor | None = None,
               in_shift: Tensor | None = None, residual: Tensor | None = None,
               stats: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The compact engine's fused pass: ``y = grouped_conv(relu(x * in_scale + in_shift)) + residual``.

    ``in_scale``/``in_shift`` ``[P*K_in]`` (per input channel; None: x as it is) are the consumer's
    BN-ReLU-mask (:func:`scale_shift`), applied before the convolution's zero padding. ``residual``
    has y's shape. Returns ``(y, mean, var)``: with ``stats``, y's per-channel batch mean and biased
    variance ``[P*K_out]`` (float32; float64 for float64 x), else empty. Reference of the Triton
    ``fastweedout::fused_conv`` (forward only: scoring).
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = x if in_scale is None else affine_relu(x, in_scale, in_shift)
    y = grouped_conv(a, weight, stride, padding)
    if residual is not None:
        y = y + residual
    if stats:
        var, mean = torch.var_mean(y.to(dt), dim=(0, 2, 3), correction=0)
    else:
        mean = var = y.new_empty((0,), dtype=dt)
    return y, mean, var


def affine_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(x * scale + shift)`` per channel (``[C]``) of x ``[B, C, H, W]``, computed in float32
    (float64 for float64 x) and returned in x's dtype: an activation whose BN, ReLU and mask were
    folded into scale and shift by :func:`scale_shift`."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    view = (1, -1, 1, 1)
    return torch.relu(x.to(dt) * scale.to(dt).view(view) + shift.to(dt).view(view)).to(x.dtype)
