"""Where and with what a benchmark ran: the environment record, the precision actually used, and the
roofline it is judged against (compute peak for that precision, memory bandwidth).

Peaks: GPUs at their datasheet dense figures for the precision that runs (bf16 / fp16 tensor cores;
fp32 convolutions and the Triton conv run as **tf32** on a GPU unless ``allow_tf32`` is off, so their
peak is the tf32 one, not the 67 TFLOP/s fp32 one); CPUs at a measured large fp32 matmul. Bandwidth:
datasheet HBM figures on GPUs, a measured large copy on CPUs.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastweedout.experiment.runtime import cpu_name

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "fastweedout.bench/2"
# (name fragment, dense FLOP/s by precision, bytes/s); the first fragment found in the device name wins
GPUS = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}, 2.0e12),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}, 3.9e12),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}, 3.35e12),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}, 4.8e12),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 2.0e12),
]
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def git_revision() -> tuple[str | None, bool | None]:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return rev, dirty
    except Exception:
        return None, None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def precision(dtype: torch.dtype, device: torch.device) -> str:
    """The arithmetic that really runs: bf16/fp16; fp32 convolutions as tf32 on a GPU (cuDNN's and the
    Triton conv's default; ``torch.backends.cudnn.allow_tf32``), else fp32; fp64."""
    p = SHORT.get(dtype, str(dtype).replace("torch.", ""))
    if p == "fp32" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return p


@dataclass
class Peak:
    """The compute peak a row divides by (FLOP/s, for its precision), the bandwidth (bytes/s), and where
    both come from."""

    flops_per_s: float
    dtype: str  # the precision (bf16, tf32, fp32, ...)
    source: str  # "datasheet: ..." or "measured: ..."
    bytes_per_s: float = math.nan
    bandwidth_source: str = ""
    #: CPUs: the matmul's FLOPs per second of process CPU time (what the cores do while this process runs
    #: on them; on a machine shared with other processes the wall-time figure also counts the waits)
    flops_per_cpu_s: float = math.nan


_CPU_CACHE: dict[tuple, Peak] = {}


def measure_cpu_peak(n: int = 2048, repeats: int = 5, fresh: bool = False) -> Peak:
    """A large fp32 matmul (best of ``repeats``) and a large copy: the CPU's reachable peaks (once per
    process and thread count; ``fresh``: measured again, e.g. at the end of a run, and not cached)."""
    key = (n, torch.get_num_threads())
    if key in _CPU_CACHE and not fresh:
        return _CPU_CACHE[key]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)
    best = best_cpu = math.inf
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    src, dst = torch.randn(1 << 24), torch.empty(1 << 24)  # 64 MiB: past the caches
    dst.copy_(src)
    copy = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        copy = min(copy, time.perf_counter() - t)
    peak = Peak(2 * n ** 3 / best, "fp32",
                f"measured: fp32 matmul {n}^3, best of {repeats}, {torch.get_num_threads()} threads, "
                f"load {load_average()}", 2 * src.numel() * 4 / copy, "measured: 64 MiB copy (read + write)",
                flops_per_cpu_s=2 * n ** 3 / max(best_cpu, 1e-9))
    if not fresh:
        _CPU_CACHE[key] = peak
    return peak


def device_peak(device: torch.device, dtype: torch.dtype = torch.float32, prec: str | None = None) -> Peak:
    """The peak for the precision that runs (``prec``, default :func:`precision` of dtype)."""
    prec = prec or precision(dtype, device)
    if device.type != "cuda":
        cpu = measure_cpu_peak()
        return Peak(cpu.flops_per_s, prec, cpu.source, cpu.bytes_per_s, cpu.bandwidth_source, cpu.flops_per_cpu_s)
    name = torch.cuda.get_device_name(device)
    for frag, flops, bw in GPUS:
        if frag in name and prec in flops:
            return Peak(flops[prec], prec, f"datasheet: {frag} dense {prec}", bw, f"datasheet: {frag} HBM")
    # Unknown GPU: a measured matmul in the dtype used and a measured copy.
    from .common import cuda_time
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = cuda_time(lambda: torch.mm(a, b), repeats=10, warmup=3).median_s
    x, y = torch.empty(1 << 28, device=device, dtype=torch.uint8), torch.empty(1 << 28, device=device,
                                                                                dtype=torch.uint8)
    c = cuda_time(lambda: y.copy_(x), repeats=10, warmup=3).median_s
    return Peak(2 * n ** 3 / s, prec, f"measured: {prec} matmul {n}^3 (unknown GPU {name!r})", 2 * x.numel() / c,
                "measured: 256 MiB copy")


