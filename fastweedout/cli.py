"""The ``fastweedout`` command: search, train, run, experiment, report, demo, bench.

Exit codes: 0 success; 1 a run failed (e.g. its training diverged) or an internal error; 2 bad
input (unknown dataset/arm/model, values out of range, a mask that does not fit, a missing dataset,
an unusable results directory), reported as one line on stderr before anything is written;
130 interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
import traceback
import warnings
from typing import Sequence

from .runs import RunError

DEFAULT_RESULTS = "runs"
DEMO_RESULTS = os.path.join("runs", "demo")
PROG = "fastweedout"
DETERMINISTIC_HELP = ("deterministic GPU kernels: torch.use_deterministic_algorithms(True), cudnn.deterministic, "
                      "no cudnn.benchmark, CUBLAS_WORKSPACE_CONFIG=:4096:8, no Triton block-size autotuning "
                      "(slower; CPU runs are deterministic without it)")


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message; the caller decides the exit code
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


# ------------------------------------------------------------------------------------ argument types
def _type(fn):
    """argparse reports ArgumentTypeError's message as is; other errors become a generic line."""
    def wrapper(s):
        try:
            return fn(s)
        except argparse.ArgumentTypeError:
            raise
        except (ValueError, TypeError, OverflowError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    wrapper.__name__ = fn.__name__
    return wrapper


def _int_at_least(lo: int):
    @_type
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = f"int>={lo}"
    return parse


def _float_in(lo: float, hi: float, lo_open=False, hi_open=True):
    @_type
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                                             f"{')' if hi_open else ']'}, got {s}")
        return v
    return parse


@_type
def _threads(s: str) -> int:
    v = _int_at_least(1)(s)
    if v > 1024:  # OpenMP would try to start them all
        raise argparse.ArgumentTypeError(f"at most 1024 threads, got {v}")
    return v


_sparsity = _float_in(0.0, 1.0)
_positive = _float_in(0.0, math.inf, lo_open=True)
_nonneg = _float_in(0.0, math.inf, hi_open=True)


@_type
def _sparsities(s: str) -> list[float]:
    vals = [_sparsity(p.strip()) for p in s.split(",") if p.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("give at least one sparsity, e.g. 0,0.2,0.4,0.6,0.8")
    return list(dict.fromkeys(vals))


@_type
def _seeds(s: str) -> list[int]:
    """'0,1,2' or '0-4' (inclusive) or a mix."""
    out: list[int] = []
    for part in (p.strip() for p in s.split(",")):
        if not part:
            continue
        a, sep, b = part.partition("-")
        try:
            lo, hi = (int(a), int(b)) if sep else (int(a), int(a))
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds are non-negative integers like 0,1,2 or 0-4, got {part!r}") \
                from None
        if lo < 0 or hi < lo:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r}")
        if hi - lo >= 10_000:
            raise argparse.ArgumentTypeError(f"seed range {part!r} is too long")
        out += range(lo, hi + 1)
    if not out:
        raise argparse.ArgumentTypeError("give at least one seed")
    return list(dict.fromkeys(out))


