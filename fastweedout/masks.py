"""Node masks of a population: sampling (layerwise, global, per-layer schedules), selection, I/O."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fastweedout.atomic import atomic_torch_save

Sparsity = float | Mapping[str, float] | Sequence[float]
MODES = ("layerwise", "global")


class Masks:
    """A population's node masks: node-set name -> bool ``[P, C]``, in the model's node-set order."""

    def __init__(self, masks: Mapping[str, Tensor]):
        if not masks:
            raise ValueError("Masks needs at least one node set")
        pops = set()
        for name, m in masks.items():
            if not isinstance(m, Tensor) or m.dtype != torch.bool or m.dim() != 2:
                raise ValueError(f"mask {name!r} must be a bool tensor [P, C], got "
                                 f"{(m.dtype, tuple(m.shape)) if isinstance(m, Tensor) else type(m).__name__}")
            pops.add(m.shape[0])
        if len(pops) != 1:
            raise ValueError(f"all node sets must hold the same population, got sizes {sorted(pops)}")
        self.population = pops.pop()
        if self.population < 1:
            raise ValueError("empty population: masks hold zero members")
        self._m = OrderedDict((k, v) for k, v in masks.items())

    # mapping-like access
    def __getitem__(self, name: str) -> Tensor:
        return self._m[name]

    def __iter__(self):
        return iter(self._m)

    def __len__(self) -> int:
        return self.population

    def keys(self):
        return self._m.keys()

    def items(self):
        return self._m.items()

    def __repr__(self) -> str:
        return f"Masks(population={self.population}, node_sets={len(self._m)}, sparsity={self.sparsity():.3f})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, Masks) and list(self._m) == list(other._m)
                and all(torch.equal(self._m[k].cpu(), other._m[k].cpu()) for k in self._m))

    @property
    def widths(self) -> OrderedDict[str, int]:
        return OrderedDict((k, v.shape[1]) for k, v in self._m.items())

    def member(self, i: int) -> dict[str, Tensor]:
        """One member as the mapping ``model(x, masks)`` takes: name -> bool ``[C]``."""
        if not -self.population <= i < self.population:
            raise IndexError(f"member {i} out of range for a population of {self.population}")
        return {k: v[i] for k, v in self._m.items()}

    def select(self, index: int | Sequence[int] | Tensor) -> Masks:
        if isinstance(index, int):
            index = [index]
        index = torch.as_tensor(index, dtype=torch.long)
        return Masks({k: v.index_select(0, index.to(v.device)) for k, v in self._m.items()})

    @staticmethod
    def cat(parts: Iterable[Masks]) -> Masks:
        parts = list(parts)
        names = list(parts[0].keys())
        for p in parts[1:]:
            if list(p.keys()) != names:
                raise ValueError("cannot concatenate masks of different node sets")
        return Masks({k: torch.cat([p[k].cpu() for p in parts]) for k in names})

    @staticmethod
    def from_member(member: Mapping[str, Tensor]) -> Masks:
        return Masks({k: v.reshape(1, -1).bool() for k, v in member.items()})

    def to(self, device) -> Masks:
        return Masks({k: v.to(device) for k, v in self._m.items()})

    def live_counts(self) -> OrderedDict[str, Tensor]:
        """Live nodes per member and node set: name -> long ``[P]``."""
        return OrderedDict((k, v.sum(1)) for k, v in self._m.items())

    def is_uniform(self) -> bool:
        """True when every member has the same live count in every node set (layerwise sparsity)."""
        return all(bool((c == c[0]).all()) for c in self.live_counts().values())

    def sparsity(self) -> float:
        """Fraction of nodes switched off, over all node sets and members."""
        total = sum(v.numel() for v in self._m.values())
        off = sum(int((~v).sum()) for v in self._m.values())
        return off / total

    def check(self, node_layers: Mapping[str, int]) -> None:
        """Raise ValueError unless these masks fit a model with ``node_layers``."""
        check_mask_names(node_layers, self._m)
        for name, c in node_layers.items():
            m = self._m[name]
            if m.shape[1] != c:
                raise ValueError(f"mask {name!r} has {m.shape[1]} nodes per member, the model has {c}")
            dead = (~m.any(dim=1)).nonzero().flatten()
            if dead.numel():
                raise ValueError(f"mask {name!r} switches off every node of member(s) {dead.tolist()[:8]}; "
                                 "at least one must stay live")

    # ------------------------------------------------------------------------------------- I/O
    def state_dict(self) -> dict:
        return {"format": "fastweedout.masks/1", "masks": {k: v.cpu() for k, v in self._m.items()}}

    def save(self, path: str | os.PathLike, **meta) -> None:
        """Write atomically (temporary file + rename); ``meta`` is stored alongside (e.g. model config)."""
        atomic_torch_save({**self.state_dict(), "meta": meta}, os.fspath(path))  # fsynced; no temporary left on errors

    @staticmethod
    def load(path: str | os.PathLike, node_layers: Mapping[str, int] | None = None) -> Masks:
        try:
            obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated or foreign file
            raise ValueError(f"{path}: not a readable fastweedout mask file ({e})") from e
        if not isinstance(obj, dict) or obj.get("format") != "fastweedout.masks/1":
            raise ValueError(f"{path}: not a fastweedout mask file")
        masks = Masks(obj["masks"])
        masks.meta = obj.get("meta", {})
        if node_layers is not None:
            masks.check(node_layers)
        return masks


def check_mask_names(node_layers: Mapping[str, int], masks: Mapping[str, object]) -> None:
    """Raise ValueError naming unknown or missing node sets."""
    unknown = [k for k in masks if k not in node_layers]
    missing = [k for k in node_layers if k not in masks]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown node sets {unknown}")
        if missing:
            parts.append(f"missing node sets {missing}")
        raise ValueError("masks do not fit the model: " + "; ".join(parts)
                         + f" (the model's node sets are {list(node_layers)})")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def layer_sparsities(node_layers: Mapping[str, int], sparsity: Sparsity) -> OrderedDict[str, float]:
    """Per-node-set sparsity from a float, a mapping (missing names get 0) or a sequence in order."""
    names = list(node_layers)
    if isinstance(sparsity, Mapping):
        unknown = [k for k in sparsity if k not in node_layers]
        if unknown:
            raise ValueError(f"sparsity schedule names unknown node sets {unknown}; the model has {names}")
        out = OrderedDict((k, float(sparsity.get(k, 0.0))) for k in names)
    elif isinstance(sparsity, (list, tuple)):
        if len(sparsity) != len(names):
            raise ValueError(f"a sparsity sequence needs one value per node set ({len(names)}), got {len(sparsity)}")
        out = OrderedDict(zip(names, map(float, sparsity)))
    else:
        try:
            s = float(sparsity)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity must be a number, a mapping or a sequence, got {sparsity!r}") from None
        out = OrderedDict((k, s) for k in names)
    for k, s in out.items():
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"sparsity must be in [0, 1), got {s} for node set {k!r}")
    return out


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    g.manual_seed(0 if generator is None else int(generator))
    return g


def sample_masks(model_or_layers, population: int, sparsity: Sparsity, mode: str = "layerwise",
                 generator: torch.Generator | int | None = None) -> Masks:
    """Random node masks for ``population`` members.

    ``layerwise`` (the paper): exactly round(eta*C) nodes off in every node set (schedules allowed).
    ``global``: round(eta*N) of all N nodes off, any split across node sets.
    Never fewer than one live node per node set. ``generator``: a CPU ``torch.Generator`` or a seed.
    """
    node_layers = model_or_layers.node_layers() if hasattr(model_or_layers, "node_layers") else model_or_layers
    node_layers = OrderedDict(node_layers)
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise ValueError(f"population must be a positive integer, got {population!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    g = as_generator(generator)
    P = population
    if mode == "layerwise":
        out = OrderedDict()
        for name, s in layer_sparsities(node_layers, sparsity).items():
            c = node_layers[name]
            off = min(round_half_up(s * c), c - 1)
            order = torch.rand(P, c, generator=g).argsort(dim=1)
            m = torch.ones(P, c, dtype=torch.bool)
            m.scatter_(1, order[:, :off], False)
            out[name] = m
        return Masks(out)
    # global
    if isinstance(sparsity, (Mapping, list, tuple)):
        raise ValueError("global sparsity takes one number (the fraction of all nodes switched off)")
    s = layer_sparsities(node_layers, sparsity)[next(iter(node_layers))]
    sizes = list(node_layers.values())
    total = sum(sizes)
    off = min(round_half_up(s * total), total - len(sizes))
    # One guaranteed live node per node set, then `off` nodes switched off uniformly among the rest.
    keys = torch.rand(P, total, generator=g)
    start = 0
    for c in sizes:
        seg = keys[:, start:start + c]
        keep = seg.argmax(dim=1, keepdim=True)
        seg.scatter_(1, keep, 2.0)  # never among the `off` smallest
        start += c
    order = keys.argsort(dim=1)
    flat = torch.ones(P, total, dtype=torch.bool)
    flat.scatter_(1, order[:, :off], False)
    out = OrderedDict()
    start = 0
    for name, c in node_layers.items():
        out[name] = flat[:, start:start + c].clone()
        start += c
    return Masks(out)
