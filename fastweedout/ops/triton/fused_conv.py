"""The compact engine's fused pass (forward only, for scoring): ``fastweedout::fused_conv``.

``y = grouped_conv(relu(x * in_scale + in_shift)) + residual`` and, optionally, y's per-channel
batch statistics, in one kernel launch plus a tiny parallel merge:

* the consumer's BN-ReLU-mask is applied in the convolution's A-tile prologue (``in_scale`` /
  ``in_shift`` per input channel, the mask folded in; padding stays zero), so the normalised
  activation is never written;
* the residual addition and the BN-statistics partial moments are in the epilogue, so the block's
  output is written once and never re-read for its statistics.

A WRN block then moves about 5 activation-sized tensors (conv1: read x, write h; conv2: read h,
read the shortcut, write x') instead of about 12. Reference:
:func:`fastweedout.ops.reference.fused_conv`. No autograd (scoring runs under ``torch.no_grad``); the
engine takes the differentiable ops (``grouped_conv.py``) when gradients are on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastweedout.ops import reference as ref
from fastweedout.ops.triton._conv import EPI_NONE, EPI_STATS, check_conv, launch_conv, out_like
from fastweedout.ops.triton.bn_stats import merge_stats
from fastweedout.ops.triton.common import stat_dtype

__all__ = ["fused_conv", "fused_conv_forward", "reference"]

reference = ref.fused_conv


def fused_conv_forward(x: Tensor, weight: Tensor, stride: int, padding: int, in_scale: Tensor | None,
                       in_shift: Tensor | None, residual: Tensor | None,
                       stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Launcher. Returns (y, mean, var): ``[P*K_out]`` batch statistics of y, or empty."""
    y, parts = launch_conv(x, weight, stride, padding, epi=EPI_STATS if stats else EPI_NONE,
                           in_scale=in_scale, in_shift=in_shift, residual=residual)
    sdt = stat_dtype(x.dtype)
    if not stats:
        e = torch.empty((0,), dtype=sdt, device=x.device)
        return y, e, e.clone()
    if y.numel() == 0:
        z = torch.zeros((y.shape[1],), dtype=sdt, device=x.device)
        return y, z, z.clone()
    mean, var = merge_stats(*parts)
    return y, mean[0], var[0]


@torch.library.custom_op("fastweedout::fused_conv", mutates_args=())
def _fused_conv_op(x: Tensor, weight: Tensor, stride: int, padding: int, in_scale: Tensor | None,
                   in_shift: Tensor | None, residual: Tensor | None, stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    return fused_conv_forward(x, weight, stride, padding, in_scale, in_shift, residual, stats)


@_fused_conv_op.register_fake
def _(x, weight, stride, padding, in_scale, in_shift, residual, stats):
    check_conv(x, weight, stride, padding)
    y = out_like(x, weight, stride, padding)
    shape = (y.shape[1],) if stats else (0,)
    sdt = stat_dtype(x.dtype)
    return y, x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt)


def fused_conv(x: Tensor, weight: Tensor, stride: int, padding: int, in_scale: Tensor | None = None,
               in_shift: Tensor | None = None, residual: Tensor | None = None,
               stats: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Same signature and semantics as :func:`fastweedout.ops.reference.fused_conv`."""
    return _fused_conv_op(x, weight, int(stride), int(padding), in_scale, in_shift, residual, bool(stats))
