"""Helpers shared by the kernel files: interpreter detection, layouts, dtypes, device guard, launch
sizing, NaN-propagating ReLU and a safe per-shape config tuner."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Hashable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# Read the same way @triton.jit reads it (at decoration time, i.e. when a kernel module is imported).
# Library code never sets TRITON_INTERPRET; tests/conftest.py does, before any kernel import, on CPU.
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


def device_guard(x: Tensor):
    """Launch on x's device, not the current one (a kernel launched on the wrong device reads garbage)."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator dtype: fp64 for fp64 inputs (so gradcheck sees fp64 math), else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of statistics (mean, var), partial sums, and the prologue's scale/shift."""
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


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(x: Tensor) -> int:
    """Streaming multiprocessors of x's device (1 under the interpreter)."""
    if x.is_cuda:
        return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 1


def npow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@triton.jit
def relu(x):
    """ReLU that keeps NaN: ``tl.maximum(x, 0.0)`` lowers to ``max.f32``, which returns 0 for a NaN
    input on a GPU (np.fmax under the interpreter), so a diverged member would get a finite fitness."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def scale_shift(p, c, c_ok, w_ptr, b_ptr, mean_ptr, var_ptr, swp, sbp, smup, svp, eps,
                AFFINE: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (scale, shift, mean, rstd) of member p. AFFINE: w, b *are* scale and shift."""
    w = tl.load(w_ptr + p * swp + c, mask=c_ok, other=0.0).to(ACC)
    b = tl.load(b_ptr + p * sbp + c, mask=c_ok, other=0.0).to(ACC)
    if AFFINE:
        mean = tl.zeros_like(w)
        rstd = tl.zeros_like(w) + 1.0
        scale = w
        shift = b
    else:
        mean = tl.load(mean_ptr + p * smup + c, mask=c_ok, other=0.0).to(ACC)
        var = tl.load(var_ptr + p * svp + c, mask=c_ok, other=1.0).to(ACC)
        rstd = 1.0 / tl.sqrt(var + eps)
        scale = w * rstd
        shift = b - mean * scale
    return scale, shift, mean, rstd


@triton.jit
def load_mask(m_ptr, p, c, c_ok, smp, HAS_MASK: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    if HAS_MASK:
        m = tl.load(m_ptr + p * smp + c, mask=c_ok, other=0.0).to(ACC)
    else:
        m = tl.full([BC], 1.0, ACC)
    return m


# ------------------------------------------------------------------------------------------ tuning
def compile_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'this config cannot be built here' (too much shared memory, too many
    registers): the only ones a tuner may skip. Runtime (CUDA) errors always propagate."""
    errs: list[type[BaseException]] = []
    try:
        from triton.runtime.errors import OutOfResources
        errs.append(OutOfResources)
    except ImportError:  # pragma: no cover - depends on the Triton version
        pass
    try:
        from triton.compiler.errors import CompilationError
        errs.append(CompilationError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


class ConfigTuner:
    """Picks a launch config once per key by timing the candidates (an in-process cache).

    Safe where a blind try/except is not: a candidate is skipped only for a *compile* error
    (:func:`compile_errors`, raised by ``build`` before anything runs); a runtime error propagates, so a
    sticky CUDA error never hides behind a 'failed config'. While a CUDA graph is being captured
    (timing would synchronise and break the capture) or when tuning is off, the default is used
    and not cached, so a later uncaptured call still tunes.
    """

    def __init__(self):
        self.cache: dict[Hashable, tuple] = {}

    def pick(self, key: Hashable, candidates: Sequence[tuple], default: tuple, enabled: bool,
             build: Callable[[tuple], object], timer: Callable[[tuple], float],
             capturing: Callable[[], bool] = lambda: False) -> tuple:
        if key in self.cache:
            return self.cache[key]
        if not enabled or capturing():
            return default
        skip = compile_errors()
        best, best_t = None, float("inf")
        for cfg in dict.fromkeys(candidates):
            try:
                build(cfg)
            except skip:
                continue
            t = timer(cfg)
            if t < best_t:
                best, best_t = cfg, t
        self.cache[key] = best if best is not None else default
        return self.cache[key]
