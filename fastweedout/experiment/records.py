"""A run's records: one JSON object per line (``results.jsonl``), each unique by its key, kept in a
fixed order, the whole file rewritten atomically on every update."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from fastweedout.atomic import atomic_write_text


class RunError(ValueError):
    """A results directory or run directory that cannot be used as asked (a user error: CLI exit 2)."""


# Fields of records that measure time: they differ between an interrupted and an uninterrupted run.
TIMING_KEYS = frozenset({"wall_s", "wall_time_s", "train_time_s", "eval_time_s", "created", "finished",
                         "search_wall_s", "training_wall_s", "evaluation_wall_s"})

def clean_json(obj: Any) -> Any:
    """JSON-safe record values: non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def record_key(record: Mapping) -> tuple:
    """What makes a record unique in a results file: its type and its phase, epoch or step."""
    return (record.get("type"), record.get("phase"), record.get("epoch"), record.get("step"))


_TYPE_RANK = {"phase": 0, "mask": 1, "population": 2, "epoch": 3, "finetune_epoch": 4, "final": 6, "error": 7}
_PHASE_RANK = {"pretrain": 0, "search": 1, "training": 2, "evaluation": 3}


def record_order(record: Mapping) -> tuple:
    """The order of records in a results file, whatever order they were written in (a resumed run
    rewrites some): pretraining, the mask's selection, the mask, the search during training, epochs,
    the training and evaluation totals, fine-tuning, the final result, errors."""
    t, ph = record.get("type"), record.get("phase")
    rank = _TYPE_RANK.get(t, 8)
    if t == "phase" and ph not in ("pretrain", "search"):
        rank = 5  # totals after the epochs
    return (rank, _PHASE_RANK.get(ph, 9), str(ph), record.get("epoch") or 0, record.get("step") or 0)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file ([] when it does not exist); RunError naming the line when corrupt."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunError(f"{path}, line {i}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise RunError(f"{path}, line {i}: a record must be a JSON object")
            out.append(rec)
    return out


def upsert_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> list[dict]:
    """Add ``records`` to the file, replacing any with the same :func:`record_key`, kept in
    :func:`record_order`; the whole new file is written atomically, so it never holds a torn or
    duplicated line."""
    current = read_jsonl(path)
    index = {record_key(r): i for i, r in enumerate(current)}
    for r in records:
        r = clean_json(dict(r))
        k = record_key(r)
        if k in index:
            current[index[k]] = r
        else:
            index[k] = len(current)
            current.append(r)
    current.sort(key=record_order)
    text = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in current)
    atomic_write_text(path, text)
    return current


def strip_timing(obj: Any) -> Any:
    """A record (or list of them) without its timing fields: what must be equal between an
    interrupted-and-resumed run and an uninterrupted one."""
    if isinstance(obj, Mapping):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


__all__ = ["RunError", "TIMING_KEYS", "clean_json", "read_jsonl", "record_key", "record_order", "strip_timing",
           "upsert_jsonl"]
