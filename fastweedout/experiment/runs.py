"""Run directories: named by a hash of the whole config, with atomic files and a done-marker.

A run directory ``<results>/<name>-<hash>`` holds::

    config.json      the run's whole config (defaults included); its sha256 names the directory
    results.jsonl    one JSON record per line: phases (search, training, evaluation), epochs, the final result
    mask.pt          the mask that was trained (the Weedout winner or the random control)
    search.ckpt      the search's per-generation checkpoint
    train/           the training's per-epoch checkpoint (and a copy of the last good one)
    done             the final summary, written last: its presence means the run is complete

Every file is written to a temporary file in the same directory, flushed to disk and renamed over
the target, so a kill at any moment leaves either the old or the new version, never a torn one.
``results.jsonl`` is rewritten whole on every update, and records carry a key (type + phase/epoch)
that is unique in the file, so a resumed run replaces a record instead of duplicating it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

from fastweedout.atomic import (
    atomic_write_json,
    default_mode,
    fsync_dir,
)
from fastweedout.experiment import claims
from fastweedout.experiment.records import (
    RunError,
    clean_json,
    read_jsonl,
    upsert_jsonl,
)  # noqa: F401

HASH_CHARS = 12
CONFIG_NAME = "config.json"
RESULTS_NAME = "results.jsonl"
DONE_NAME = "done"
MASK_NAME = "mask.pt"
SEARCH_CHECKPOINT = "search.ckpt"
TRAIN_DIR = "train"
LOCK_NAME = ".lock"
# ours: .NAME.XXXX.tmp[.ext]; train's, the masks': NAME.tmp.PID; the search's: NAME.tmp.HOST.PID
_TEMPORARY = re.compile(r"^(\..+\.tmp(\.[A-Za-z0-9]+)?|.+\.tmp\.([^/]+\.)?\d+)$")
_RUN_DIR = re.compile(rf"^(?P<name>.+)-(?P<hash>[0-9a-f]{{{HASH_CHARS}}})$")


# ------------------------------------------------------------------------------------ hashing
def to_jsonable(obj: Any) -> Any:
    """Dataclasses -> dicts (every field, defaults included, but for ``omit_default`` fields at their
    default: ``fastweedout.fields.opt``), tuples -> lists; rejects NaN/inf and
    anything JSON cannot represent, so the canonical form is well defined."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"config keys must be strings, got {k!r}")
            out[k] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"config values must be finite, got {obj}")
        return obj
    raise TypeError(f"cannot put {type(obj).__name__} {obj!r} in a config")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, shortest float repr: equal configs give byte-equal text."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of the whole config, first :data:`HASH_CHARS` hex digits."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:HASH_CHARS]


def run_dir_name(name: str, obj: Any) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name).strip("._") or "run"
    return f"{safe}-{config_hash(obj)}"


# ------------------------------------------------------------------------------------ results dir
def check_results_dir(path: str | os.PathLike, *, create: bool = True, verify_runs: bool = True) -> str:
    """Validate (and create) a results directory; returns its path.

    RunError when it is a file, cannot be created or written (read-only or full disk), or holds a
    run directory whose config.json does not hash to the name it is stored under.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"results directory {path} exists and is not a directory")
    if not os.path.exists(path):
        if not create:
            raise RunError(f"results directory {path} does not exist")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create results directory {path}: {e.strerror or e}") from None
    if create:
        probe_writable(path)
        remove_stale_creations(path)
    if verify_runs:
        for entry in sorted(os.listdir(path)):
            d = os.path.join(path, entry)
            # dot-entries are temporary directories of runs being created (or left by a kill)
            if not entry.startswith(".") and os.path.isdir(d) and os.path.exists(os.path.join(d, CONFIG_NAME)):
                verify_run_dir(d)
    return path


# .<run dir>.<machine>+<pid>+<start>+XXXX.tmp: a run directory being created, by the process named
# (fastweedout.experiment.claims: machine token, pid, start time); .<run dir>.XXXX.tmp: the same, of old
_CREATING = re.compile(rf"^\.(?P<target>.+-[0-9a-f]{{{HASH_CHARS}}})\."
                       r"(?:(?P<machine>[0-9a-f]{10})\+(?P<pid>\d+)\+(?P<start>\d*)\+)?[^.]+\.tmp$")
_CREATION_STALE_S = 60.0  # creating a run directory takes milliseconds


def creation_prefix(run_dir_name: str) -> str:
    """The name of the temporary directory this process creates ``run_dir_name`` in, but for
    :func:`tempfile.mkdtemp`'s random part and the ``.tmp`` suffix."""
    start = claims.proc_start(os.getpid()) or ""
    return f".{run_dir_name}.{claims.machine_token()}+{os.getpid()}+{start}+"


