"""Compacted population convolution ops with autograd: ``grouped_conv`` and ``grouped_conv_bn_act``.

``grouped_conv(x, weight)``: ``x [B, P*K_in, H, W]``, weight ``[P, K_out, K_in, kh, kw]`` ->
``[B, P*K_out, H', W']`` (reference :func:`fastweedout.ops.reference.grouped_conv`; kernel ``_conv.py``).

``grouped_conv_bn_act``: ``mask * relu(bn(grouped_conv(x)))`` with BN parameters, mask and running
statistics per output channel (``[P*K_out]`` or ``[P, K_out]``: the compact layout, where
``population_bn_act`` runs with ``members=1, C=P*K_out``; reference
:func:`fastweedout.ops.reference.grouped_conv_bn_act`). Running statistics: the epilogue is folded
into the conv's store (one write). Batch statistics: the conv writes y and partial moments, which
``bn_stats.merge_stats`` merges (two levels, in parallel); one apply pass normalises y in place.

Backward: the input and weight gradients use PyTorch (``aten.convolution_backward`` with
``groups=P``, i.e. cuDNN); the fused op recomputes the raw convolution with the Triton kernel and
chains the Triton BN backward into it. Registration as in ``bn_act.py`` (custom_op + fake + autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastweedout.ops import reference as ref
from fastweedout.ops.triton import bn_act_backward as bwd
from fastweedout.ops.triton._conv import EPI_NONE, EPI_RUNNING, EPI_STATS, launch_conv, out_like, pack_weight
from fastweedout.ops.triton.bn_act import apply_bn_act
from fastweedout.ops.triton.bn_stats import merge_stats
from fastweedout.ops.triton.common import stat_dtype

__all__ = ["grouped_conv", "grouped_conv_bn_act", "grouped_conv_forward", "grouped_conv_bn_act_forward",
           "pack_weight", "reference", "reference_bn_act"]

reference = ref.grouped_conv
reference_bn_act = ref.grouped_conv_bn_act


def _flat(t: Tensor | None, n: int, name: str) -> Tensor | None:
    if t is None:
        return None
    if t.numel() != n:
        raise ValueError(f"{name} must have P*K_out = {n} elements ([P*K_out] or [P, K_out]), got {list(t.shape)}")
    return t.reshape(n).contiguous()


def grouped_conv_forward(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Launcher for the plain grouped convolution."""
    return launch_conv(x, weight, stride, padding, epi=EPI_NONE)[0]


def grouped_conv_bn_act_forward(x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor,
                                bn_bias: Tensor, mask: Tensor | None, running_mean: Tensor | None,
                                running_var: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Launcher for conv + BN + ReLU + mask. Returns (y, mean, var): [1, P*K_out] batch stats, or empty."""
    p, ko = weight.shape[0], weight.shape[1]
    n = p * ko
    bnw, bnb = _flat(bn_weight, n, "bn_weight"), _flat(bn_bias, n, "bn_bias")
    mk = _flat(mask, n, "mask")
    sdt = stat_dtype(x.dtype)
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if running_mean is not None:
        rm, rv = _flat(running_mean, n, "running_mean"), _flat(running_var, n, "running_var")
        y = launch_conv(x, weight, stride, padding, epi=EPI_RUNNING, bnw=bnw, bnb=bnb, mask=mk, rm=rm, rv=rv,
                        eps=eps)[0]
        e = torch.empty((0,), dtype=sdt, device=x.device)
        return y, e, e.clone()
    y, parts = launch_conv(x, weight, stride, padding, epi=EPI_STATS)
    if y.numel() == 0:
        z = torch.zeros((1, n), dtype=sdt, device=x.device)
        return y, z, z.clone()
    mean, var = merge_stats(*parts)
    apply_bn_act(y, y, 1, bnw, bnb, None if mk is None else mk[None], mean, var, eps)  # in place: y is ours
    return y, mean, var


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastweedout::grouped_conv", mutates_args=())
def _gconv_op(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    return grouped_conv_forward(x, weight, stride, padding)


@_gconv_op.register_fake
def _(x, weight, stride, padding):
    return out_like(x, weight, stride, padding)


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
                 mask: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return grouped_conv_bn_act_forward(x, weight, stride, padding, bn_weight, bn_bias, mask, running_mean,
                                       running_var, eps)


@_gconv_bn_op.register_fake
def _(x, weight, stride, padding, bn_weight, bn_bias, mask, running_mean, running_var, eps):
    y = out_like(x, weight, stride, padding)
    sdt = stat_dtype(x.dtype)
    shape = (1, y.shape[1]) if running_mean is None else (0,)
    return y, x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt)


def _gconv_bn_setup(ctx, inputs, output):
    x, weight, stride, padding, bn_weight, bn_bias, mask, running_mean, running_var, eps = inputs
    _, mean, var = output
    ctx.stride, ctx.padding, ctx.eps, ctx.has_mask = stride, padding, eps, mask is not None
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mask, running_mean, running_var, mean, var)


def _gconv_bn_backward(ctx, dout, _dmean, _dvar):
    x, weight, bn_weight, bn_bias, mask, running_mean, running_var, mean, var = ctx.saved_tensors
    n = weight.shape[0] * weight.shape[1]
    y = _gconv_op(x, weight, ctx.stride, ctx.padding)  # recompute the raw conv
    flat = [t.reshape(n) if t is not None else None for t in (bn_weight, bn_bias, running_mean, running_var)]
    dy, dbw, dbb, dm = bwd.population_bn_act_backward_op(
        dout, y, 1, flat[0], flat[1], mask.reshape(1, n) if mask is not None else None, flat[2], flat[3],
        mean, var, ctx.eps)
    dx, dw = _conv_backward(dy, x, weight, ctx.stride, ctx.padding, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (dx, dw, None, None, dbw.reshape(bn_weight.shape), dbb.reshape(bn_bias.shape),
            dm.reshape(mask.shape) if ctx.has_mask else None, None, None, None)


_gconv_bn_op.register_autograd(_gconv_bn_backward, setup_context=_gconv_bn_setup)


def grouped_conv(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Same signature and semantics as :func:`fastweedout.ops.reference.grouped_conv`."""
    return _gconv_op(x, weight, int(stride), int(padding))


def grouped_conv_bn_act(x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor, bn_bias: Tensor,
                        mask: Tensor | None, running_mean: Tensor | None = None,
                        running_var: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``mask * relu(bn(grouped_conv(x, weight)))`` with per-output-channel BN parameters
    (``[P*K_out]`` or ``[P, K_out]``); same semantics as :func:`fastweedout.ops.reference.grouped_conv_bn_act`."""
    return _gconv_bn_op(x, weight, int(stride), int(padding), bn_weight, bn_bias, mask, running_mean, running_var,
                        float(eps))[0]
