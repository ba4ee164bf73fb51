"""How the report writes numbers: percentages with intervals, plain numbers, p-values ("n/a" where
undefined)."""

from __future__ import annotations

import csv
import io
import math


def pct(mean: float, ci: float | None = None) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    s = f"{100 * mean:.2f}"
    if ci is not None:
        s += f" ± {100 * ci:.2f}" if math.isfinite(ci) else " ± n/a"
    return s


def num(x: float, fmt: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def p_value(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else
                        (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.items()})
    return buf.getvalue()


def describe(c: dict) -> list[str]:
    """The experiment's data, model and training, from a run's config."""
    d, m, t = c["data"], c["model"], c["training"]
    subset = f", first {d['train_subset']} training images" if d.get("train_subset") else ""
    return [f"- dataset **{d['name']}** (validation split {d['val_size'] if d['val_size'] is not None else 'default'}, "
            f"split seed {d['split_seed']}{subset}); model **{m['name']}** (dropout {m['dropout']:g})",
            f"- training: {t['epochs']} epochs, batch {t['batch_size']}, SGD lr {t['lr']:g} (momentum "
            f"{t['momentum']:g}, Nesterov {t['nesterov']}), weight decay {t['weight_decay']:g}, {t['schedule']} "
            f"schedule, label smoothing {t['label_smoothing']:g}, {'masked' if t['masked'] else 'pruned'} network"]


def comparison_table(rows: list[dict], what: str, name: dict[str, str]) -> list[str]:
    out = [f"Δ = {what} (accuracy in points, loss in nats), with its 95% interval; p raw / Holm.", "",
           "| η | series | pairs | Δ val loss@init | p | Δ val acc@init | p | Δ test acc | p | p Holm |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['sparsity']:g} | {name[r['series']]} | {r['n_test_acc']} | "
                   f"{r['diff_init_val_loss']:+.4f} ± {num(r['ci_init_val_loss'], '.4f')} | "
                   f"{p_value(r['p_init_val_loss'])} | "
                   f"{pct(r['diff_init_val_acc'], r['ci_init_val_acc'])} | {p_value(r['p_init_val_acc'])} | "
                   f"{pct(r['diff_test_acc'], r['ci_test_acc'])} | {p_value(r['p_test_acc'])} | "
                   f"{p_value(r['p_holm_test_acc'])} |")
    for r in rows:
        if r.get("init_control") and r["init_control"] != r["control"]:
            out.append(f"\n{name[r['series']]} at η={r['sparsity']:g}: before training against "
                       f"{name.get(r['init_control'], r['init_control'])} (scored on the same parent), after training "
                       f"against {name.get(r['control'], r['control'])} (trained from the same weights).")
    return out


__all__ = ["comparison_table", "describe", "num", "p_value", "pct", "to_csv"]
