"""The PyTorch reference for every fused op: the engines' CPU path, the kernels' fallback, and what
tests and benchmarks compare against (imported, never copied)."""

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