def _creation_stale(results: str, m: re.Match, path: str) -> bool:
    if m.group("pid") is not None and m.group("machine") == claims.machine_token():
        # a creator on this machine: stale exactly when it is dead (a live one removes its own)
        return not claims.pid_alive(int(m.group("pid")), m.group("start") or None)
    # another machine's (or an unnamed) creator: stale once its run directory exists, or after a minute
    return os.path.isdir(os.path.join(results, m.group("target"))) or \
        time.time() - os.stat(path).st_mtime > _CREATION_STALE_S


def remove_stale_creations(results: str, target: str | None = None) -> list[str]:
    """Remove the temporary directories of run directories being created that a kill left behind
    (those of ``target`` only, when given): on this machine, those whose creator is dead; from
    another machine (or without a creator in the name), those whose run directory exists by now,
    or older than a minute."""
    removed = []
    for entry in os.listdir(results):
        m = _CREATING.match(entry)
        d = os.path.join(results, entry)
        if m is None or (target is not None and m.group("target") != target) or not os.path.isdir(d):
            continue
        try:
            stale = _creation_stale(results, m, d)
        except FileNotFoundError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(entry)
    return removed


def probe_writable(path: str) -> None:
    """Write, sync and delete a small file: catches read-only mounts (where root's access() lies)
    and a full disk before any work is done."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=path)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        why = {errno.EROFS: "read-only file system", errno.ENOSPC: "disk full",
               errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror)
        raise RunError(f"results directory {path} is not writable ({why})") from None


def load_config_json(run_dir: str) -> dict:
    p = os.path.join(run_dir, CONFIG_NAME)
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise RunError(f"{run_dir} is not a run directory (no {CONFIG_NAME})") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{p}: unreadable config ({e})") from None
    if not isinstance(cfg, dict):
        raise RunError(f"{p}: the config must be a JSON object")
    return cfg


def verify_run_dir(run_dir: str) -> dict:
    """The config of a run directory, after checking that it hashes to the directory's name."""
    name = os.path.basename(os.path.normpath(run_dir))
    m = _RUN_DIR.match(name)
    cfg = load_config_json(run_dir)
    try:
        h = config_hash(cfg)
    except (TypeError, ValueError) as e:
        raise RunError(f"{os.path.join(run_dir, CONFIG_NAME)}: not a valid config ({e})") from None
    if m is None or m.group("hash") != h:
        raise RunError(f"run directory {run_dir} holds a config.json whose hash is {h}, not the one it is named "
                       "by: it was edited or belongs to another run. Restore it, or move the directory out of "
                       "the results directory")
    return cfg


