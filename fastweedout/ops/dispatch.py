"""The fused ops the engines call: Triton kernels (``fastweedout.ops.triton``) where they run, the PyTorch
reference (``fastweedout.ops.reference``) everywhere else.

Dispatch
--------
* ``FASTWEEDOUT_KERNELS`` unset / ``auto`` (default): kernels for CUDA tensors, the reference for CPU
  tensors.
* ``FASTWEEDOUT_KERNELS=1`` (or ``with use_kernels(True):``): kernels on CUDA, and on CPU when
  Triton runs in its interpreter (``TRITON_INTERPRET=1`` set *before* the kernels are imported:
  tests/conftest.py does that on machines without a GPU; this module never sets it). Slow: tests only.
* ``FASTWEEDOUT_KERNELS=0`` (or ``with use_kernels(False):``): always the reference.
``use_kernels`` overrides the environment variable while it is active.

Where the kernels are wanted on a CUDA tensor but cannot be imported (no Triton, a broken install),
the call fails with :class:`KernelsUnavailable`: never a silent fallback (``FASTWEEDOUT_KERNELS=0``
chooses the reference explicitly). A call the kernels do not take goes to the reference: a dtype
they do not support (bf16 under the interpreter), a CPU tensor without the interpreter, mixed x /
weight dtypes, or bad shapes (the reference then raises its own error).

Autocast: custom ops are not autocast-aware, so the convolutions cast x and weight to the autocast
dtype themselves (as ``F.conv2d`` would); ``population_bn_act`` keeps x's dtype, as the reference does.
Layouts: the kernels accept NCHW and channels_last and write their output in x's layout; on CUDA the
convolutions make x channels_last first (the layout of their 16-byte loads).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import Tensor

from fastweedout.ops import reference as ref

__all__ = ["population_bn_act", "grouped_conv", "grouped_conv_bn_act", "fused_conv", "affine_relu",
           "gather_conv_weight", "scale_shift", "use_kernels", "kernels_enabled", "kernels_active",
           "KernelsUnavailable"]

#: the one gather of per-member conv weights (defined in ``functional``; re-exported here)
gather_conv_weight = ref.gather_conv_weight
scale_shift = ref.scale_shift

_override: bool | None = None
_kernels_mod = None  # the kernel modules by name, or the import error
_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


class KernelsUnavailable(RuntimeError):
    """The Triton kernels were asked for on a CUDA tensor but cannot be imported here."""


def kernels_enabled() -> bool | None:
    """True (forced on), False (forced off) or None (auto: CUDA only)."""
    if _override is not None:
        return _override
    v = os.environ.get("FASTWEEDOUT_KERNELS", "auto").strip().lower()
    return True if v in _ON else False if v in _OFF else None


@contextlib.contextmanager
def use_kernels(enabled: bool | None = True) -> Iterator[None]:
    """Switch the Triton kernels on (True), off (False) or back to auto (None) inside the block."""
    global _override
    prev, _override = _override, enabled
    try:
        yield
    finally:
        _override = prev


def _kernels():
    """The kernel modules, or the exception that kept them from importing."""
    global _kernels_mod
    if _kernels_mod is None:
        try:
            from fastweedout.ops.triton import bn_act, common, fused_conv, grouped_conv
            _kernels_mod = SimpleNamespace(common=common, bn_act=bn_act, grouped_conv=grouped_conv,
                                           fused_conv=fused_conv)
        except Exception as e:  # no Triton, or a Triton that cannot load here
            _kernels_mod = e
    return _kernels_mod


def kernels_active(x: Tensor) -> bool:
    """Whether a call on x runs the Triton kernels (raises :class:`KernelsUnavailable` where they are
    wanted on a CUDA tensor and cannot be imported)."""
    mode = kernels_enabled()
    if mode is False or (mode is None and not x.is_cuda):
        return False
    k = _kernels()
    if isinstance(k, BaseException):
        if x.is_cuda:
            raise KernelsUnavailable(
                f"fastweedout: the Triton kernels cannot be imported ({k!r}) on a machine with CUDA. Install a "
                "Triton that matches this PyTorch, or set FASTWEEDOUT_KERNELS=0 to use the PyTorch reference.") from k
        return False
    return bool(k.common.supports(x))


def _float_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    return mask.to(like.dtype) if mask is not None and mask.dtype == torch.bool else mask


def population_bn_act(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Tensor | None,
                      running_mean: Tensor | None = None, running_var: Tensor | None = None,
                      eps: float = 1e-5) -> Tensor:
    """``mask * relu(bn(x))`` for P members folded into the batch (see ``reference.population_bn_act``)."""
    if kernels_active(x) and x.dim() == 4 and members >= 1 and x.shape[0] % members == 0:
        mask = _float_mask(mask, x)
        return _kernels().bn_act.population_bn_act(x, members, weight, bias, mask, running_mean, running_var, eps)
    return ref.population_bn_act(x, members, weight, bias, mask, running_mean, running_var, eps)


def _conv_inputs(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Autocast (custom ops are not autocast-aware) and, on CUDA, channels_last x: the A tile needs
    K_in contiguous for 16-byte loads; the output follows x's layout, so only the first conv of an
    NCHW network pays for the conversion."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
    if x.is_cuda and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight


def _conv_kernels(x: Tensor, weight: Tensor):
    """(x, weight) ready for the conv kernels, or None when the reference must run."""
    if not kernels_active(x):
        return None
    xc, wc = _conv_inputs(x, weight)
    return (xc, wc) if xc.dtype == wc.dtype and kernels_active(xc) else None


def grouped_conv(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Each member's own convolution over its own channels (see ``reference.grouped_conv``)."""
    k = _conv_kernels(x, weight)
    if k is not None:
        return _kernels().grouped_conv.grouped_conv(*k, stride, padding)
    return ref.grouped_conv(x, weight, stride, padding)


