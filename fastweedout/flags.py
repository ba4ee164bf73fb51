"""Command-line flags generated from the config dataclasses (``fastweedout.config``): each field's
flag, type, default, choices, range and help come from its one declaration.

A flag's ``dest`` is the field's path (``"sparsity"``, ``"search.population"``, ``"training.epochs"``,
``"runtime.device"``). With ``lists=True`` (the ``experiment`` command) every non-boolean flag takes
a comma-separated list (integers also as ranges, ``0-4``), each item checked like a single value:
the grid's axes.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from fastweedout.fields import field_type, parse_value

#: plural spellings accepted for the grid's usual axes
ALIASES = {"sparsity": "--sparsities", "arm": "--arms", "seed": "--seeds", "search.population": "--populations",
           "model.name": "--models", "data.name": "--datasets"}
#: other names of a flag, on every subcommand (the research issue's wording)
SYNONYMS = {"pretrain_steps": "--search-after-steps"}
MAX_RANGE = 10_000


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _one(text: str, typ, optional: bool, meta: Mapping, name: str):
    try:
        return parse_value(text, typ, optional, meta, name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _scalar(typ, optional: bool, meta: Mapping, name: str):
    def parse(text: str):
        return _one(text, typ, optional, meta, name)
    parse.__name__ = getattr(typ, "__name__", "value")
    return parse


def _listed(typ, optional: bool, meta: Mapping, name: str):
    def parse(text: str) -> list:
        items = text.split(",")
        if any(not i.strip() for i in items):
            raise argparse.ArgumentTypeError(f"empty item in the list {text!r}")
        out: list = []
        for item in items:
            a, sep, b = item.strip().partition("-")
            if typ is int and sep and a and b:  # an inclusive range, e.g. seeds 0-4
                lo, hi = _one(a, typ, optional, meta, name), _one(b, typ, optional, meta, name)
                if hi < lo or hi - lo >= MAX_RANGE:
                    raise argparse.ArgumentTypeError(f"bad range {item.strip()!r}")
                out += range(lo, hi + 1)
            else:
                out.append(_one(item, typ, optional, meta, name))
        return list(dict.fromkeys(out))
    parse.__name__ = f"list of {getattr(typ, '__name__', 'value')}"
    return parse


def add_fields(parser: argparse.ArgumentParser, cls, path: str = "", *, title: str | None = None,
               lists: bool = False, defaults: Mapping[str, Any] | None = None,
               only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> None:
    """One flag per field of ``cls`` (those with ``cli`` metadata), dest ``path + name``, in a group."""
    group = parser.add_argument_group(title or (cls.__doc__ or cls.__name__).strip().splitlines()[0])
    defaults = dict(defaults or {})
    only = None if only is None else set(only)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", False) or f.name in skip or (only is not None and f.name not in only):
            continue
        dest = path + f.name
        typ, optional = field_type(cls, f.name)
        default = defaults.get(dest, f.default)
        help_ = meta["help"]
        names = [flag_name(f)] + ([ALIASES[dest]] if lists and dest in ALIASES else [])
        names += [SYNONYMS[dest]] if dest in SYNONYMS else []
        if typ is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=help_ + (" (default: auto)" if default is None else f" (default: {default})"))
            continue
        kind = _listed if lists else _scalar
        if lists and not isinstance(default, list):
            default = [default]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        listed = meta.get("choices") and any(str(c) in help_ for c in meta["choices"])
        choices = f"; one of {', '.join(map(str, meta['choices']))}" if meta.get("choices") and not listed else ""
        tail = "" if shown is None or shown == [None] else f" (default: {shown})"
        group.add_argument(*names, dest=dest, type=kind(typ, optional, meta, f.name), default=default,
                           metavar=meta.get("metavar") or f.name.upper(),
                           help=f"{help_}{choices}{tail}" + (" [a comma list: a grid axis]" if lists else ""))


def values(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The parsed field values whose dest starts with ``prefix`` (without it)."""
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and k != prefix}


def runtime_of(args: argparse.Namespace):
    from fastweedout.config import Runtime

    return Runtime(**values(args, "runtime."))


__all__ = ["ALIASES", "SYNONYMS", "add_fields", "flag_name", "runtime_of", "values"]