@_type
def _arms(s: str) -> list[str]:
    from .experiment import ARMS

    vals = [p.strip() for p in s.split(",") if p.strip()]
    bad = [v for v in vals if v not in ARMS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {bad or [s]}; choose from {', '.join(ARMS)}")
    return list(dict.fromkeys(vals))


@_type
def _dataset(s: str) -> str:
    from .experiment import dataset_key

    return dataset_key(s)


@_type
def _model(s: str) -> str:
    from .experiment import ModelConfig

    return ModelConfig(s).name


# ------------------------------------------------------------------------------------ parser
def _runtime_opts() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("where and how (not part of a run's identity)")
    g.add_argument("--results", metavar="DIR", default=DEFAULT_RESULTS,
                   help=f"results directory; one sub-directory per run (default: {DEFAULT_RESULTS})")
    g.add_argument("--data-root", metavar="DIR", help="dataset root (torchvision layout or a flat directory "
                   "of IDX files); default: $FASTWEEDOUT_DATA, ./data, and for Fashion-MNIST the Debian "
                   "package's /usr/share/datasets/fashion-mnist")
    g.add_argument("--download", action="store_true", help="download the dataset through torchvision if missing")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--threads", type=_threads, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--chunk-size", type=_int_at_least(1), help="search: members scored at once (default: what "
                   "fits in memory)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)
    return p


def _data_opts() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", type=_dataset, default="fashion-mnist",
                   help="fashion-mnist (default), mnist, cifar10, cifar100 or synthetic")
    g.add_argument("--val-size", type=_int_at_least(0), help="validation images held out of the training set "
                   "for the search (default: 5000; synthetic: 200)")
    g.add_argument("--train-subset", type=_int_at_least(1), metavar="N",
                   help="train on the first N images of the training split (quick runs)")
    g.add_argument("--model", type=_model, default="wrn_10_1", help="wrn_<depth>_<width> (default: wrn_10_1)")
    g.add_argument("--dropout", type=_float_in(0.0, 1.0), default=0.0, help="dropout in each block (default 0)")
    return p


def _search_opts(sparsity: bool = True) -> argparse.ArgumentParser:
    from .masks import MODES
    from .model import BN_MODES
    from .scoring import ENGINES, METRICS
    from .search import STRATEGIES

    p = _Parser(add_help=False)
    g = p.add_argument_group("sparsity and the Weedout search")
    if sparsity:
        g.add_argument("--sparsity", type=_sparsity, default=0.5,
                       help="eta, the fraction of nodes switched off, in [0, 1) (default 0.5; 0 = dense)")
    g.add_argument("--mode", choices=MODES, default="layerwise",
                   help="layerwise (the paper: eta of every layer) or global (default: layerwise)")
    g.add_argument("--population", type=_int_at_least(1), default=100, help="masks per generation (default 100)")
    g.add_argument("--generations", type=_int_at_least(1), default=5, help="generations (default 5)")
    g.add_argument("--search-batch", type=_int_at_least(1), metavar="B",
                   help="validation images per generation (default: min(1000, validation size))")
    g.add_argument("--metric", choices=METRICS, default="loss", help="fitness: -loss (default) or accuracy")
    g.add_argument("--bn", choices=BN_MODES, default="batch", help="BN statistics while scoring (default batch)")
    g.add_argument("--engine", choices=ENGINES, default="auto", help="scoring engine (default auto)")
    g.add_argument("--strategy", choices=STRATEGIES, default="random",
                   help="random (the paper: elite + fresh random masks), tournament (elite + mutated binary-"
                        "tournament winners) or evolution (elite + mutated members of the top 20%%); default random")
    return p


