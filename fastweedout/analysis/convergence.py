"""How fast a run converges, from its per-epoch test accuracy (``results.jsonl``'s epoch records).

Per run: the epochs, SGD steps and training FLOPs until the test accuracy first reaches a target, for
two targets: 99% of the dense parent's final test accuracy (the dense run of the same experiment and
seed) and 99% of the run's own final; and the area under the test-accuracy curve, normalised by the
number of epochs (the mean of the per-epoch test accuracies: a curve that rises earlier has more
area). Test accuracy is measured once per epoch, so the time to a target is resolved to an epoch:
"reached at epoch e" means it was below the target at the end of epoch e-1 and at or above it at
the end of epoch e. Steps and FLOPs are those of e full epochs (every epoch trains the same number
of images, so each is the training phase's total divided by the epoch count). A run that never
reaches a target has no value for it (None), and the report counts how many did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastweedout.analysis.formatting import num, p_value, pct
from fastweedout.analysis.stats import mean_ci

#: the fraction of a reference accuracy a run must reach
TARGET_FRACTION = 0.99
#: per-run convergence metrics: name -> what it is (lower is faster, except the area: higher is better)
CONVERGENCE_METRICS = {
    "epochs_to_dense99": "epochs to 99% of the dense parent's final test accuracy",
    "steps_to_dense99": "SGD steps to 99% of the dense parent's final test accuracy",
    "tflops_to_dense99": "training TFLOP to 99% of the dense parent's final test accuracy",
    "epochs_to_own99": "epochs to 99% of the run's own final test accuracy",
    "steps_to_own99": "SGD steps to 99% of the run's own final test accuracy",
    "tflops_to_own99": "training TFLOP to 99% of the run's own final test accuracy",
    "test_acc_auc": "area under the test-accuracy curve / epochs (mean per-epoch test accuracy)",
}


def first_epoch_reaching(epochs: Sequence[dict], target: float) -> int | None:
    """The first epoch whose test accuracy is at least ``target`` (None when none is)."""
    for e in sorted(epochs, key=lambda r: r["epoch"]):
        acc = e.get("test_acc")
        if acc is not None and math.isfinite(acc) and acc >= target:
            return int(e["epoch"])
    return None


def curve_area(epochs: Sequence[dict]) -> float | None:
    """The mean of the per-epoch test accuracies (the area under the step curve over the epochs, divided
    by their number); None without epochs."""
    accs = [e["test_acc"] for e in epochs if e.get("test_acc") is not None and math.isfinite(e["test_acc"])]
    return sum(accs) / len(accs) if accs else None


def per_epoch_cost(training_phase: dict, epochs: int, batch_size: int) -> tuple[float | None, float | None]:
    """(SGD steps, training FLOPs) of one epoch, from the training phase record (its images and FLOPs over
    all ``epochs``); None where the record lacks them."""
    images, flops = training_phase.get("images"), training_phase.get("flops")
    steps = math.ceil(images / epochs / batch_size) if images and epochs and batch_size else None
    return steps, (float(flops) / epochs if flops and epochs else None)


def convergence(epochs: Sequence[dict], training_phase: dict, batch_size: int, final_test_acc: float | None,
                dense_final_test_acc: float | None, fraction: float = TARGET_FRACTION) -> dict:
    """Every metric of :data:`CONVERGENCE_METRICS` for one run (None where undefined or not reached)."""
    n = len(epochs)
    steps, flops = per_epoch_cost(training_phase, max((e["epoch"] for e in epochs), default=0), batch_size)
    out: dict = {"test_acc_auc": curve_area(epochs), "has_dense_parent": dense_final_test_acc is not None}
    for name, ref in (("dense99", dense_final_test_acc), ("own99", final_test_acc)):
        e = first_epoch_reaching(epochs, fraction * ref) if n and ref is not None else None
        out[f"epochs_to_{name}"] = e
        out[f"steps_to_{name}"] = e * steps if e is not None and steps is not None else None
        out[f"tflops_to_{name}"] = e * flops / 1e12 if e is not None and flops is not None else None
    return out


def _conv_cell(c, m: str, fmt: str) -> str:
    vals = c.values(m)
    reached = [v for v in vals if v is not None]
    if m.endswith("dense99") and not any(r.convergence.get("has_dense_parent") for r in c.runs):
        return "no dense parent"  # no dense run of the same experiment and seed: undefined, not missed
    if not reached:
        return f"not reached (0/{len(vals)})"
    mean, ci = mean_ci(reached)
    return f"{num(mean, fmt)} ± {num(ci, fmt)}" + (f" ({len(reached)}/{len(vals)})" if len(reached) < len(vals)
                                                     else "")


def convergence_tables(mine: list, comps: list[dict], name: dict[str, str]) -> list[str]:
    """The convergence metrics per condition, and each series minus its random control."""
    out = ["### Convergence (from the per-epoch test accuracy)", "",
           "Epochs / SGD steps / training TFLOP until the test accuracy first reaches 99% of the dense parent's final "
           "(same seed) and 99% of the run's own final, resolved to an epoch (test accuracy is measured once per "
           "epoch); AUC: the mean per-epoch test accuracy (area under the curve / epochs). Mean ± 95% interval over "
           "the runs that reached the target, (k/n) when not all did.", "",
           "| η | series | n | epochs → 99% dense | steps → 99% dense | TFLOP → 99% dense | epochs → 99% own | "
           "steps → 99% own | AUC test acc |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in mine:
        out.append(f"| {c.sparsity:g} | {name[c.series]} | {len(c.runs)} | "
                   f"{_conv_cell(c, 'epochs_to_dense99', '.2f')} | "
                   f"{_conv_cell(c, 'steps_to_dense99', '.0f')} | {_conv_cell(c, 'tflops_to_dense99', '.3g')} | "
                   f"{_conv_cell(c, 'epochs_to_own99', '.2f')} | {_conv_cell(c, 'steps_to_own99', '.0f')} | "
                   f"{pct(*c.stat('test_acc_auc'))} |")
    if comps:
        out += ["", "Paired by seed, method − random (pairs where both reached the target); p raw / Holm over all "
                "comparisons of that metric.", "",
                "| η | series | pairs (dense 99%) | Δ epochs → 99% dense | p / Holm | pairs (own 99%) | "
                "Δ epochs → 99% own | p / Holm | Δ AUC (points) | p / Holm |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in comps:
            cells = []
            for m in ("epochs_to_dense99", "epochs_to_own99"):
                cells += [str(r[f"n_{m}"]), f"{num(r[f'diff_{m}'], '+.2f')} ± {num(r[f'ci_{m}'], '.2f')}",
                          f"{p_value(r[f'p_{m}'])} / {p_value(r[f'p_holm_{m}'])}"]
            m = "test_acc_auc"
            cells += [pct(r[f"diff_{m}"], r[f"ci_{m}"]), f"{p_value(r[f'p_{m}'])} / {p_value(r[f'p_holm_{m}'])}"]
            out.append(f"| {r['sparsity']:g} | {name[r['series']]} | " + " | ".join(cells) + " |")
    return out


__all__ = ["CONVERGENCE_METRICS", "TARGET_FRACTION", "convergence", "convergence_tables", "curve_area",
           "first_epoch_reaching", "per_epoch_cost"]
