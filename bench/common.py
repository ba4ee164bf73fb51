"""What every benchmark shares: timers, memory, records and the JSONL writer (the environment record
and peaks are in ``env.py``). One harness, one schema, for every benchmark in ``bench/``.

Method (all benchmarks):

* warm-up calls first (compilation, cuDNN autotuning, allocator growth); compile time is measured
  on the first call and reported separately, never inside the timed repeats;
* GPU: CUDA events around each call (the device is synchronised inside the timed region; a call may
  run ``inner`` times between the events, for microsecond kernels); CPU: ``time.perf_counter`` wall
  time, plus the process's CPU time (``time.process_time``), which other processes' load inflates
  much less than wall time;
* the variants being compared are timed *interleaved* (round robin: A B C A B C ...), so that a
  change in the machine's load hits all of them alike; median and spread (min, quartiles, max) of
  the repeats are recorded;
* inputs are random normal, never zeros;
* every row is a dataclass appended as one JSON line (one ``os.write`` on an ``O_APPEND`` file under
  an exclusive ``flock``, fsynced) to ``<out>/<bench>.jsonl`` as soon as it is measured, with the
  device, the precision actually used, the peaks it is judged against, the torch / triton versions,
  the git revision and the date.

FLOPs follow FlopCounterMode's convention: 1 multiply-add = 2 FLOPs, convolutions and linear layers
only (``fastweedout.cost.flops.CONVENTION``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import resource
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastweedout.cost.flops import CONVENTION

from .env import SCHEMA, Env, Peak, cold_compile, device_peak, load_average, precision, roofline, run_id

#: results go under the current directory's bench/results (run from the repository root) or --out
DEFAULT_OUT = Path("bench") / "results"

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
           sys: list[float] | None = None, faults: list[int] | None = None) -> Timing:
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


def time_once(fn: Callable[[], object], device: torch.device, inner: int = 1) -> tuple[float, float, float, int]:
    """(wall s, process CPU s, system s, minor page faults) of one call (``inner`` calls back to back,
    divided by ``inner``), the device synchronised inside."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0 = time.process_time()
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize(device)
        wall, cpu = a.elapsed_time(b) / 1e3, time.process_time() - c0
    else:
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall / inner, cpu / inner, (r1.ru_stime - r0.ru_stime) / inner, (r1.ru_minflt - r0.ru_minflt) // inner


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                on_round: Callable[[int], None] | None = None, inner: int = 1) -> dict[str, Timing]:
    """Time every function ``repeats`` times, round robin, after the caller's warm-up."""
    res: dict[str, list[tuple]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            res[k].append(time_once(fn, device, inner))
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
    precision: str = ""  # the arithmetic that ran: bf16, fp16, tf32 (fp32 on a GPU), fp32, fp64
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
        raise SystemExit("--device cuda asked for, but no CUDA device is available here")
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
           "time_once", "cuda_time", "device_peak", "precision", "roofline", "load_average", "run_id", "cold_compile",
           "DEFAULT_OUT", "SCHEMA"]
