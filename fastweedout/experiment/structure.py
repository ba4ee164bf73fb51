"""Structure alone (Van Gelder et al. 2020, "Deconstructing the Structure of Sparse Neural Networks"):
what a chosen mask is worth without the weights it was chosen on, and without its choice of nodes.

- ``reinit`` (``RunConfig.reinit``, ``--reinit``): the chosen mask trains from freshly drawn He-normal
  weights instead of the run's initial (or step-K) ones. The fresh weights' seed is derived from the
  run's seed (``derive_seed(seed, "reinit")``), so runs of one seed share them (paired), and differ
  from the weights the mask was chosen on.
- ``shuffle`` (``RunConfig.shuffle``, ``--shuffle``): the chosen mask keeps its live count in every node
  set (weight tensor, for weight masks), but which nodes are live is drawn uniformly at random
  (seed ``derive_seed(seed, "shuffle")``). Under layerwise sparsity every mask has the same counts and
  a shuffled mask is distributed exactly as the random arm's; under global sparsity or a per-layer
  schedule it is the control that keeps a method's per-layer proportions and nothing else.

``shuffle`` is an option of the arms rather than an arm of its own: it transforms the mask of any
mask-choosing arm (``--arm synflow --mode global --shuffle`` is shuffled SynFlow), so it needs the
source arm and all its settings, which the arm's own config already holds, and it pairs by seed with
the unshuffled run of that arm.
"""

from __future__ import annotations

import torch

from fastweedout.masks import Masks

#: the purposes the callers derive this module's seeds for (``inputs.derive_seed(seed, purpose)``)
REINIT_PURPOSE, SHUFFLE_PURPOSE = "reinit", "shuffle"


def shuffle_mask(masks: Masks, seed: int) -> Masks:
    """Every member's live count per node set (or weight tensor) kept, their positions drawn at random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in masks.items():
        flat = m.reshape(m.shape[0], -1).cpu()
        new = torch.zeros_like(flat)
        for i in range(flat.shape[0]):
            live = int(flat[i].sum())
            new[i, torch.randperm(flat.shape[1], generator=g)[:live]] = True
        out[name] = new.reshape(m.shape).to(m.device)
    return type(masks)(out)


def apply_shuffle(cfg, masks: Masks, seed: int) -> tuple[Masks, dict]:
    """The mask a run trains: shuffled with ``seed`` (derived for :data:`SHUFFLE_PURPOSE`) when the config
    asks; with the record of what was done."""
    if not getattr(cfg, "shuffle", False):
        return masks, {}
    return shuffle_mask(masks, seed), dict(shuffled=True, shuffle_seed=seed)


def fresh_weights(cfg, model: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, dict]:
    """``model``'s architecture with weights freshly drawn with ``seed`` (derived for
    :data:`REINIT_PURPOSE`) when the config asks for ``reinit`` (else ``model`` itself); with the
    record of the seed."""
    if not getattr(cfg, "reinit", False):
        return model, {}
    s = seed
    fresh = cfg.model.build(num_classes=model.num_classes, in_channels=model.in_channels)
    fresh.reset_parameters(torch.Generator().manual_seed(s))
    return fresh.to(model.stem.weight.device), dict(reinit=True, reinit_seed=s)


def check(cfg) -> None:
    """The combinations that have no meaning (a ValueError naming why)."""
    a = cfg.arm
    if getattr(cfg, "reinit", False):
        if a in ("dense", "throughout"):
            raise ValueError(f"reinit trains a chosen mask from fresh weights: not for the {a} arm")
        if cfg.rewind:
            raise ValueError("reinit and rewind both choose the weights training starts from: pass one")
    if getattr(cfg, "shuffle", False) and a in ("dense", "random", "throughout"):
        raise ValueError(f"shuffle redraws a chosen mask's nodes within its per-set counts: not for the {a} arm "
                         "(a shuffled random mask is a random mask)")


__all__ = ["REINIT_PURPOSE", "SHUFFLE_PURPOSE", "apply_shuffle", "check", "fresh_weights", "shuffle_mask"]