def _train_opts() -> argparse.ArgumentParser:
    from .training import SCHEDULES

    p = _Parser(add_help=False)
    g = p.add_argument_group("training (SGD, Nesterov momentum 0.9)")
    g.add_argument("--epochs", type=_int_at_least(1), default=200, help="epochs (default 200)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=128, help="batch size (default 128)")
    g.add_argument("--lr", type=_positive, default=0.1, help="learning rate (default 0.1)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="cosine (default) or step (x0.2 at 30/60/80%% of the epochs)")
    g.add_argument("--weight-decay", type=_nonneg, default=5e-4, help="weight decay (default 5e-4)")
    g.add_argument("--label-smoothing", type=_float_in(0.0, 1.0), default=0.0, help="label smoothing (default 0)")
    g.add_argument("--masked-training", action="store_true",
                   help="train the full network under its mask instead of the pruned one (same function)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Weedout: Random Search for sparse Wide ResNets (Farahani 2024), "
                     "with fast population scoring, per-phase compute accounting and resumable experiments.",
                     epilog="Run `fastweedout COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    rt, dt, so, tr = _runtime_opts(), _data_opts(), _search_opts(), _train_opts()
    seed = _Parser(add_help=False)
    seed.add_argument("--seed", type=_int_at_least(0), help="initial weights, masks and data order (default 0)")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("search", parents=[dt, so, seed, rt], help="the Weedout phase alone: writes the winning mask",
                       description="Random Search with elitism over node masks of a freshly initialised WRN; "
                       "writes the winning mask (mask.pt) and a JSON summary into a run directory.")
    p.add_argument("--out", metavar="FILE", help="also copy the winning mask to FILE")

    p = sub.add_parser("train", parents=[dt, tr, seed, rt], help="train a masked (--mask FILE) or dense network",
                       description="Train the network pruned to a mask file's mask (from `search` or a run "
                       "directory's mask.pt), or the dense network without --mask.")
    p.add_argument("--mask", metavar="FILE", help="mask file (default: the dense network)")

    p = sub.add_parser("run", parents=[dt, so, tr, seed, rt], help="search then train (or a random mask)",
                       description="One run: the Weedout search then training of the winner (--arm weedout), "
                       "or training of a random mask of the same sparsity (--arm random). Sparsity 0 trains "
                       "the dense network.")
    p.add_argument("--arm", choices=("weedout", "random"), default="weedout", help="default weedout")

    p = sub.add_parser("experiment", parents=[dt, _search_opts(sparsity=False), tr, rt],
                       help="the paper's grid: sparsities x arms x seeds",
                       description="Every sparsity x arm x seed (sparsity 0 is the dense network, once per seed). "
                       "Finished runs are skipped and interrupted ones resume, so re-running the same command "
                       "after a crash finishes the grid.")
    p.add_argument("--sparsities", type=_sparsities, default=[0.0, 0.2, 0.4, 0.6, 0.8],
                   help="comma-separated, in [0, 1) (default 0,0.2,0.4,0.6,0.8)")
    p.add_argument("--arms", type=_arms, default=["weedout", "random"], help="default weedout,random")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="e.g. 0,1,2 or 0-4 (default 0,1,2)")

    p = sub.add_parser("report", help="tables and plots from a results directory",
                       description="Writes report.md, summary.csv, figure2.png (accuracy vs sparsity) and "
                       "curves.png (accuracy per epoch) from the finished runs of RESULTS_DIR.",
                       formatter_class=fmt)
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: RESULTS_DIR)")

    p = sub.add_parser("demo", help="Weedout vs random on Fashion-MNIST in a few minutes on a CPU",
                       description="A small WRN on (a subset of) Fashion-MNIST: the dense network, the Weedout "
                       "winner and a random mask at one sparsity, trained briefly; prints a table. Runs are "
                       "kept in --results, so a second call only prints.", formatter_class=fmt)
    p.add_argument("--results", metavar="DIR", default=DEMO_RESULTS, help="results directory")
    p.add_argument("--dataset", type=_dataset, default="fashion-mnist", help=argparse.SUPPRESS)
    p.add_argument("--data-root", metavar="DIR", help="dataset root (default: the usual places)")
    p.add_argument("--model", type=_model, default="wrn_10_1", help="wrn_<depth>_<width>")
    p.add_argument("--sparsity", type=_float_in(0.0, 1.0, lo_open=True), default=0.5, help="eta in (0, 1)")
    p.add_argument("--population", type=_int_at_least(1), default=100, help="masks per generation")
    p.add_argument("--generations", type=_int_at_least(1), default=5, help="generations")
    p.add_argument("--search-batch", type=_int_at_least(1), default=100, help="validation images per generation")
    p.add_argument("--epochs", type=_int_at_least(1), default=2, help="epochs")
    p.add_argument("--train-subset", type=_int_at_least(1), default=10000, help="training images used")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_threads, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)

    sub.add_parser("bench", add_help=False, help="benchmarks (fastweedout.bench); `fastweedout bench --help`")
    return parser


