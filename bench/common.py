"""What every benchmark shares: the environment record, device peaks, timers, memory, JSONL output.

Method (all benchmarks):

* warm-up calls first (compilation, cuDNN autotuning, allocator growth); compile time is measured
  on the first call and reported separately, never inside the timed repeats;
* GPU: CUDA events around each call (the device is synchronised inside the timed region);
  CPU: ``time.perf_counter`` wall time, plus the process's CPU time (``time.process_time``: user +
  system seconds of all its threads), which other processes' load inflates much less than wall time;
* the variants being compared are timed *interleaved* (round robin: A B C A B C ...), so that a
  change in the machine's load hits all of them alike; median and spread (min, quartiles, max) of
  the repeats are recorded;
* inputs are random normal, never zeros;
* every row is a dataclass appended as one JSON line (one ``os.write`` on an ``O_APPEND`` file under
  an exclusive ``flock``) to ``<out>/<bench>.jsonl``, with the device, the peak figures used, the
  torch / triton versions, the git revision and the date.

FLOPs follow FlopCounterMode's convention: 1 multiply-add = 2 FLOPs, convolutions and linear layers
only (``fastweedout.flops.CONVENTION``).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastweedout.flops import CONVENTION

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results"
SCHEMA = "fastweedout.bench/1"
# Dense peaks (FLOP/s) of GPUs, by dtype; the headline figure is bf16 (989 TFLOP/s dense,
# H100 SXM datasheet; the H200 has the same compute).
GPU_PEAKS = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12, "tf32": 495e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12, "tf32": 495e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12, "tf32": 156e12},
}


# ------------------------------------------------------------------------------------ environment
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


@dataclass
class Peak:
    """The peak figure a run divides by (FLOP/s), and where it comes from."""

    flops_per_s: float
    dtype: str
    source: str  # "datasheet: ..." or "measured: ..."


_CPU_PEAK_CACHE: dict[tuple[int, int], Peak] = {}


def measure_cpu_peak(n: int = 2048, repeats: int = 5) -> Peak:
    """A large fp32 matmul (``n x n @ n x n``), best of ``repeats``: the CPU's reachable peak.

    Measured once per process and thread count, then reused (recorded in every row as the peak used).
    """
    key = (n, torch.get_num_threads())
    if key in _CPU_PEAK_CACHE:
        return _CPU_PEAK_CACHE[key]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    peak = Peak(2 * n ** 3 / best, "float32",
                f"measured: fp32 matmul {n}x{n}x{n}, best of {repeats}, {torch.get_num_threads()} threads, "
                f"load {load_average()}")
    _CPU_PEAK_CACHE[key] = peak
    return peak


def device_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> Peak:
    """The datasheet peak of a known GPU (bf16 headline, or the fp32/tf32 figure), or a measured CPU peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        dt = str(dtype).replace("torch.", "")
        if dt == "float32" and torch.backends.cuda.matmul.allow_tf32:
            dt = "tf32"
        for k, v in GPU_PEAKS.items():
            if k in name:
                return Peak(v[dt], dt, f"datasheet: {k} dense {dt}")
        # Unknown GPU: a measured matmul in the dtype used.
        n = 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = cuda_time(lambda: torch.mm(a, b), repeats=10, warmup=3).median_s
        return Peak(2 * n ** 3 / ms, dt, f"measured: {dt} matmul {n}^3 (unknown GPU {name!r})")
    return measure_cpu_peak()


