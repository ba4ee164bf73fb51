"""Pipeline benchmark: one whole Weedout run, wall time and FLOPs per phase, and the search's share.

Phases: ``search`` (``fastweedout.random_search`` on the validation split: P members x G generations
scored on a fresh batch each), ``training`` (``fastweedout.training.loop.train`` of the winner's pruned
network, SGD) and ``evaluation`` (the test set after every epoch, inside ``train``). Each phase's
wall time is what the library itself measures (``SearchResult.wall_time_s``, ``TrainResult.phases``);
FLOPs are analytic (``fastweedout.cost.flops``; 2 FLOPs per multiply-add): the search's useful (live
sub-networks) and executed (what the engine ran) FLOPs, training's forward + backward FLOPs of the
network trained, evaluation's forward FLOPs. One row per phase plus a ``total`` row; the ``share``
columns are the phase's fraction of the run's total wall time and FLOPs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

import fastweedout as fw
from fastweedout.data.datasets import DatasetError, SyntheticConfig, load_dataset
from fastweedout.data.loader import DeviceLoader
from fastweedout.training.loop import TrainConfig, train

from .common import Env, Record, append_jsonl, device_peak, fmt_num, fmt_s, load_average, precision, progress, run_id

PHASES = ("search", "training", "evaluation")


@dataclass
class PipelineConfig:
    model: str = "wrn_16_2"
    dataset: str = "fashion-mnist"  # falls back to synthetic when the files are not found
    train_size: int = 2000  # subset of the training split
    test_size: int = 500
    val_size: int = 500
    eta: float = 0.8
    population: int = 100
    generations: int = 5
    search_batch: int = 256
    engine: str = "auto"
    epochs: int = 1
    batch_size: int = 128
    compile: bool | None = None  # None: on CUDA only (TrainConfig's default)
    amp: bool | None = None
    seed: int = 0
    preset: str = "custom"


@dataclass
class PipelineRecord(Record):
    model: str = ""
    dataset: str = ""
    train_size: int = 0
    test_size: int = 0
    image_size: int = 0
    eta: float = 0.0
    population: int = 0
    generations: int = 0
    search_batch: int = 0
    engine: str = ""  # the search engine actually used
    epochs: int = 0
    batch_size: int = 0
    compiled: bool = False
    amp: bool = False
    phase: str = ""  # search | training | evaluation | total
    wall_s: float = 0.0
    flops: float = 0.0  # useful FLOPs (search: live sub-networks; training/evaluation: network run)
    executed_flops: float = 0.0  # what ran (search: the engine's executed FLOPs)
    images: int = 0  # images processed (search: members x images)
    share_wall: float | None = None  # of the run's total wall time
    share_flops: float | None = None  # of the run's total (executed) FLOPs
    flops_per_s: float | None = None  # executed FLOPs / wall
    fraction_of_peak: float | None = None
    test_acc: float | None = None
    winner_fitness: float | None = None


def _subset(split, n: int, seed: int):
    n = min(n, len(split))
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return split.subset(idx)


def load_data(cfg: PipelineConfig):
    """The configured dataset (subsets of it), else Fashion-MNIST, else the synthetic set (noted)."""
    tried, ds = [], None
    for name in dict.fromkeys([cfg.dataset, "fashion-mnist"]):
        if name == "synthetic":
            break
        try:
            ds = load_dataset(name, val_size=cfg.val_size, seed=cfg.seed)
            break
        except (DatasetError, FileNotFoundError) as e:
            tried.append(f"{name}: {str(e)[:100]}")
    if ds is None:
        ds = load_dataset("synthetic", synthetic=SyntheticConfig(train_size=cfg.train_size + cfg.val_size,
                                                                 test_size=cfg.test_size, image_size=28,
                                                                 val_size=cfg.val_size, seed=cfg.seed))
    note = f"{cfg.dataset} not found, {ds.name} used ({'; '.join(tried)})" if tried else ""
    ds = dataclasses.replace(ds, train=_subset(ds.train, cfg.train_size, cfg.seed),
                             test=_subset(ds.test, cfg.test_size, cfg.seed + 1))
    return ds, note


def run_pipeline(cfg: PipelineConfig, device: torch.device, out_path, *, quiet: bool = False) -> list[PipelineRecord]:
    ds, note = load_data(cfg)
    ds = ds.to(device)
    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, compile=cfg.compile, amp=cfg.amp)
    opts = tc.resolved(device)
    peak = device_peak(device, torch.bfloat16 if opts["amp"] else torch.float32)
    env = Env.capture(device, peak)
    load0 = load_average()
    progress(f"[pipeline] {cfg.model} on {ds.name} ({len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test, "
             f"{ds.in_channels}x{ds.image_size}x{ds.image_size}) eta={cfg.eta} P={cfg.population} "
             f"G={cfg.generations} epochs={cfg.epochs} device={env.device} load={load0}", quiet)
    model = fw.create_model(cfg.model, num_classes=ds.num_classes, in_channels=ds.in_channels).to(device)
    val = DeviceLoader(ds.val, len(ds.val), mean=ds.mean, std=ds.std)
    xv, yv = next(iter(val))
    t0 = time.perf_counter()
    sc = fw.SearchConfig(population=cfg.population, generations=cfg.generations,
                         batch_size=min(cfg.search_batch, len(ds.val)), engine=cfg.engine)
    sr = fw.random_search(model, xv, yv, sc, sparsity=cfg.eta, seed=cfg.seed)
    search_total = time.perf_counter() - t0
    progress(f"  search: {fmt_s(sr.wall_time_s)} ({sr.engine}, chunk {sr.chunk_size}), "
             f"{fmt_num(sr.flops_executed, 'FLOP')} executed", quiet)
    tr = train(model, sr.winner.member(0), ds, tc, seed=cfg.seed, device=device, progress=False)
    progress(f"  training: {fmt_s(tr.phases['training'].wall_s)}, evaluation: {fmt_s(tr.phases['evaluation'].wall_s)}, "
             f"test acc {tr.final.test_acc:.3f}", quiet)
    load1 = load_average()
    rid = run_id()
    phases = {
        "search": dict(wall_s=sr.wall_time_s, flops=float(sr.flops_useful), executed_flops=float(sr.flops_executed),
                       images=cfg.population * cfg.generations * min(cfg.search_batch, len(ds.val))),
    }
    for k in ("training", "evaluation"):
        ph = tr.phases[k]
        phases[k] = dict(wall_s=ph.wall_s, flops=float(ph.flops), executed_flops=float(ph.flops), images=ph.images)
    total_wall = sum(p["wall_s"] for p in phases.values())
    total_flops = sum(p["executed_flops"] for p in phases.values())
    phases["total"] = dict(wall_s=total_wall, flops=sum(p["flops"] for p in phases.values()),
                           executed_flops=total_flops, images=0)
    common = dict(bench="pipeline", preset=cfg.preset, run_id=rid, env=vars(env), load_avg_before=load0,
                  load_avg_after=load1, note=note, model=cfg.model, dataset=ds.name, train_size=len(ds.train),
                  test_size=len(ds.test), image_size=ds.image_size, eta=cfg.eta, population=cfg.population,
                  generations=cfg.generations, search_batch=min(cfg.search_batch, len(ds.val)), engine=sr.engine,
                  epochs=cfg.epochs, batch_size=cfg.batch_size, compiled=opts["compile"], amp=opts["amp"],
                  precision=precision(torch.bfloat16 if opts["amp"] else torch.float32, device),
                  test_acc=tr.final.test_acc, winner_fitness=sr.best_fitness[-1])
    rows = []
    for name, p in phases.items():
        rows.append(PipelineRecord(
            **common, phase=name, wall_s=p["wall_s"], flops=p["flops"], executed_flops=p["executed_flops"],
            images=p["images"], share_wall=p["wall_s"] / total_wall if total_wall else None,
            share_flops=p["executed_flops"] / total_flops if total_flops else None,
            flops_per_s=p["executed_flops"] / p["wall_s"] if p["wall_s"] else None,
            fraction_of_peak=(p["executed_flops"] / p["wall_s"] / peak.flops_per_s) if p["wall_s"] else None))
    append_jsonl(out_path, rows)
    if not quiet:
        print(format_table(rows), flush=True)
        print(f"  (search wall incl. mask sampling and bookkeeping: {fmt_s(search_total)})", flush=True)
    return rows


def format_table(rows) -> str:
    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"{r0['model']} on {r0['dataset']} ({r0['train_size']} train, {r0['test_size']} test)  eta={r0['eta']}  "
             f"P={r0['population']} G={r0['generations']} search batch={r0['search_batch']} engine={r0['engine']}  "
             f"epochs={r0['epochs']}  test acc={r0['test_acc']:.3f}  load {r0['load_avg_before']} -> "
             f"{r0['load_avg_after']}",
             f"  {'phase':<11}{'wall':>10}{'share':>8}{'FLOPs':>12}{'executed':>12}{'share':>8}{'FLOP/s':>14}"
             f"{'%peak':>7}"]
    for r in rows:
        lines.append(f"  {r['phase']:<11}{fmt_s(r['wall_s']):>10}"
                     f"{(format(r['share_wall'], '.1%') if r.get('share_wall') is not None else '-'):>8}"
                     f"{fmt_num(r['flops'], 'FLOP'):>12}{fmt_num(r['executed_flops'], 'FLOP'):>12}"
                     f"{(format(r['share_flops'], '.1%') if r.get('share_flops') is not None else '-'):>8}"
                     f"{fmt_num(r.get('flops_per_s'), 'FLOP/s'):>14}"
                     f"{(format(100 * r['fraction_of_peak'], '.1f') if r.get('fraction_of_peak') else '-'):>7}")
    return "\n".join(lines)