# ------------------------------------------------------------------------------------ commands
def _runtime(args):
    from .experiment import Runtime

    return Runtime(data_root=getattr(args, "data_root", None), download=getattr(args, "download", False),
                   device=args.device, chunk_size=getattr(args, "chunk_size", None), progress=not args.no_progress)


def _data_cfg(args):
    from .experiment import DataConfig

    return DataConfig(name=args.dataset, val_size=args.val_size, train_subset=args.train_subset)


def _model_cfg(args):
    from .experiment import ModelConfig

    return ModelConfig(name=args.model, dropout=args.dropout)


def _search_cfg(args):
    from .experiment import SearchConfig

    return SearchConfig(population=args.population, generations=args.generations, batch_size=args.search_batch,
                        metric=args.metric, bn=args.bn, engine=args.engine, strategy=args.strategy)


def _train_cfg(args):
    from .experiment import TrainingConfig

    return TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                          weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                          masked=args.masked_training)


def _final_line(out) -> str:
    s = out.summary
    f = s.get("final")
    state = "already done" if out.skipped else "done"
    acc = f" test acc {100 * f['test_acc']:.2f}%, train acc {100 * f['train_acc']:.2f}%" if f else ""
    return f"{state}: {out.path}{acc}"


def cmd_search(args) -> int:
    from . import runs
    from .experiment import check_against_data, execute_run, load_data, make_run_config, precheck_results

    if args.sparsity == 0:
        raise UsageError(f"{PROG} search: error: --sparsity must be > 0 (0 is the dense network: nothing to search)")
    if args.out is not None and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out)))):
        raise UsageError(f"{PROG} search: error: --out {args.out} must be a file path in an existing directory")
    cfg = make_run_config("weedout", args.sparsity, data=_data_cfg(args), model=_model_cfg(args),
                          seed=args.seed or 0, mode=args.mode, search=_search_cfg(args), training=None)
    rt = _runtime(args)
    precheck_results(args.results)
    data = load_data(cfg.data, rt)
    check_against_data(cfg, data)
    runs.check_results_dir(args.results)
    out = execute_run(cfg, args.results, rt, data=data)
    mask = os.path.join(out.path, runs.MASK_NAME)
    if args.out:
        runs.atomic_copy(mask, args.out)
    s = out.summary
    fit = s["search"]["best_fitness"][-1]
    print(f"{'already done' if out.skipped else 'done'}: winner fitness {fit:.4f} "
          f"(validation accuracy before training {100 * s['init']['init_val_acc']:.2f}%), "
          f"{s['search']['wall_time_s']:.1f} s, {s['search']['flops_useful'] / 1e9:.3g} GFLOP; engine "
          f"{s['search']['engine']}, scored in chunks of {s['search']['chunk_size']} members")
    print(f"mask: {args.out or mask}")
    print(f"summary: {os.path.join(out.path, 'summary.json')}")
    return 0


def cmd_train(args) -> int:
    from . import runs
    from .experiment import (check_against_data, check_mask_fits, execute_run, given_config, load_data,
                             make_run_config, precheck_results, read_mask_file)

    rt = _runtime(args)
    data_cfg, model_cfg, train_cfg = _data_cfg(args), _model_cfg(args), _train_cfg(args)
    mask = None
    if args.mask is not None:
        mask = read_mask_file(args.mask)
        meta = getattr(mask, "meta", {}) or {}
        if meta.get("model") not in (None, model_cfg.name):
            raise UsageError(f"{PROG} train: error: mask file {args.mask} was chosen for model {meta['model']}, "
                             f"not {model_cfg.name} (pass --model {meta['model']})")
        if meta.get("dataset") not in (None, data_cfg.name):
            warnings.warn(f"the mask in {args.mask} was chosen on dataset {meta['dataset']}; training it on "
                          f"{data_cfg.name}", RuntimeWarning)
        seed = args.seed if args.seed is not None else int(meta.get("seed", 0))
        if args.seed is not None and "seed" in meta and int(meta["seed"]) != args.seed:
            warnings.warn(f"the mask was chosen for the initial weights of seed {meta['seed']}; training it "
                          f"from those of seed {args.seed}", RuntimeWarning)
        cfg = given_config(mask, data=data_cfg, model=model_cfg, seed=seed, training=train_cfg)
    else:
        cfg = make_run_config("dense", 0.0, data=data_cfg, model=model_cfg, seed=args.seed or 0,
                              training=train_cfg)
    precheck_results(args.results)
    data = load_data(cfg.data, rt)
    if mask is not None:
        check_mask_fits(mask, cfg, data, args.mask)
    check_against_data(cfg, data)
    runs.check_results_dir(args.results)
    out = execute_run(cfg, args.results, rt, data=data, given_mask=mask)
    print(_final_line(out))
    return 0


