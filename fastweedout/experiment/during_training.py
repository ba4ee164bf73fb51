"""Weedout throughout training (the paper's future work): the population evolves while the weights train.

The full network trains under masks drawn from the population, dropout-like: every
``mask_every`` steps the next member masks the network (members in turn). Every ``interval`` steps
the population is scored on a fresh validation batch with the *current* weights (the search's BN
mode and metric), the fittest member is kept and the rest refilled by the search strategy. When
training ends a last scoring picks the winner, the network is pruned to it and, with
``finetune_epochs``, the pruned network trains on. The population's fitness over training is
recorded (records of type ``population``), and the scoring's FLOPs and wall time are the run's
``search`` phase; training runs the full network (executed FLOPs are the dense ones). Without
fine-tuning, the pruned winner's BN running statistics are recomputed on :data:`RECALIBRATION_IMAGES`
training images before it is tested: those gathered while the masks kept changing describe no single
sub-network (the "BN recalibration" of slimmable and once-for-all networks).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from fastweedout.config import RunConfig, Runtime
from fastweedout.data.datasets import Dataset
from fastweedout.data.loader import DeviceLoader
from fastweedout.engines.scoring import score_population
from fastweedout.experiment import runs
from fastweedout.experiment.inputs import derive_seed, validation_parts
from fastweedout.experiment.runs import RunDir
from fastweedout.experiment.stages import RunOutcome, evaluate_mask, train_run
from fastweedout.masks import Masks, sample_masks
from fastweedout.model.wrn import WideResNet
from fastweedout.search.strategies import next_generation
from fastweedout.training.callbacks import TrainCallbacks
from fastweedout.training.loop import evaluate, train

RECALIBRATION_IMAGES = 2048


@torch.no_grad()
def recalibrate_bn(net: WideResNet, data: Dataset, batch_size: int, images: int = RECALIBRATION_IMAGES,
                   seed: int = 0) -> int:
    """Replace every BN layer's running statistics by their average over the batches of the first
    ``images`` training images (no augmentation); returns how many images were seen."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = net.training
    net.train()
    seen = 0
    try:
        for x, _ in DeviceLoader(data.train, min(batch_size, images), mean=data.mean, std=data.std, shuffle=True,
                                 drop_last=True, seed=seed):
            net(x)
            seen += x.shape[0]
            if seen >= images:
                break
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        net.train(was_training)
    return seen