@dataclass
class Env:
    """Where and with what a row was measured."""

    device: str
    device_type: str
    peak_flops_per_s: float
    peak_dtype: str
    peak_source: str
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
    runtime_env: dict = field(default_factory=dict)  # OMP_* / MKL_* / MALLOC_* / FASTWEEDOUT_* variables set

    @staticmethod
    def capture(device: torch.device, peak: Peak) -> "Env":
        rev, dirty = git_revision()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        return Env(device=name, device_type=device.type, peak_flops_per_s=peak.flops_per_s, peak_dtype=peak.dtype,
                   peak_source=peak.source, torch=torch.__version__, triton=triton_version(),
                   cuda=torch.version.cuda, python=platform.python_version(), git_rev=rev, git_dirty=dirty,
                   date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   threads=torch.get_num_threads(), cpu_count=os.cpu_count(), hostname=platform.node(),
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


# ------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """Repeats of one measured call: wall seconds (median and spread) and CPU seconds."""

    median_s: float
    min_s: float
    q25_s: float
    q75_s: float
    max_s: float
    repeats: int
    times_s: list[float]
    cpu_median_s: float | None = None  # process CPU time per call (user + system, all threads)
    cpu_times_s: list[float] | None = None
    sys_median_s: float | None = None  # of which system (kernel) time: page faults, allocation
    minor_faults_median: float | None = None  # page faults per call (memory first touched)
    timer: str = "perf_counter"

    @staticmethod
    def of(times: list[float], cpu: list[float] | None = None, timer: str = "perf_counter",
           sys: list[float] | None = None, faults: list[int] | None = None) -> "Timing":
        s = sorted(times)
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
        return Timing(median_s=statistics.median(s), min_s=s[0], q25_s=q[0], q75_s=q[2], max_s=s[-1],
                      repeats=len(s), times_s=[round(t, 6) for t in times],
                      cpu_median_s=statistics.median(cpu) if cpu else None,
                      cpu_times_s=[round(t, 6) for t in cpu] if cpu else None,
                      sys_median_s=statistics.median(sys) if sys else None,
                      minor_faults_median=statistics.median(faults) if faults else None, timer=timer)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s > 0 else 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return Timing.of(times, timer="cuda_events")


def time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float, int]:
    """(wall s, process CPU s, system s, minor page faults) of one call, the device synchronised inside."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0 = time.process_time()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize(device)
        wall, cpu = a.elapsed_time(b) / 1e3, time.process_time() - c0
    else:
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall, cpu, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                on_round: Callable[[int], None] | None = None) -> dict[str, Timing]:
    """Time every function ``repeats`` times, round robin, after the caller's warm-up."""
    res: dict[str, list[tuple]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            res[k].append(time_once(fn, device))
        if on_round is not None:
            on_round(r)
    timer = "cuda_events" if device.type == "cuda" else "perf_counter"
    return {k: Timing.of([v[0] for v in res[k]], [v[1] for v in res[k]], timer, [v[2] for v in res[k]],
                         [v[3] for v in res[k]]) for k in fns}


# ------------------------------------------------------------------------------------ memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive; records the peak.

    Every op's outputs are seen here; a storage is counted once (views share it) and uncounted when
    it is freed (a weakref finalizer on the storage, whose Python object PyTorch keeps as long as the
    storage lives). Tensors that existed before (weights, inputs) are not counted.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = id(st)
                if key not in self._live:
                    n = st.nbytes()
                    self._live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key)
        return out


class PeakMemory:
    """Peak memory of the code inside the ``with`` block, above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's exact peak).
    CPU (``exact=True``): the peak of the tensor storages that the block creates and holds at once,
    tracked op by op by a dispatch mode (exact for eager code; adds a little Python time per op).
    CPU (``exact=False``, for ``torch.compile`` code, which a dispatch mode would disturb): the
    process's resident set sampled every millisecond (approximate: it counts only memory newly taken
    from the OS, so buffers reused from the allocator's free lists do not show).
    """

    def __init__(self, device: torch.device, exact: bool = True):
        self.device = device
        self.exact = exact
        self.kind = ("cuda_max_allocated" if device.type == "cuda"
                     else "cpu_live_tensors" if exact else "cpu_rss_sampled")
        self.bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.exact:
            self._mode = _LiveTensorBytes()
            self._mode.__enter__()
        else:
            try:
                self._base = _rss_bytes()
            except OSError:
                self._base = None
            self._peak = self._base or 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            if self._base is not None:
                self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self.exact:
            self._mode.__exit__(*exc)
            self.bytes = int(self._mode.peak)
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.bytes = int(self._peak - self._base)
        return False


# ------------------------------------------------------------------------------------ records
@dataclass
class Record:
    """Fields every row carries (subclasses add the benchmark's own)."""

    bench: str
    preset: str
    run_id: str
    env: dict
    load_avg_before: list[float] | None
    load_avg_after: list[float] | None
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    flops_convention: str = CONVENTION
    schema: str = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False, default=_json_default)


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Append rows atomically: one ``write`` of whole lines to an ``O_APPEND`` file under ``flock``."""
    data = "".join(r.to_json() + "\n" for r in records).encode()
    if not data:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_jsonl(paths: Iterable[str | os.PathLike]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{i}: not a JSON line ({e})") from e
                if not isinstance(row, dict) or "bench" not in row:
                    raise ValueError(f"{p}:{i}: not a benchmark record (no 'bench' field)")
                rows.append(row)
    return rows


def record_fields(cls) -> list[str]:
    return [f.name for f in fields(cls)]


# ------------------------------------------------------------------------------------ misc
def parse_floats(s: str | Iterable[float]) -> list[float]:
    if isinstance(s, str):
        return [float(v) for v in s.split(",") if v.strip()]
    return [float(v) for v in s]


def parse_ints(s: str | Iterable[int]) -> list[int]:
    if isinstance(s, str):
        return [int(v) for v in s.split(",") if v.strip()]
    return [int(v) for v in s]


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but no CUDA device is available here")
    return dev


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_num(v: float | None, unit: str = "") -> str:
    if v is None or not math.isfinite(v):
        return "-"
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g} {p}{unit}"
    return f"{v:.3g} {unit}".strip()


def progress(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


__all__ = ["Env", "Peak", "Timing", "Record", "PeakMemory", "append_jsonl", "read_jsonl", "interleaved",
           "time_once", "device_peak", "measure_cpu_peak", "load_average", "run_id", "DEFAULT_OUT", "field"]
