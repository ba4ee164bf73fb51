"""Helpers shared by the kernel files: interpreter detection, layouts, dtypes, launch sizing."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

# Read the same way @triton.jit reads it (at decoration time, i.e. when a kernel module is imported).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

#: dtypes the kernels accept. The interpreter has no bf16 arithmetic (triton#4972), so there bf16 is
#: left to the reference (ops.py checks :func:`supports`).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def supports(x: Tensor) -> bool:
    """Whether the kernels can run on this tensor's device and dtype."""
    if x.dtype not in DTYPES:
        return False
    if INTERPRET:
        return x.device.type == "cpu" and x.dtype != torch.bfloat16
    return x.is_cuda


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator dtype: fp64 for fp64 inputs (so gradcheck sees fp64 math), else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of saved statistics (mean, rstd) and partial sums."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x: Tensor) -> bool:
    """True only when x is channels_last and *not* also NCHW-contiguous (C==1 or H*W==1 are both)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format the kernels write their outputs in: channels_last iff x is, else NCHW."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def as_layout(x: Tensor) -> Tensor:
    """x as NCHW-contiguous or channels_last-contiguous (copies only for other strides)."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(x: Tensor) -> int:
    """Streaming multiprocessors of x's device (a small number under the interpreter)."""
    if x.is_cuda:
        return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 1


def npow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
