"""Every mask space by name (the config's ``granularity``)."""

from __future__ import annotations

from fastweedout.spaces.node import NodeSpace
from fastweedout.spaces.space import MaskSpace
from fastweedout.spaces.weight import WeightSpace

SPACES: dict[str, MaskSpace] = {s.name: s for s in (NodeSpace(), WeightSpace())}


def get_space(name: str) -> MaskSpace:
    if name not in SPACES:
        raise ValueError(f"granularity must be one of {tuple(SPACES)}, got {name!r}")
    return SPACES[name]


__all__ = ["SPACES", "get_space"]