class RunDir:
    """One run's directory. ``RunDir.open(results, name, config)`` creates it (config.json first,
    via a temporary directory renamed into place, so a run directory always has its config) or
    checks that an existing one holds exactly this config."""

    def __init__(self, path: str, config: Mapping):
        self.path = path
        self.config = dict(config)
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, results: str | os.PathLike, name: str, config: Any, *, create: bool = True) -> RunDir:
        cfg = to_jsonable(config)
        results = os.fspath(results)
        path = os.path.join(results, run_dir_name(name, cfg))
        if os.path.isdir(path):
            found = verify_run_dir(path)
            if found != cfg:  # same hash, different content: a hash collision or a hand-edited file
                raise RunError(f"{path}/config.json differs from this run's config")
            return cls(path, cfg)
        if os.path.exists(path):
            raise RunError(f"{path} exists and is not a directory")
        if not create:
            raise RunError(f"no run directory {path}")
        os.makedirs(results, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=creation_prefix(os.path.basename(path)), suffix=".tmp", dir=results)
        try:
            default_mode(tmp, directory=True)
            atomic_write_json(os.path.join(tmp, CONFIG_NAME), cfg)
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(path):
                raise
            # lost a race with another process creating the same run (which may have tidied our temporary)
            return cls.open(results, name, config, create=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(results)
        # what a kill left while this run directory was being created (its creator is dead, or the directory is here)
        remove_stale_creations(results, os.path.basename(path))
        return cls(path, cfg)

    # paths
    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def results_path(self) -> str:
        return self.file(RESULTS_NAME)

    @property
    def mask_path(self) -> str:
        return self.file(MASK_NAME)

    @property
    def search_checkpoint(self) -> str:
        return self.file(SEARCH_CHECKPOINT)

    @property
    def train_dir(self) -> str:
        return self.file(TRAIN_DIR)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    # state
    def is_done(self) -> bool:
        return os.path.exists(self.file(DONE_NAME))

    def done_summary(self) -> dict | None:
        p = self.file(DONE_NAME)
        if not os.path.exists(p):
            return None
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise RunError(f"{p}: unreadable done-marker ({e}); delete it to finish the run again") from None

    def mark_done(self, summary: Mapping) -> None:
        """Written last: a run with this file is complete and is skipped on re-runs."""
        atomic_write_json(self.file(DONE_NAME), clean_json(dict(summary)))
        if self._lock_fd is not None:
            # A finished run needs no lock file: whoever locks it from now on sees the marker and stops.
            with contextlib.suppress(OSError):
                os.unlink(self.file(LOCK_NAME))

    def records(self) -> list[dict]:
        return read_jsonl(self.results_path)

    def upsert(self, *records: Mapping) -> list[dict]:
        return upsert_jsonl(self.results_path, records)

    # a lock, so two processes never run the same directory at once (released by the OS on a kill)
    def lock(self) -> None:
        import fcntl

        fd = os.open(self.file(LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(f"run {self.path} is being run by another process right now") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def remove_temporaries(self) -> list[str]:
        """Delete the temporary files a kill left behind (ours: ``.NAME.*.tmp*``; train's and the
        masks': ``NAME.tmp.PID``; the search's: ``NAME.tmp.HOST.PID``). Call it only while holding the lock."""
        removed = []
        for d in (self.path, self.train_dir):
            if not os.path.isdir(d):
                continue
            for n in os.listdir(d):
                if _TEMPORARY.match(n) and os.path.isfile(os.path.join(d, n)):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(d, n))
                        removed.append(n)
        return removed

    def tidy_finished(self) -> None:
        """A finished run keeps no lock file or temporaries (a kill between the done-marker and their
        removal can leave them); removed only when no other process holds the lock."""
        try:
            self.lock()
        except RunError:
            return
        try:
            self.remove_temporaries()
            with contextlib.suppress(OSError):
                os.unlink(self.file(LOCK_NAME))
        finally:
            self.unlock()

    def reopen(self, why: str) -> None:
        """Take back a finished run whose records are damaged (call it holding the lock): its records
        and done-marker are set aside and the run is finished again from its checkpoints."""
        import warnings

        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (RESULTS_NAME, DONE_NAME):
            if os.path.exists(self.file(name)):
                os.replace(self.file(name), self.file(f"{name}.damaged-{stamp}"))
        warnings.warn(f"{self.path}: {why}", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> RunDir:
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()


def iter_run_dirs(results: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(path, config) of every run directory in ``results`` (each verified against its hash)."""
    results = os.fspath(results)
    for entry in sorted(os.listdir(results)):
        d = os.path.join(results, entry)
        if not entry.startswith(".") and os.path.isdir(d) and os.path.exists(os.path.join(d, CONFIG_NAME)):
            yield d, verify_run_dir(d)


__all__ = ["HASH_CHARS", "RunDir", "canonical_json", "check_results_dir", "config_hash", "iter_run_dirs",
           "run_dir_name", "to_jsonable", "verify_run_dir"]
