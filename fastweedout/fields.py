"""Config fields declared once: a dataclass field carries its default, help, range and choices, and
both the validation of the Python API and the command-line flags (``fastweedout.flags``) are derived
from it.

``opt(default, "help", min=1)`` is ``dataclasses.field`` with metadata; :func:`check` validates every
field of a dataclass instance against its annotation and metadata (called from ``__post_init__``);
:func:`parse_value` turns a command-line string into a field's value with the same checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
        min: float | None = None, max: float | None = None, min_open: bool = False, max_open: bool = False,
        flag: str | None = None, cli: bool = True, metavar: str | None = None,
        normalize: Callable[[Any], Any] | None = None, default_factory: Callable[[], Any] | None = None,
        omit_default: bool = False):
    """A dataclass field with its help, range ``[min, max]`` (``min_open``/``max_open``: open ends),
    ``choices``, command-line ``flag`` (default ``--field-name``; ``cli=False``: none) and an optional
    ``normalize`` (e.g. canonical names) applied before the checks. ``omit_default``: a field added
    after runs were recorded; at its default it is left out of the canonical JSON, so the configs of
    those runs (which mean the default) keep their hash."""
    meta = dict(help=help, choices=tuple(choices) if choices is not None else None, min=min, max=max,
                min_open=min_open, max_open=max_open, flag=flag, cli=cli, metavar=metavar, normalize=normalize,
                omit_default=omit_default)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def base_type(annotation) -> tuple[type | None, bool]:
    """(the scalar type of a field: int, float, bool, str, dict or a dataclass; whether None is allowed)."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else None
    origin = typing.get_origin(annotation)
    if origin is not None:
        annotation = origin
    return annotation, optional


def field_type(cls: type, name: str) -> tuple[type | None, bool]:
    return base_type(_hints(cls)[name])


def _range_text(m: dict) -> str:
    lo, hi = m["min"], m["max"]
    if lo is not None and hi is not None:
        return f"in {'(' if m['min_open'] else '['}{lo:g}, {hi:g}{')' if m['max_open'] else ']'}"
    if lo is not None:
        return f"{'>' if m['min_open'] else '>='} {lo:g}"
    return f"{'<' if m['max_open'] else '<='} {hi:g}"


def check_value(name: str, value: Any, typ: type | None, optional: bool, m: dict) -> Any:
    """The value, converted (int -> float for float fields) and checked; ValueError naming ``name``."""
    if m.get("normalize") is not None and value is not None:
        value = m["normalize"](value)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be given (not None)")
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    elif typ is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if m.get("choices") is not None and value not in m["choices"]:
        raise ValueError(f"{name} must be one of {list(m['choices'])}, got {value!r}")
    lo, hi = m.get("min"), m.get("max")
    if typ in (int, float) and (lo is not None or hi is not None):
        bad = ((lo is not None and (value < lo or (m["min_open"] and value == lo)))
               or (hi is not None and (value > hi or (m["max_open"] and value == hi))))
        if bad:
            raise ValueError(f"{name} must be {_range_text(m)}, got {value!r}")
    return value


def check(obj: Any, prefix: str = "") -> None:
    """Validate (and normalise, in place) every field of a dataclass instance that has metadata."""
    cls = type(obj)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        typ, optional = field_type(cls, f.name)
        if dataclasses.is_dataclass(typ):
            continue
        v = check_value(prefix + f.name, getattr(obj, f.name), typ, optional, f.metadata)
        object.__setattr__(obj, f.name, v)  # frozen dataclasses too


def parse_value(text: str, typ: type | None, optional: bool, m: dict, name: str) -> Any:
    """A command-line string as a field's value, checked (ValueError with a one-line message)."""
    s = text.strip()
    if optional and s.lower() in ("none", "auto", "default"):
        return None
    if typ is int:
        try:
            v: Any = int(s)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    elif typ is float:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    elif typ is bool:
        low = s.lower()
        if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"expected true or false, got {text!r}")
        v = low in ("true", "1", "yes", "on")
    else:
        v = s
    return check_value(name, v, typ, optional, m)


__all__ = ["base_type", "check", "check_value", "field_type", "opt", "parse_value"]
