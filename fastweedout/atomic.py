"""Atomic file writes: a temporary file beside the target, flushed and fsynced, renamed over it.

A reader (or a process killed mid-write) sees the old or the new version, never a torn one; the
temporary is removed on any error (a full disk included) and the old file stays as it was.
Temporary names start with a dot and end in ``.tmp`` (``.NAME.XXXX.tmp[.ext]``), so a run directory
can recognise and remove the ones a kill left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def default_mode(path: str, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) files; results are meant to be shared like any file."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def _renamed_over(tmp: str, path: str, directory: str) -> Iterator[None]:
    """Rename ``tmp`` over ``path`` when the block succeeds (then sync the directory); remove it otherwise."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_all(fd: int, data) -> None:
    """Write every byte of ``data`` to ``fd`` and fsync it (the data must be on disk before the rename
    makes it visible). Every file of a run is written here, so a full disk is always an OSError."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.fsync(fd)


def atomic_write_bytes(path: str | os.PathLike, data) -> None:
    """Write ``data`` (bytes-like) to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    with _renamed_over(tmp, path, d):
        try:
            default_mode(tmp)
            write_all(fd, data)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically. The object is serialised in memory first and written with
    :func:`atomic_write_bytes`, so a full disk raises ``OSError(ENOSPC)`` (torch's own file writer
    turns it into a RuntimeError) and nothing torn is ever visible."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented, sorted keys, no NaN) of plain data: dicts, lists, str, numbers, bools, None."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write (e.g. ``savefig``) that is renamed over ``path`` on success."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=d)
    os.close(fd)
    with _renamed_over(tmp, path, d):
        default_mode(tmp)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with open(src, "rb") as f:
        atomic_write_bytes(dst, f.read())


__all__ = ["write_all", "atomic_copy", "atomic_output", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text"]