class PopulationDuringTraining(TrainCallbacks):
    """The evolving population as training callbacks (its state is saved in every checkpoint)."""

    def __init__(self, cfg: RunConfig, model: WideResNet, images: torch.Tensor, labels: torch.Tensor, seed: int):
        self.cfg, self.s, self.t = cfg, cfg.search, cfg.throughout
        self.model, self.images, self.labels = model, images, labels
        self.layers = model.node_layers()
        self.batch = min(len(labels), self.s.batch_size or 1000)
        self.mask_gen = torch.Generator().manual_seed(seed)
        self.data_gen = torch.Generator().manual_seed(seed + 0x5EED)
        self.pop = self._fresh(self.s.population)
        self.last_fitness: torch.Tensor | None = None
        self.history: list[dict] = []
        self.wall = 0.0
        self.flops = {"useful": 0, "executed": 0}

    def _fresh(self, k: int) -> Masks:
        return sample_masks(self.layers, k, self.cfg.sparsity, self.cfg.mode, self.mask_gen)

    def score(self, net: WideResNet, step: int) -> int:
        """Score the population with the current weights; returns the fittest member's index."""
        t0 = time.perf_counter()
        idx = torch.randperm(len(self.labels), generator=self.data_gen)[:self.batch].to(self.labels.device)
        fit, info = score_population(net, self.pop, self.images[idx], self.labels[idx], engine=self.s.engine,
                                     metric=self.s.metric, bn=self.s.bn, distributed=False, return_info=True)
        best = int(torch.argmax(fit))
        fl = info["flops"]  # of the engine that ran, at the widths it ran
        self.flops = {k: self.flops[k] + fl[k] for k in self.flops}
        finite = fit[torch.isfinite(fit)]
        self.history.append(dict(type="population", step=step, best_fitness=float(fit[best]),
                                 mean_fitness=float(finite.mean()) if finite.numel() else None, elite_index=best))
        self.last_fitness = fit
        self.wall += time.perf_counter() - t0
        return best

    def before_step(self, step: int, net) -> None:
        if step > 0 and step % self.t.interval == 0:
            best = self.score(net.net, step)
            new = next_generation(self.s.strategy, self.pop, self.last_fitness, self.s.population - 1, self._fresh,
                                  self.s.mutation_rate, self.mask_gen)
            elite = self.pop.select(best)
            self.pop = elite if new is None else Masks.cat([elite, new])
        if step % self.t.mask_every == 0:
            net.set_masks(self.pop.member((step // self.t.mask_every) % self.pop.population))

    def state_dict(self) -> dict:
        return dict(pop=dict(self.pop.items()), mask_gen=self.mask_gen.get_state(), data_gen=self.data_gen.get_state(),
                    history=self.history, wall=self.wall, flops=self.flops,
                    last_fitness=self.last_fitness)

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.pop = Masks(state["pop"])
        self.mask_gen.set_state(state["mask_gen"])
        self.data_gen.set_state(state["data_gen"])
        self.history, self.wall, self.flops = list(state["history"]), state["wall"], dict(state["flops"])
        self.last_fitness = state["last_fitness"]


def run_throughout(rd: RunDir, cfg: RunConfig, model: WideResNet, data: Dataset, runtime: Runtime,
                   env: dict) -> RunOutcome:
    """The throughout arm inside :func:`fastweedout.experiment.pipeline.execute_run` (holding the run's lock)."""
    (ex, ey), (sx, sy) = validation_parts(data)
    device = runtime.device
    cb = PopulationDuringTraining(cfg, model, sx, sy, derive_seed(cfg.seed, "mask"))
    full = dataclasses.replace(cfg.training, masked=True)
    everyone = sample_masks(model.node_layers(), 1, 0.0)
    res = train(model, everyone, data, full, seed=derive_seed(cfg.seed, "train"), device=device,
                checkpoint_dir=rd.train_dir, callbacks=cb, progress=runtime.progress,
                on_epoch=lambda r: rd.upsert(dict(type="epoch", **r.to_dict())))
    trained = res.model.net if hasattr(res.model, "net") else res.model
    trained = trained.to(device)
    best = cb.score(trained, res.steps)  # the winner on the final weights
    winner = cb.pop.select(best)
    init = evaluate_mask(trained, winner, ex, ey, cfg.search.bn)
    meta = dict(config_hash=runs.config_hash(cfg), arm=cfg.arm, seed=cfg.seed, model=cfg.model.name,
                dataset=cfg.data.name, node_layers=dict(model.node_layers()), init=init, granularity="node")
    winner.save(rd.mask_path, **meta)
    search = dict(type="phase", phase="search", wall_s=cb.wall, flops=cb.flops["useful"],
                  flops_executed=cb.flops["executed"], population=cfg.search.population,
                  scorings=len(cb.history))
    live = {k: int(v.sum()) for k, v in winner.items()}
    rd.upsert(search, *cb.history, dict(type="mask", arm=cfg.arm, granularity="node", sparsity=winner.sparsity(),
                                        live=live, **init),
              *[dict(type="epoch", **r.to_dict()) for r in res.records],
              *[dict(type="phase", phase=k, **v.to_dict()) for k, v in res.phases.items()])
    summary = dict(config_hash=runs.config_hash(cfg), name=rd.name, arm=cfg.arm, sparsity=cfg.sparsity, mode=cfg.mode,
                   granularity="node", seed=cfg.seed, dataset=cfg.data.name, model=cfg.model.name, environment=env,
                   search=None, selection={k: v for k, v in search.items() if k != "type"}, init=init,
                   mask_sparsity=winner.sparsity())
    if cfg.throughout.finetune_epochs:
        tune = dataclasses.replace(cfg.training, epochs=cfg.throughout.finetune_epochs)
        out = train_run(rd, cfg, trained, winner.member(0), data, runtime, training=tune, phase="finetune")
        final, params, live_params = out.final.to_dict(), out.params, out.live_params
    else:  # the pruned network as it comes out of training, its BN statistics recomputed
        pruned = trained.prune(winner.member(0))
        recal = recalibrate_bn(pruned, data, cfg.training.batch_size, seed=derive_seed(cfg.seed, "recalibrate"))
        pruned.eval()
        loader = DeviceLoader(data.test, cfg.training.eval_batch_size, mean=data.mean, std=data.std)
        test_loss, test_acc = evaluate(pruned, loader)
        last = res.final
        final = dict(epoch=last.epoch, train_loss=last.train_loss, train_acc=last.train_acc, test_loss=test_loss,
                     test_acc=test_acc)
        params = live_params = sum(p.numel() for p in pruned.parameters())
        rd.upsert(dict(type="final", phase="pruned", epochs=last.epoch, train_acc=last.train_acc,
                       test_acc=test_acc, train_loss=last.train_loss, test_loss=test_loss, params=params,
                       live_params=live_params, bn_recalibration_images=recal))
    summary.update(final=final, phases={k: v.to_dict() for k, v in res.phases.items()}, params=params,
                   live_params=live_params, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    rd.mark_done(summary)
    return RunOutcome(rd.path, cfg, summary, skipped=False)


__all__ = ["RECALIBRATION_IMAGES", "PopulationDuringTraining", "recalibrate_bn", "run_throughout"]
