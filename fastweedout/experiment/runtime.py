"""Where and how runs execute, resolved once per process: the device every stage uses, the CPU threads,
deterministic kernels; and a record of the machine that a run's wall times depend on."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

from fastweedout.config import Runtime
from fastweedout.world import env_world, local_rank


def set_deterministic() -> None:
    """Deterministic kernels (``--deterministic``): run-to-run bitwise equal results on the same GPU and
    software, at some speed cost. CPU runs are deterministic without it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS: fixed workspace, fixed reduction order
    os.environ["FASTWEEDOUT_AUTOTUNE"] = "0"  # Triton conv: the heuristic block sizes, not the fastest-timed ones
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class ResolvedRuntime:
    """A :class:`fastweedout.config.Runtime` with its device decided; every other setting reads through."""

    settings: Runtime
    device: torch.device

    def __getattr__(self, name: str):
        if name == "settings":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.settings, name)


def resolve_runtime(runtime: Runtime | ResolvedRuntime | None = None) -> ResolvedRuntime:
    """Decide the device once (ValueError for one this machine lacks), and apply the threads and the
    determinism settings to this process; a resolved runtime is returned as it is. Under torchrun/srun
    on GPUs each rank takes the GPU of its local rank."""
    if isinstance(runtime, ResolvedRuntime):
        return runtime
    runtime = runtime or Runtime()
    if runtime.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(runtime.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {runtime.device!r} (use cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {runtime.device!r} asked for, but CUDA is not available here")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {runtime.device!r}: only cpu and cuda are supported")
    if device.type == "cuda" and env_world()[1] > 1:
        device = torch.device("cuda", local_rank())  # one GPU per rank
        torch.cuda.set_device(device)
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    if runtime.deterministic:
        set_deterministic()
    return ResolvedRuntime(runtime, device)


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    """What a run's wall times depend on, recorded with its result."""
    env = dict(device=str(device), torch=torch.__version__, python=platform.python_version(),
               platform=platform.platform(), cpu=cpu_name(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's, or the machine's (``MemAvailable``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.split()}
        return info.get("MemAvailable", info.get("MemFree", 1 << 62))
    except OSError:
        return 1 << 62


__all__ = ["ResolvedRuntime", "available_bytes", "cpu_name", "environment", "resolve_runtime", "set_deterministic"]
