"""Training checkpoints: one file per training run, written atomically after every epoch.

``<dir>/checkpoint.pt`` holds everything a resumed run needs to continue as if never stopped: the
network, optimizer and scheduler state, the data loader's generator, the epoch records and compute
per phase, the state of any training callbacks, and an *identity* (config, seed, model, widths,
dataset fingerprint, mask, distributed setting) that must match exactly, so a checkpoint is never
resumed into a different run. ``<dir>/checkpoint.prev.pt`` is a copy of the last good checkpoint:
if ``checkpoint.pt`` is damaged (it cannot be torn by a kill, but disks fail) it is set aside and
training resumes from the copy.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastweedout.atomic import atomic_copy, atomic_torch_save

FORMAT = "fastweedout.train/2"
CHECKPOINT_NAME = "checkpoint.pt"
PREV_NAME = "checkpoint.prev.pt"


def to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save(directory: str | os.PathLike, state: Mapping[str, Any]) -> str:
    """Write ``state`` (with ``identity`` and ``epoch``) as the directory's checkpoint, then refresh the
    copy of the last good one. Returns the checkpoint's path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_NAME)
    atomic_torch_save({"format": FORMAT, **to_cpu(dict(state))}, path)
    atomic_copy(path, os.path.join(directory, PREV_NAME))
    return path


def _read(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastweedout training checkpoint ({FORMAT})")
    return state


def _same_mask(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _check_identity(path: str, state: dict, identity: Mapping, mask) -> None:
    old = state.get("identity", {})
    diff = []
    for k, v in identity.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            diff += [f"{k}.{kk}: {old[k].get(kk)!r} -> {vv!r}" for kk, vv in v.items() if old[k].get(kk) != vv]
        elif old.get(k) != v:
            diff.append(f"{k}: {old.get(k)!r} -> {v!r}")
    if not _same_mask(state.get("mask"), mask):
        diff.append("the mask differs")
    if diff:
        raise ValueError(f"{path} belongs to a different training run ({'; '.join(diff)}); use another checkpoint "
                         "directory or delete it")


def set_aside(path: str, why: str) -> str:
    """Move a damaged file out of the way (to ``PATH.corrupt-STAMP``, never over an earlier one) with a
    warning saying why; returns where it went."""
    dst = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(dst):  # never overwrite an earlier one: it may be the evidence someone needs
        dst = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    os.replace(path, dst)
    warnings.warn(f"{path} {why}; moved to {dst}", RuntimeWarning, stacklevel=3)
    return dst


def load(directory: str | os.PathLike, identity: Mapping, mask: Mapping[str, Tensor] | None) -> dict | None:
    """The directory's checkpoint (None when there is none). A damaged ``checkpoint.pt`` is set aside
    and the copy of the last good one is used; a checkpoint of another run is a ValueError."""
    directory = os.fspath(directory)
    path, prev = os.path.join(directory, CHECKPOINT_NAME), os.path.join(directory, PREV_NAME)
    state = None
    if os.path.exists(path):
        try:
            state = _read(path)
        except ValueError as e:
            set_aside(path, f"is damaged ({e})")
    if state is None and os.path.exists(prev):
        try:
            state = _read(prev)
            warnings.warn(f"resuming from the copy of the last good checkpoint {prev}", RuntimeWarning, stacklevel=2)
            atomic_copy(prev, path)
        except ValueError as e:
            set_aside(prev, f"is damaged ({e})")
            state = None
    if state is None:
        return None
    _check_identity(path, state, identity, mask)
    if os.path.exists(prev):  # a kill between the checkpoint and its copy leaves the copy one epoch behind
        try:
            stale = _read(prev).get("epoch") != state.get("epoch")
        except ValueError:
            stale = True
        if stale:
            atomic_copy(path, prev)
    return state


def finish(directory: str | os.PathLike) -> None:
    """A finished training keeps its final checkpoint (the trained weights) but not the spare copy."""
    prev = os.path.join(os.fspath(directory), PREV_NAME)
    if os.path.exists(prev):
        os.unlink(prev)


__all__ = ["CHECKPOINT_NAME", "FORMAT", "PREV_NAME", "finish", "load", "save", "set_aside", "to_cpu"]