@dataclass
class Env:
    """Where and with what a row was measured."""

    device: str
    device_type: str
    peak_flops_per_s: float
    peak_dtype: str
    peak_source: str
    peak_bytes_per_s: float
    torch: str
    triton: str | None
    cuda: str | None
    python: str
    git_rev: str | None
    git_dirty: bool | None
    date: str
    threads: int
    cpu_count: int | None
    hostname: str
    allow_tf32: bool = False
    peak_flops_per_cpu_s: float | None = None  # CPUs: the matmul peak per second of process CPU time
    runtime_env: dict = field(default_factory=dict)  # OMP_* / MKL_* / FASTWEEDOUT_* / TRITON_* variables set

    @staticmethod
    def capture(device: torch.device, peak: Peak) -> Env:
        rev, dirty = git_revision()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        return Env(device=name, device_type=device.type, peak_flops_per_s=peak.flops_per_s, peak_dtype=peak.dtype,
                   peak_source=peak.source, peak_bytes_per_s=peak.bytes_per_s, torch=torch.__version__,
                   triton=triton_version(), cuda=torch.version.cuda, python=platform.python_version(), git_rev=rev,
                   git_dirty=dirty, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   threads=torch.get_num_threads(), cpu_count=os.cpu_count(), hostname=platform.node(),
                   allow_tf32=bool(torch.backends.cudnn.allow_tf32) if device.type == "cuda" else False,
                   peak_flops_per_cpu_s=None if math.isnan(peak.flops_per_cpu_s) else peak.flops_per_cpu_s,
                   runtime_env={k: v for k, v in sorted(os.environ.items())
                                if k.startswith(("OMP_", "KMP_", "MKL_", "MALLOC_", "FASTWEEDOUT_", "TRITON_",
                                                 "CUDA_VISIBLE"))})


def cold_compile() -> None:
    """Turn off Inductor's on-disk caches (FX graph, AOT autograd) so that ``compile_s`` is the cold
    compile a fresh machine pays, not a cache hit from an earlier run. Dynamo's in-process cache stays:
    a configuration whose shapes were already compiled in this run reuses the graph (as a search does
    across generations), so its compile time is about zero."""
    try:
        import torch._inductor.config as ic
        ic.fx_graph_cache = False
        if hasattr(ic, "autotune_local_cache"):
            ic.autotune_local_cache = False
    except Exception:
        pass
    try:
        import torch._functorch.config as fc
        if hasattr(fc, "enable_autograd_cache"):
            fc.enable_autograd_cache = False
    except Exception:
        pass


def run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


def roofline(flops: float | None, nbytes: float | None, seconds: float | None, peak: Peak) -> dict:
    """Both roofline ratios of one measured call: useful FLOP/s / compute peak and bytes/s / bandwidth."""
    if not seconds or seconds <= 0:
        return dict(flops_fraction_of_peak=None, bytes_per_s=None, bandwidth_fraction=None)
    bps = nbytes / seconds if nbytes else None
    return dict(flops_fraction_of_peak=(flops / seconds / peak.flops_per_s) if flops else None, bytes_per_s=bps,
                bandwidth_fraction=(bps / peak.bytes_per_s) if bps and math.isfinite(peak.bytes_per_s) else None)
