"""What does the search's fitness reward at initialisation? A probe for results/fashion-mnist/README.md.

For each seed's initial WRN-10-1 (the grid's weights) and each sparsity, score random node masks the
way the search does (BN on batch statistics, 500-image batches) on the 2,000 held-out validation
images, and report Spearman correlations of the fitness (-loss) with the members' accuracy, with the
size of their logits and with how concentrated their predictions are on one class. Writes
``what_fitness_rewards.json`` beside this file (atomically).

    PYTHONPATH=. python results/fashion-mnist/what_fitness_rewards.py [--members 100 --seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from scipy import stats as sps

from fastweedout.experiment import runs
from fastweedout.config import DataConfig, ModelConfig, make_run_config
from fastweedout.masks import sample_masks
from fastweedout.engines.scoring import auto_engine, population_logits
from fastweedout.experiment.stages import INIT_EVAL_BATCH, build_model
from fastweedout.experiment.inputs import derive_seed, load_data, validation_parts

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def member_stats(model, masks, images, labels, chunk: int = 10) -> dict[str, torch.Tensor]:
    """Per member: loss, accuracy, mean logit standard deviation over classes, and the share of the
    images given the member's most-predicted class (1.0: every image gets the same answer)."""
    out = {k: [] for k in ("loss", "acc", "logit_std", "top_class_share")}
    for lo in range(0, masks.population, chunk):
        part = masks.select(list(range(lo, min(lo + chunk, masks.population))))
        engine = auto_engine(part, images.device)
        logits = torch.cat([population_logits(model, part, images[s:s + INIT_EVAL_BATCH], engine, "batch").float()
                            for s in range(0, len(labels), INIT_EVAL_BATCH)], dim=1)  # [p, n, classes]
        y = labels.expand(logits.shape[0], -1)
        out["loss"].append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1))
        pred = logits.argmax(-1)
        out["acc"].append((pred == y).float().mean(1))
        out["logit_std"].append(logits.std(-1).mean(1))
        share = torch.stack([torch.bincount(p, minlength=logits.shape[-1]).max() for p in pred]).float()
        out["top_class_share"].append(share / pred.shape[1])
    return {k: torch.cat(v) for k, v in out.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sparsities", default="0.2,0.4,0.6,0.8")
    ap.add_argument("--out", default=os.path.join(HERE, "what_fitness_rewards.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = load_data(DataConfig("fashion-mnist"))
    (x, y), _ = validation_parts(data)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for eta in map(float, args.sparsities.split(",")):
            cfg = make_run_config("random", eta, data=DataConfig("fashion-mnist"), model=ModelConfig("wrn_10_1"),
                                  seed=seed)
            model = build_model(cfg, data).eval()
            masks = sample_masks(model, args.members, eta, generator=derive_seed(seed, "probe"))
            s = member_stats(model, masks, x, y)
            fit = -s["loss"]
            row = dict(seed=seed, sparsity=eta, members=args.members, images=len(y),
                       fitness_best=float(fit.max()), fitness_median=float(fit.median()),
                       loss_of_uniform=math.log(data.num_classes),
                       acc_best_fitness_member=float(s["acc"][fit.argmax()]), acc_median=float(s["acc"].median()),
                       acc_max=float(s["acc"].max()))
            for k in ("acc", "logit_std", "top_class_share"):
                row[f"spearman_fitness_{k}"] = float(sps.spearmanr(fit.numpy(), s[k].numpy()).statistic)
            rows.append(row)
            print(json.dumps(row))
    summary = {}
    for eta in sorted({r["sparsity"] for r in rows}):
        mine = [r for r in rows if r["sparsity"] == eta]
        summary[f"{eta:g}"] = {k: sum(r[k] for r in mine) / len(mine) for k in mine[0]
                               if k.startswith(("spearman", "fitness", "acc"))}
    result = dict(rows=rows, mean_over_seeds=summary)
    runs.atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
