"""The fused ops the engines call: Triton kernels (``fastweedout.kernels``) where they can run, the
PyTorch reference (``fastweedout.functional``) everywhere else.

Dispatch
--------
* ``FASTWEEDOUT_KERNELS`` unset / ``auto`` (default): kernels for CUDA tensors (when Triton imports),
  the reference for CPU tensors.
* ``FASTWEEDOUT_KERNELS=1`` (or ``with use_kernels(True):``): kernels on CUDA, and on CPU through
  Triton's interpreter (``TRITON_INTERPRET=1`` is set here if no CUDA device exists and the kernel
  modules have not been imported yet; tests set it in conftest). Slow: for tests only.
* ``FASTWEEDOUT_KERNELS=0`` (or ``with use_kernels(False):``): always the reference.
``use_kernels`` overrides the environment variable while it is active.

Whatever the switch, a call the kernels cannot take falls back to the reference: unsupported dtype
(bf16 under the interpreter), CPU without the interpreter, mixed x/weight dtypes, or bad shapes (the
reference then raises its own error).

Autocast: custom ops are not autocast-aware, so ``grouped_conv*`` casts x and weight to the autocast
dtype itself (as ``F.conv2d`` would); ``population_bn_act`` keeps x's dtype, as the reference does.

Layouts: the kernels accept NCHW and channels_last and write their output in x's layout. On CUDA the
convs make x channels_last first (the fast layout), so their outputs are channels_last; engines do
best to go channels_last once after the stem and to build per-member weights with
:func:`gather_conv_weight` (K_out-contiguous: no repacking copy per call).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch
from torch import Tensor

from . import functional as ref

__all__ = ["population_bn_act", "grouped_conv", "grouped_conv_bn_act", "gather_conv_weight", "use_kernels",
           "kernels_enabled", "kernels_active"]

_override: bool | None = None
_kernels_mod = None      # the imported kernel modules, or False when Triton is unusable
_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


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
    global _kernels_mod
    if _kernels_mod is None:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        try:
            from .kernels import _common, bn_act, grouped_conv
            _kernels_mod = (_common, bn_act, grouped_conv)
        except Exception as e:  # no Triton, or a Triton that cannot load here
            warnings.warn(f"fastweedout: Triton kernels unavailable, using the PyTorch reference ({e!r})")
            _kernels_mod = False
    return _kernels_mod or None


def kernels_active(x: Tensor) -> bool:
    """Whether a call on x would run the Triton kernels."""
    mode = kernels_enabled()
    if mode is False or (mode is None and not x.is_cuda):
        return False
    k = _kernels()
    return k is not None and k[0].supports(x)


def _float_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    return mask.to(like.dtype) if mask is not None and mask.dtype == torch.bool else mask


def population_bn_act(x: Tensor, members: int, weight: Tensor, bias: Tensor, mask: Tensor | None,
                      running_mean: Tensor | None = None, running_var: Tensor | None = None,
                      eps: float = 1e-5) -> Tensor:
    """``mask * relu(bn(x))`` for P members folded into the batch (see ``functional.population_bn_act``)."""
    if kernels_active(x) and x.dim() == 4 and members >= 1 and x.shape[0] % members == 0:
        mask = _float_mask(mask, x)
        return _kernels()[1].population_bn_act(x, members, weight, bias, mask, running_mean, running_var, eps)
    return ref.population_bn_act(x, members, weight, bias, mask, running_mean, running_var, eps)


def _conv_inputs(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Autocast (custom ops are not autocast-aware) and, on CUDA, channels_last x: the kernel's A tile
    needs K_in contiguous for vector loads; the output follows x's layout, so only the first conv of
    an NCHW network pays for the conversion."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
    if x.is_cuda and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight


def grouped_conv(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Each member's own convolution over its own channels (see ``functional.grouped_conv``)."""
    if kernels_active(x):
        xc, wc = _conv_inputs(x, weight)
        if xc.dtype == wc.dtype and kernels_active(xc):
            return _kernels()[2].grouped_conv(xc, wc, stride, padding)
    return ref.grouped_conv(x, weight, stride, padding)


def grouped_conv_bn_act(x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor, bn_bias: Tensor,
                        mask: Tensor | None, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                        eps: float = 1e-5) -> Tensor:
    """``mask * relu(bn(grouped_conv(x, weight)))``, BN per output channel (``[P*K_out]`` or ``[P, K_out]``):
    the compact engine's conv + ``population_bn_act(members=1)`` in one op. Running statistics: the
    epilogue is fused into the conv (one write). Batch statistics: the conv writes partial sums, then
    one apply pass (see ``functional.grouped_conv_bn_act`` for the reference)."""
    if kernels_active(x):
        xc, wc = _conv_inputs(x, weight)
        if xc.dtype == wc.dtype and kernels_active(xc):
            return _kernels()[2].grouped_conv_bn_act(xc, wc, stride, padding, bn_weight, bn_bias,
                                                      _float_mask(mask, xc), running_mean, running_var, eps)
    return ref.grouped_conv_bn_act(x, weight, stride, padding, bn_weight, bn_bias, mask, running_mean, running_var,
                                   eps)


def gather_conv_weight(weight: Tensor, idx_out: Tensor, idx_in: Tensor) -> Tensor:
    """Per-member weights ``[P, K_out, K_in, kh, kw]`` of a shared conv weight ``[C_out, C_in, kh, kw]``:
    the values of ``weight[idx_out[:, :, None], idx_in[:, None, :]]``, gathered in one indexing op
    straight into the K_out-contiguous layout the Triton conv loads fastest (any device; the reference
    conv accepts it too)."""
    g = weight.permute(2, 3, 1, 0)[:, :, idx_in[:, :, None], idx_out[:, None, :]]  # [kh, kw, P, K_in, K_out]
    return g.permute(2, 4, 3, 0, 1)
