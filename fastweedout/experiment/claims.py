"""Claim files: which process runs which run directory of a grid, on one machine or many.

Whole runs per rank (one GPU per run), in a static round-robin order followed by work stealing
(:func:`order_for_rank`), made safe by an atomic claim file per run directory (``.claim``, created
with ``O_CREAT|O_EXCL``, the owner's host, boot id, pid namespace, pid and start time inside). A claim
whose owner died (same machine: the pid is gone, reused or a zombie; another host: its heartbeat,
refreshed every :data:`HEARTBEAT_S` seconds while held, is older than ``stale_after``) is broken, so a
re-run or a surviving rank finishes a dead rank's runs. Needs no process group: only the shared
filesystem and the rank/world size the launcher sets (:func:`fastweedout.world.env_world`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from fastweedout.world import env_world

CLAIM_NAME = ".claim"
DONE_NAME = "done"  # the run directory's done-marker (fastweedout.experiment.runs.DONE_NAME)
HEARTBEAT_S = 30.0  # how often a process refreshes the claims it holds
STALE_AFTER_S = 600.0  # a claim from another host whose heartbeat is older than this is dead
_BREAK_GUARD_STALE_S = 60.0

_held: dict[str, str] = {}  # claim file -> the content we wrote
_held_lock = threading.Lock()
_heartbeat: threading.Thread | None = None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this machine and pid namespace still runs (not a zombie; with
    ``start``, :func:`proc_start` of the process meant, also not a reuse of its pid by another)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # a zombie: dead, not yet reaped by its parent
            return False
        if start is not None and fields[19] != start:  # the pid was reused by another process
            return False
    except (OSError, IndexError):
        pass
    return True


def machine_token() -> str:
    """A short hex token of this host, boot and pid namespace: the processes whose pids
    :func:`pid_alive` can check are those recorded with the same token."""
    import hashlib

    key = f"{socket.gethostname()}/{_boot_id()}/{_pid_namespace()}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def _me() -> dict:
    rank, size = env_world()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "pid": os.getpid(),
            "start": proc_start(os.getpid()), "rank": rank, "world_size": size, "time": time.time()}


def _claim_path(run_dir) -> str:
    return os.path.join(os.fspath(run_dir), CLAIM_NAME)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def claim_owner(run_dir) -> dict | None:
    """The owner record of a run's claim (host, pid, rank, ...), None when unclaimed; ``{}`` when
    the file is there but not (yet) readable as JSON."""
    text = _read(_claim_path(run_dir))
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _stale(path: str, text: str, stale_after: float | None) -> bool:
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    try:
        owner = json.loads(text)
    except ValueError:  # created but never written: its creator died in between (or is writing now)
        return age > _BREAK_GUARD_STALE_S
    me = _me()
    if all(owner.get(k) == me[k] for k in ("host", "boot_id", "pid_ns")):  # pids we can see: check it
        return not pid_alive(int(owner.get("pid", -1)), owner.get("start"))
    return stale_after is not None and age > stale_after


def _break(path: str, text: str) -> bool:
    """Remove a stale claim, unless someone replaced it meanwhile (breakers are serialised by a guard file)."""
    guard = path + ".break"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - os.stat(guard).st_mtime > _BREAK_GUARD_STALE_S:  # its breaker died
                os.unlink(guard)
        return False
    try:
        if _read(path) != text:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(guard)


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _held_lock:
            paths = list(_held)
        for p in paths:
            with contextlib.suppress(OSError):
                os.utime(p)


def _is_done(run_dir: str, done) -> bool:
    if callable(done):
        return bool(done(run_dir))
    return os.path.exists(os.path.join(run_dir, done))


def claim(run_dir, *, done: str | Callable[[str], bool] = DONE_NAME, stale_after: float | None = STALE_AFTER_S) -> bool:
    """Try to take ``run_dir`` for this process: True when it is now ours and not done yet.

    Atomic: the claim file ``run_dir/.claim`` is created with ``O_CREAT|O_EXCL`` and holds the
    owner's host, boot id, pid namespace, pid (and its start time), rank and time; of any number of
    processes on any number of hosts sharing the filesystem, at most one gets True. The done-marker
    (``done``: a file name in the run directory, or a predicate) is checked again after the claim is
    taken, so a run finished by another rank meanwhile is never redone. A claim is broken when its
    owner is dead: on this machine (same host name, boot id and pid namespace), its pid is gone (or
    reused, or a zombie); from anywhere else (another host or container), its heartbeat (refreshed
    every :data:`HEARTBEAT_S` seconds while held) is older than ``stale_after`` seconds (None:
    never). Release with :func:`release` (or use :func:`claimed`). Re-claiming a run this process
    already holds returns True.
    """
    run_dir = os.fspath(run_dir)
    if _is_done(run_dir, done):
        return False
    path = _claim_path(run_dir)
    with _held_lock:
        if path in _held and _read(path) == _held[path]:
            return True
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = _read(path)
            if text is None:
                continue  # released meanwhile: try again
            if _stale(path, text, stale_after) and _break(path, text):
                continue
            return False
        text = json.dumps(_me(), sort_keys=True)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        global _heartbeat
        with _held_lock:
            _held[path] = text
            if _heartbeat is None:
                _heartbeat = threading.Thread(target=_beat, name="fastweedout-claims", daemon=True)
                _heartbeat.start()
        if _is_done(run_dir, done):
            release(run_dir)
            return False
        return True
    return False


def release(run_dir) -> None:
    """Give up this process's claim on ``run_dir`` (a claim held by someone else is left alone)."""
    path = _claim_path(run_dir)
    with _held_lock:
        text = _held.pop(path, None)
    if text is not None and _read(path) == text:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def claimed(run_dir, **kw) -> Iterator[bool]:
    """``with claimed(d) as mine: if mine: run(d)`` -- released on exit, also on an exception."""
    mine = claim(run_dir, **kw)
    try:
        yield mine
    finally:
        if mine:
            release(run_dir)


def order_for_rank(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Indices ``0..n-1`` in the order this rank tries them: its own round-robin share
    (``i % world == rank``) first, then the other ranks' shares, last-first (stealing the runs their
    owners would reach last)."""
    if rank is None or world_size is None:
        r, w = env_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    own = list(range(rank, n, world_size))
    others = [i for i in range(n - 1, -1, -1) if i % world_size != rank]
    return own + others


def grid_for_rank(configs: list, rank: int | None = None, world_size: int | None = None) -> list:
    """``configs`` in the order this rank should try them (:func:`order_for_rank`); a rank runs a
    config only once :func:`claim` gives it its run directory. Rank and world size default to
    :func:`world` (the launcher's environment: no process group is needed)."""
    return [configs[i] for i in order_for_rank(len(configs), rank, world_size)]


def pending(run_dirs: Iterable[str], done: str | Callable[[str], bool] = DONE_NAME) -> list[str]:
    """The run directories that are not done (held by a live rank, or waiting for a re-run)."""
    return [d for d in run_dirs if not _is_done(os.fspath(d), done)]


__all__ = ["CLAIM_NAME", "claim", "claim_owner", "claimed", "grid_for_rank", "machine_token", "order_for_rank",
           "pending", "pid_alive", "proc_start", "release"]