def cmd_run(args) -> int:
    from .experiment import make_run_config, run_grid

    cfg = make_run_config(args.arm, args.sparsity, data=_data_cfg(args), model=_model_cfg(args),
                          seed=args.seed or 0, mode=args.mode, search=_search_cfg(args), training=_train_cfg(args))
    res = run_grid([cfg], args.results, _runtime(args))
    for cfg_, err in res.failures:
        print(f"{PROG} run: error: {' '.join(err.split())}", file=sys.stderr)
        return 1
    print(_final_line(res.outcomes[0]))
    return 0


def cmd_experiment(args) -> int:
    from .experiment import grid_configs, run_grid

    configs = grid_configs(data=_data_cfg(args), model=_model_cfg(args), search=_search_cfg(args),
                           training=_train_cfg(args), sparsities=args.sparsities, arms=args.arms, seeds=args.seeds,
                           mode=args.mode)
    t0 = time.perf_counter()
    done = [0]

    def report_run(out):  # one line per run, so a log of a long grid shows where it is
        done[0] += 1
        print(f"[{done[0]}/{len(configs)}] {_final_line(out)} ({time.perf_counter() - t0:.0f} s)", flush=True)

    res = run_grid(configs, args.results, _runtime(args), on_run=report_run)
    took = f"({time.perf_counter() - t0:.0f} s)"
    if res.world_size > 1:  # every rank prints its own line and counts only the runs it handled
        print(f"rank {res.rank} of {res.world_size}: {len(configs)} runs in the grid; this rank: {res.ran} ran, "
              f"{res.skipped} already done, {len(res.elsewhere)} left to other ranks, {len(res.failures)} failed "
              f"{took} (counts are this rank's own; the grid is complete when every rank has finished "
              f"without failures). Results in {args.results}; tables and plots: {PROG} report {args.results}")
    else:
        print(f"{len(configs)} runs: {res.ran} ran, {res.skipped} already done, {len(res.failures)} failed "
              f"{took}. Results in {args.results}; tables and plots: {PROG} report {args.results}")
    for cfg, err in res.failures:
        print(f"failed: {cfg.name}: {' '.join(err.split())}", file=sys.stderr)
    return 1 if res.failures else 0


def cmd_report(args) -> int:
    from .report import write_report

    rep = write_report(args.results_dir, args.out)
    print(f"{len(rep.collection.runs)} finished runs"
          + (f" ({len(rep.collection.incomplete)} incomplete skipped)" if rep.collection.incomplete else ""))
    for name, path in rep.paths.items():
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from .experiment import (DataConfig, ModelConfig, Runtime, SearchConfig, TrainingConfig, grid_configs,
                             run_grid)

    t0 = time.perf_counter()
    configs = grid_configs(data=DataConfig(args.dataset, train_subset=args.train_subset),
                           model=ModelConfig(args.model),
                           search=SearchConfig(population=args.population, generations=args.generations,
                                               batch_size=args.search_batch),
                           training=TrainingConfig(epochs=args.epochs), sparsities=[0.0, args.sparsity],
                           seeds=[args.seed])
    rt = Runtime(data_root=args.data_root, device=args.device, progress=not args.no_progress)
    print(f"demo: {args.model} on {args.dataset} ({args.train_subset} training images, {args.epochs} epochs); "
          f"Weedout (population {args.population} x {args.generations} generations) vs a random mask at "
          f"sparsity {args.sparsity:g}, and the dense network", flush=True)
    res = run_grid(configs, args.results, rt)
    for cfg, err in res.failures:
        print(f"failed: {cfg.name}: {' '.join(err.split())}", file=sys.stderr)
    print()
    print(demo_table(res.outcomes))
    cached = " (some runs were already done: delete the directory to redo them)" if res.skipped else ""
    print(f"\nruns in {args.results}{cached}; {time.perf_counter() - t0:.0f} s")
    return 1 if res.failures else 0