def grouped_conv_bn_act(x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor, bn_bias: Tensor,
                        mask: Tensor | None, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                        eps: float = 1e-5) -> Tensor:
    """``mask * relu(bn(grouped_conv(x, weight)))``, BN per output channel (``[P*K_out]`` or ``[P, K_out]``).
    Running statistics: the epilogue is fused into the conv (one write). Batch statistics: the conv
    writes partial moments, then one apply pass (reference: ``reference.grouped_conv_bn_act``)."""
    k = _conv_kernels(x, weight)
    if k is not None:
        return _kernels().grouped_conv.grouped_conv_bn_act(*k, stride, padding, bn_weight, bn_bias,
                                                           _float_mask(mask, k[0]), running_mean, running_var, eps)
    return ref.grouped_conv_bn_act(x, weight, stride, padding, bn_weight, bn_bias, mask, running_mean, running_var,
                                   eps)


def fused_conv(x: Tensor, weight: Tensor, stride: int, padding: int, in_scale: Tensor | None = None,
               in_shift: Tensor | None = None, residual: Tensor | None = None,
               stats: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``grouped_conv(relu(x * in_scale + in_shift)) + residual`` and y's batch statistics, forward only
    (see ``reference.fused_conv``): BN-ReLU-mask in the A-tile prologue, residual and statistics in
    the epilogue."""
    k = _conv_kernels(x, weight)
    if k is not None:
        xc, wc = k
        if residual is not None:
            residual = residual.to(xc.dtype)
        return _kernels().fused_conv.fused_conv(xc, wc, stride, padding, in_scale, in_shift, residual, stats)
    return ref.fused_conv(x, weight, stride, padding, in_scale, in_shift, residual, stats)


def affine_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(x * scale + shift)`` per channel ``[C]`` of x ``[B, C, H, W]`` (an activation whose BN,
    ReLU and mask were folded into scale and shift by :func:`scale_shift`), in x's dtype."""
    if kernels_active(x) and x.dim() == 4:
        k = _kernels()
        x = k.common.as_layout(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=k.common.memory_format(x))
        if x.numel():
            k.bn_act.apply_bn_act(x, out, 1, scale, shift, None, None, None, 0.0, affine=True)
        return out
    return ref.affine_relu(x, scale, shift)
