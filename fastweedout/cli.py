"""The ``fastweedout`` command: search, train, run, experiment, report, demo.

Every option of search/train/run/experiment is generated from the config dataclasses
(``fastweedout.config``, ``fastweedout.flags``). Exit codes: 0 success; 1 a run failed (its training
diverged) or an internal error; 2 bad input (unknown dataset/arm/model, values out of range, a mask
that does not fit, a missing dataset, an unusable results directory or disk), reported as one line
on stderr before anything is written; 130 interrupted (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence

from fastweedout import __version__, atomic, flags
from fastweedout.config import (
    GRID_ARMS,
    PRUNE_METHODS,
    SECTIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    Runtime,
    TrainConfig,
    build_run_config,
)
from fastweedout.experiment.records import RunError

PROG = "fastweedout"
DEMO_RESULTS = os.path.join("runs", "demo")
EXPERIMENT_DEFAULTS = {"sparsity": [0.0, 0.2, 0.4, 0.6, 0.8], "arm": ["weedout", "random"], "seed": [0, 1, 2]}


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


# ------------------------------------------------------------------------------------ parser
def _add_run_fields(p, *, lists=False, defaults=None, top=None, sections=tuple(SECTIONS), arm_choices=None):
    flags.add_fields(p, DataConfig, "data.", title="data", lists=lists, defaults=defaults)
    flags.add_fields(p, ModelConfig, "model.", title="model", lists=lists, defaults=defaults)
    flags.add_fields(p, RunConfig, "", title="the run", lists=lists, defaults=defaults, only=top)
    titles = {"search": "the Weedout search", "prune": "pruning at initialisation (l1, snip, grasp, synflow)",
              "throughout": "the search throughout training (arm throughout)", "training": "training (SGD)"}
    for sec in sections:
        if sec not in ("data", "model"):
            flags.add_fields(p, SECTIONS[sec], sec + ".", title=titles[sec], lists=lists, defaults=defaults)
    if arm_choices is not None:
        for a in p._actions:
            if a.dest == "arm":
                a.help = f"how the mask is chosen: {', '.join(arm_choices)} (default: {a.default})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Weedout: Random Search for sparse Wide ResNets (Farahani 2024), with "
                     "fast population scoring, per-phase compute accounting and resumable experiments.",
                     epilog="Run `fastweedout COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def runtime(p, **defaults):
        flags.add_fields(p, Runtime, "runtime.", title="where and how (not part of a run's identity)",
                         defaults={f"runtime.{k}": v for k, v in defaults.items()})

    top = ("arm", "sparsity", "mode", "granularity", "seed", "pretrain_steps", "rewind", "reinit", "shuffle")
    p = sub.add_parser("search", help="choose a mask (Weedout, or a pruning-at-init method) without training",
                       description="Random Search with elitism over masks of a freshly initialised WRN (or a "
                       "pruning-at-initialisation method: --arm l1|snip|grasp|synflow); writes the mask (mask.pt) "
                       "and a JSON summary into a run directory.")
    _add_run_fields(p, top=top, sections=("search", "prune", "training"),
                    arm_choices=("weedout",) + PRUNE_METHODS)
    p.add_argument("--out", metavar="FILE", help="also copy the mask to FILE")
    runtime(p)

    p = sub.add_parser("train", help="train a masked (--mask FILE) or the dense network",
                       description="Train the network pruned to a mask file's mask (from `search` or a run "
                       "directory's mask.pt), or the dense network without --mask.")
    _add_run_fields(p, top=("seed",), sections=("training",))
    for a in p._actions:  # absent unless given (in any spelling: --seed 5, --seed=5, an abbreviation)
        if a.dest == "seed":
            a.default = argparse.SUPPRESS
            a.help = a.help.rsplit(" (default:", 1)[0] + " (default: the mask file's seed; 0 without --mask)"
    p.add_argument("--mask", metavar="FILE", help="mask file (default: the dense network)")
    runtime(p)

    p = sub.add_parser("run", help="choose a mask and train it (one run)",
                       description="One run: the mask chosen by --arm (weedout: the search; random: the control; "
                       "l1/snip/grasp/synflow: pruning at initialisation; throughout: the search during training), "
                       "then training. Sparsity 0 trains the dense network.")
    _add_run_fields(p, top=top, arm_choices=GRID_ARMS)
    runtime(p)

    p = sub.add_parser("experiment", help="a grid: every combination of the comma lists given",
                       description="Every combination of the values given as comma lists (any option below is "
                       "a grid axis: --sparsities, --arms, --seeds 0-4, --populations, --generations, --models, "
                       "--pretrain-steps, --granularity ...). Sparsity 0 is the dense network (once per "
                       "combination of the other axes). Finished runs are skipped, interrupted ones resume, and "
                       "several processes (or torchrun ranks) share a grid through claim files.")
    _add_run_fields(p, top=top, lists=True, defaults=EXPERIMENT_DEFAULTS, arm_choices=GRID_ARMS)
    runtime(p)
    p.add_argument("--no-wait", action="store_true",
                   help="do not wait for the runs other live processes hold (report them instead)")

    p = sub.add_parser("report", help="tables and plots from a results directory",
                       description="report.md, summary.csv, figure2.png, curves.png and the other figures from "
                       "the finished runs of RESULTS_DIR (runs with unreadable records are skipped with a warning).")
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: RESULTS_DIR)")

    p = sub.add_parser("robustness", help="test accuracy of finished runs after removing more of their nodes",
                       description="For every finished run of RUNS that kept its trained weights "
                       "(train/checkpoint.pt): remove a further fraction of the live nodes of every node set "
                       "(random, and smallest BN |gamma|) without fine-tuning and record the test accuracy in the "
                       "run's robustness.json (resumable: points already there are kept). `report` draws the curves.")
    p.add_argument("results_dir", metavar="RUNS")
    p.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", metavar="F,F,...",
                   help="fractions of the live nodes removed (default: 0.1 to 0.9)")
    p.add_argument("--methods", default="random,bn_gamma", metavar="M,M", help="random, bn_gamma (default: both)")
    p.add_argument("--test-images", type=int, default=None, metavar="N", help="the first N test images (default: all)")
    p.add_argument("--recalibrate", type=int, default=0, metavar="N",
                   help="also measure each pruned network with its BN running statistics recomputed from N "
                   "training images (default 0: only the trained statistics)")
    flags.add_fields(p, Runtime, "runtime.", title="where and how", only=("data_root", "download", "device", "threads"))

    p = sub.add_parser("demo", help="Weedout vs random on Fashion-MNIST in a few minutes on a CPU",
                       description="WRN-10-1 on 10,000 Fashion-MNIST images: the dense network, the Weedout winner "
                       "and a random mask at eta=0.5, 2 epochs each; prints a table. Runs are kept in --results, "
                       "so a second call only prints.")
    demo = {"data.train_subset": 10000, "search.batch_size": 256, "training.epochs": 2, "sparsity": 0.5}
    flags.add_fields(p, DataConfig, "data.", title="data", defaults=demo, only=("name", "train_subset"))
    flags.add_fields(p, RunConfig, "", title="the run", defaults=demo, only=("sparsity", "seed"))
    flags.add_fields(p, SECTIONS["search"], "search.", title="search", defaults=demo,
                     only=("population", "generations", "batch_size"))
    flags.add_fields(p, TrainConfig, "training.", title="training", defaults=demo, only=("epochs",))
    runtime(p, results=DEMO_RESULTS)
    return parser


# ------------------------------------------------------------------------------------ commands
def _config_values(args) -> dict:
    return {k: v for k, v in vars(args).items()
            if not k.startswith(("runtime.", "_")) and k not in ("command", "out", "mask", "results_dir", "no_wait")}


def _final_line(out) -> str:
    f = out.summary.get("final")
    state = "already done" if out.skipped else "done"
    acc = f" test acc {100 * f['test_acc']:.2f}%, train acc {100 * f['train_acc']:.2f}%" if f else ""
    return f"{state}: {out.path}{acc}"


def cmd_search(args, rt: Runtime) -> int:
    from fastweedout.experiment import runs
    from fastweedout.experiment.grid import prepare
    from fastweedout.experiment.pipeline import execute_run

    vals = _config_values(args)
    if vals["arm"] not in ("weedout",) + PRUNE_METHODS:
        raise UsageError(f"{PROG} search: error: --arm must be weedout or a pruning method "
                         f"({', '.join(PRUNE_METHODS)})")
    if vals["sparsity"] == 0:
        raise UsageError(f"{PROG} search: error: --sparsity must be > 0 (0 is the dense network: nothing to search)")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out is not None else None
    if args.out is not None and (os.path.isdir(args.out) or not os.path.isdir(out_dir)):
        raise UsageError(f"{PROG} search: error: --out {args.out} must be a file path in an existing directory")
    cfg = build_run_config({**vals, "training": None})
    data = prepare([cfg], rt.results, rt)[runs.canonical_json(cfg.data)]
    out = execute_run(cfg, rt.results, rt, data=data, checked=True)
    mask = os.path.join(out.path, runs.MASK_NAME)
    if args.out:
        atomic.atomic_copy(mask, args.out)
    s = out.summary
    sel, init = s["selection"], s["init"]
    best = f"winner fitness {s['search']['best_fitness'][-1]:.4f} " if s.get("search") else ""
    print(f"{'already done' if out.skipped else 'done'}: {cfg.arm} mask, {best}(validation accuracy before training "
          f"{100 * init['init_val_acc']:.2f}%), {sel['wall_s']:.1f} s, {sel['flops'] / 1e9:.3g} GFLOP"
          + (f"; engine {sel['engine']}, scored in chunks of {sel['chunk_size']} members" if "engine" in sel else ""))
    print(f"mask: {args.out or mask}")
    print(f"summary: {os.path.join(out.path, 'summary.json')}")
    return 0


def cmd_train(args, rt: Runtime) -> int:
    from fastweedout.experiment import runs
    from fastweedout.experiment.grid import prepare
    from fastweedout.experiment.inputs import check_mask_fits, given_config, read_mask_file
    from fastweedout.experiment.pipeline import execute_run

    vals = _config_values(args)
    mask = None
    if args.mask is not None:
        mask = read_mask_file(args.mask)
        meta = getattr(mask, "meta", {}) or {}
        model = vals["model.name"]
        if meta.get("model") not in (None, ModelConfig(model).name):
            raise UsageError(f"{PROG} train: error: mask file {args.mask} was chosen for model {meta['model']}, "
                             f"not {model} (pass --model {meta['model']})")
        if meta.get("dataset") not in (None, vals["data.name"]):
            warnings.warn(f"the mask in {args.mask} was chosen on dataset {meta['dataset']}; training it on "
                          f"{vals['data.name']}", RuntimeWarning, stacklevel=1)
        seed = vals["seed"] if "seed" in vals else int(meta.get("seed", 0))
        base = build_run_config({**vals, "arm": "dense", "sparsity": 0.0, "seed": seed})
        cfg = given_config(mask, data=base.data, model=base.model, seed=seed, training=base.training)
    else:
        cfg = build_run_config({**vals, "arm": "dense", "sparsity": 0.0})
    data = prepare([cfg], rt.results, rt)[runs.canonical_json(cfg.data)] if mask is None else None
    if mask is not None:
        from fastweedout.experiment.grid import precheck_results
        from fastweedout.experiment.inputs import check_against_data, load_data

        precheck_results(rt.results)
        data = load_data(cfg.data, rt)
        check_mask_fits(mask, cfg, data, args.mask)
        check_against_data(cfg, data)
        runs.check_results_dir(rt.results)
    out = execute_run(cfg, rt.results, rt, data=data, given_mask=mask, checked=mask is None)
    print(_final_line(out))
    return 0


def _grid(args, rt: Runtime, configs, *, wait: bool = True) -> int:
    from fastweedout.experiment.grid import run_grid

    t0 = time.perf_counter()
    done = [0]

    def report_run(out):  # one line per run, so the log of a long grid shows where it is
        done[0] += 1
        print(f"[{done[0]}/{len(configs)}] {_final_line(out)} ({time.perf_counter() - t0:.0f} s into the grid)",
              flush=True)

    res = run_grid(configs, rt.results, rt, on_run=report_run, wait=wait)
    took = f"({time.perf_counter() - t0:.0f} s)"
    who = f"rank {res.rank} of {res.world_size}: " if res.world_size > 1 else ""
    print(f"{who}{len(configs)} runs: {res.ran} ran, {res.skipped} already done, {len(res.failures)} failed"
          + (f", {len(res.elsewhere)} held by other processes" if res.elsewhere else "")
          + f" {took}. Results in {rt.results}; tables and plots: {PROG} report {rt.results}")
    for c in res.elsewhere:
        print(f"still running elsewhere: {c.name}", file=sys.stderr)
    for cfg, err in res.failures:
        print(f"failed: {cfg.name}: {' '.join(err.split())}", file=sys.stderr)
    return 1 if res.failures else 0


def cmd_run(args, rt: Runtime) -> int:
    from fastweedout.experiment.grid import run_grid

    res = run_grid([build_run_config(_config_values(args))], rt.results, rt)
    for _, err in res.failures:
        print(f"{PROG} run: error: {' '.join(err.split())}", file=sys.stderr)
        return 1
    print(_final_line(res.outcomes[0]))
    return 0


def cmd_experiment(args, rt: Runtime) -> int:
    from fastweedout.experiment.grid import grid_configs

    axes = _config_values(args)
    return _grid(args, rt, grid_configs({k: v if isinstance(v, list) else [v] for k, v in axes.items()}),
                 wait=not args.no_wait)


def cmd_report(args, rt) -> int:
    from fastweedout.analysis.report import write_report

    rep = write_report(args.results_dir, args.out)
    col = rep.collection
    print(f"{len(col.runs)} finished runs" + (f" ({len(col.incomplete)} incomplete skipped)" if col.incomplete else "")
          + (f" ({len(col.unreadable)} with unreadable records skipped)" if col.unreadable else ""))
    for path in rep.paths.values():
        print(f"wrote {path}")
    return 0


def cmd_demo(args, rt: Runtime) -> int:
    from fastweedout.experiment.grid import grid_configs

    vals = _config_values(args)
    print(f"demo: WRN-10-1 on {vals['data.train_subset']} {vals['data.name']} training images, "
          f"{vals['training.epochs']} epochs; Weedout (population {vals['search.population']} x "
          f"{vals['search.generations']} generations) vs a random mask at sparsity {vals['sparsity']:g}, and the "
          "dense network", flush=True)
    t0 = time.perf_counter()
    configs = grid_configs({"sparsity": [0.0, vals.pop("sparsity")], "arm": ["weedout", "random"]}, vals)
    from fastweedout.experiment.grid import run_grid

    res = run_grid(configs, rt.results, rt)
    for cfg, err in res.failures:
        print(f"failed: {cfg.name}: {' '.join(err.split())}", file=sys.stderr)
    print()
    print(demo_table(res.outcomes))
    cached = " (some runs were already done: delete the directory to redo them)" if res.skipped else ""
    print(f"\nruns in {rt.results}{cached}; {time.perf_counter() - t0:.0f} s")
    return 1 if res.failures else 0


def demo_table(outcomes) -> str:
    head = ("arm", "eta", "params", "val loss@init", "val acc@init", "test acc", "train acc", "search s", "train s")
    rows = [head]
    for o in outcomes:
        s = o.summary
        f, ph, init = s["final"], s["phases"], s["init"]
        loss = init["init_val_loss"]
        rows.append((s["arm"], f"{s['sparsity']:g}", f"{s['live_params']:,}", "n/a" if loss is None else f"{loss:.3f}",
                     f"{100 * init['init_val_acc']:.1f}%", f"{100 * f['test_acc']:.2f}%",
                     f"{100 * f['train_acc']:.2f}%",
                     f"{s['selection']['wall_s']:.1f}", f"{ph['training']['wall_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_robustness(args, rt: Runtime) -> int:
    from fastweedout.experiment.robustness import METHODS, run_robustness

    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise UsageError(f"{PROG}: error: --fractions takes numbers in (0, 1), got {args.fractions!r}") from None
    methods = args.methods.split(",")
    bad = [f for f in fractions if not 0 < f < 1] + [m for m in methods if m not in METHODS]
    if bad or (args.test_images is not None and args.test_images < 1) or args.recalibrate < 0:
        raise UsageError(f"{PROG}: error: bad --fractions, --methods ({', '.join(METHODS)}), --test-images or "
                         f"--recalibrate: {bad or (args.test_images, args.recalibrate)}")
    measured, skipped = run_robustness(args.results_dir, rt, fractions=fractions, methods=methods,
                                       test_images=args.test_images, recalibrate=args.recalibrate)
    for path, why in skipped:
        print(f"skipped {os.path.basename(path)}: {why}")
    print(f"{len(measured)} runs measured, {len(skipped)} skipped; curves: {PROG} report {args.results_dir}")
    return 0 if measured or not skipped else 1


COMMANDS = {"search": cmd_search, "train": cmd_train, "run": cmd_run, "experiment": cmd_experiment,
            "report": cmd_report, "robustness": cmd_robustness, "demo": cmd_demo}


# ------------------------------------------------------------------------------------ main
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _format_warning(message, category, filename, lineno, line=None):
    return f"warning: {' '.join(str(message).split())}\n"


_DISK_ERRORS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EIO: "I/O error"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (also when called in-process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    old_format = warnings.formatwarning
    warnings.formatwarning = _format_warning
    command = argv[0] if argv else None
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        rt = flags.runtime_of(args) if args.command != "report" else None
        if rt is not None:  # once: the device, the threads, deterministic kernels
            from fastweedout.experiment.runtime import resolve_runtime

            rt = resolve_runtime(rt)
        return COMMANDS[args.command](args, rt)
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, RunError, OSError, MemoryError) as e:
        prefix = f"{PROG} {command}" if command in COMMANDS else PROG
        msg = _one_line(e)
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            msg = (f"cannot write ({_DISK_ERRORS[e.errno]}): {msg}. Every file is written to a temporary and renamed, "
                   "so nothing already written is damaged; fix the disk and run the same command again to resume")
        elif isinstance(e, MemoryError):
            msg = f"out of memory ({msg or 'allocation failed'}): use a smaller population, batch or model"
        print(f"{prefix}: error: {msg}", file=sys.stderr)
        if os.environ.get("FASTWEEDOUT_DEBUG"):
            traceback.print_exc()
        return 2
    except RuntimeError as e:
        from fastweedout.training.loop import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"{PROG} {command}: error: {_one_line(e)}", file=sys.stderr)
            return 1
        return _internal(e)
    except Exception as e:  # noqa: BLE001 - a bug: still one line, the traceback on request
        return _internal(e)
    finally:
        warnings.formatwarning = old_format


def _internal(e: BaseException) -> int:
    print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} (set FASTWEEDOUT_DEBUG=1 for the traceback)",
          file=sys.stderr)
    if os.environ.get("FASTWEEDOUT_DEBUG"):
        traceback.print_exception(e)
    return 1


if __name__ == "__main__":
    sys.exit(main())