def demo_table(outcomes) -> str:
    head = ("arm", "eta", "params", "val loss@init", "val acc@init", "test acc", "train acc", "search s",
            "train s")
    rows = [head]
    for o in outcomes:
        s = o.summary
        f, ph, init = s["final"], s["phases"], s["init"]
        loss = init["init_val_loss"]
        rows.append((s["arm"], f"{s['sparsity']:g}", f"{s['live_params']:,}",
                     "n/a" if loss is None else f"{loss:.3f}", f"{100 * init['init_val_acc']:.1f}%",
                     f"{100 * f['test_acc']:.2f}%", f"{100 * f['train_acc']:.2f}%",
                     f"{(s['search'] or {}).get('wall_time_s', 0.0):.1f}", f"{ph['training']['wall_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_bench(rest: list[str]) -> int:
    try:
        from fastweedout.bench.cli import main as bench_main  # written separately; imported only when asked
    except ModuleNotFoundError as e:
        if e.name in ("fastweedout.bench", "fastweedout.bench.cli"):
            print(f"{PROG} bench: error: the benchmark suite (module fastweedout.bench.cli) is not installed in "
                  "this version", file=sys.stderr)
            return 2
        raise
    rc = bench_main(list(rest))
    return int(rc or 0)


COMMANDS = {"search": cmd_search, "train": cmd_train, "run": cmd_run, "experiment": cmd_experiment,
            "report": cmd_report, "demo": cmd_demo}


# ------------------------------------------------------------------------------------ main
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _format_warning(message, category, filename, lineno, line=None):
    return f"warning: {' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (also when called in-process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    old_format = warnings.formatwarning
    warnings.formatwarning = _format_warning
    command = argv[0] if argv else None
    try:
        if command == "bench":  # everything after it belongs to the benchmark suite's own parser
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if getattr(args, "deterministic", False):
            from .experiment import set_deterministic

            set_deterministic()
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or a delegated main that exits
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, RunError, OSError) as e:
        # Bad input (ValueError covers DatasetError), an unusable results directory or disk, a missing file.
        prefix = f"{PROG} {command}" if command in COMMANDS else PROG
        msg = _one_line(e)
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            msg = (f"cannot write ({_DISK_ERRORS[e.errno]}): {msg}. Every file is written to a temporary and renamed, "
                   "so nothing already written is damaged; fix the disk and run the same command again to resume")
        print(f"{prefix}: error: {msg}", file=sys.stderr)
        if os.environ.get("FASTWEEDOUT_DEBUG"):
            traceback.print_exc()
        return 2
    except RuntimeError as e:
        from .training import TrainingDiverged

        if not isinstance(e, TrainingDiverged):
            return _internal(e)
        print(f"{PROG} {command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: still one line, the traceback on request
        return _internal(e)
    finally:
        warnings.formatwarning = old_format


_DISK_ERRORS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EIO: "I/O error"}


def _internal(e: BaseException) -> int:
    print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} "
          "(set FASTWEEDOUT_DEBUG=1 for the traceback)", file=sys.stderr)
    if os.environ.get("FASTWEEDOUT_DEBUG"):
        traceback.print_exception(e)
    return 1


if __name__ == "__main__":
    sys.exit(main())
