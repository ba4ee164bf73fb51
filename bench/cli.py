"""``python -m bench``: the benchmark suite's command line (run from the repository root; ``bench/`` is a
directory of scripts, not an installed package).

    python -m bench scoring  [--quick|--full] [--out DIR] [--threads N] [overrides...]
    python -m bench training [--quick|--full] ...
    python -m bench pipeline [--quick|--full] ...
    python -m bench engines                    # the CPU engine table: engines vs the baselines a user would write
    python -m bench member-steps [--smoke]     # Weedout after K steps per member: one at a time vs batched
    python -m bench kernels  [--smoke] ...     # Triton conv vs cuDNN, epilogues vs copy (GPU)
    python -m bench gpu      [--dry-run]       # everything on one GPU in one command (<= 9 min on an H100)
    python -m bench report   [--out DIR] [--md FILE] [--all-runs] [FILES...]
    python -m bench all      [--quick|--full]  # scoring + training + pipeline (+ kernels on a GPU) + report
    python -m bench --quick                    # no command: `all`

Presets: ``--smoke`` (tiny shapes, seconds: checks the runner), ``--quick`` (CPU-sized, < 10 minutes
for ``all`` on a 2-core CPU), no flag (the CPU matrix on a CPU, the headline run on a GPU), ``--full``
(the GPU headline run: WRN-16-4 and WRN-28-10, P in {10, 100}, bf16; it refuses to start without a
CUDA device). Rows are appended to ``<out>/<bench>.jsonl`` (default ``./bench/results``). Bad
arguments print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import DEFAULT_OUT, load_average, parse_floats, parse_ints, resolve_device, set_threads

ETAS5 = [0.0, 0.2, 0.4, 0.6, 0.8]


class FullNeedsGPU(SystemExit):
    pass


def scoring_preset(preset: str, cuda: bool) -> dict:
    if preset == "smoke":
        return dict(models=["wrn_10_1"], populations=[3], etas=[0.0, 0.5], batch=4, image_size=8, repeats=2,
                    engines=["loop", "folded", "compact", "folded-triton", "compact-triton", "torch.func",
                             "pruned-loop"])
    if preset == "quick":
        return dict(models=["wrn_16_2"], populations=[10], etas=[0.0, 0.4, 0.8], batch=32, repeats=3)
    if preset == "cpu-engines":
        return dict(models=["wrn_16_4"], populations=[16], etas=[0.0, 0.4, 0.8], batch=64, repeats=3,
                    engines=["loop", "folded", "compact", "folded-triton", "compact-triton", "pruned-loop",
                             "vmap-pruned", "torch-pruning", "pruned-graph", "compact-compile",
                             "compact-max-autotune"])
    if preset == "full" or (preset == "default" and cuda):
        return dict(models=["wrn_16_4", "wrn_28_10"], populations=[10, 100], etas=ETAS5, batch=256,
                    dtype="bfloat16", repeats=10, warmup=2)
    return dict(models=["wrn_16_2"], populations=[10, 100], etas=ETAS5, batch=64, repeats=3)  # CPU default


def training_preset(preset: str, cuda: bool) -> dict:
    if preset == "smoke":
        return dict(models=["wrn_10_1"], etas=[0.0, 0.5], batch=4, image_size=8, repeats=2, warmup=1,
                    compile_modes=[False])
    if preset == "quick":
        return dict(models=["wrn_16_2"], etas=[0.0, 0.4, 0.8], batch=32, repeats=3, warmup=2,
                    compile_etas=[0.0, 0.8])
    if preset == "full" or (preset == "default" and cuda):
        return dict(models=["wrn_16_4", "wrn_28_10"], etas=ETAS5, batch=128, repeats=20, warmup=5,
                    dtypes=["float32", "bfloat16"], compile_etas=[0.0, 0.4, 0.8])
    return dict(models=["wrn_16_2"], etas=ETAS5, batch=64, repeats=5, warmup=2)


def pipeline_preset(preset: str, cuda: bool) -> dict:
    if preset == "smoke":
        return dict(model="wrn_10_1", dataset="synthetic", train_size=64, test_size=32, val_size=32, eta=0.5,
                    population=3, generations=2, search_batch=16, epochs=1, batch_size=16)
    if preset == "quick":
        return dict(model="wrn_16_2", dataset="fashion-mnist", train_size=4096, test_size=1024, val_size=512,
                    eta=0.8, population=50, generations=3, search_batch=128, epochs=1, batch_size=64)
    if preset == "full" or (preset == "default" and cuda):
        return dict(model="wrn_28_10", dataset="cifar10", train_size=45000, test_size=10000, val_size=5000,
                    eta=0.8, population=100, generations=5, search_batch=1000, epochs=1, batch_size=128)
    return dict(model="wrn_16_2", dataset="fashion-mnist", train_size=5000, test_size=1000, val_size=1000,
                eta=0.8, population=100, generations=5, search_batch=256, epochs=1, batch_size=128)


# ------------------------------------------------------------------------------------ arguments
def _common(p: argparse.ArgumentParser, presets: bool = True) -> None:
    if presets:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--quick", action="store_true", help="CPU-sized preset (all: < 10 min on 2 cores)")
        g.add_argument("--full", action="store_true", help="the GPU headline run (needs a CUDA device)")
        g.add_argument("--smoke", action="store_true", help="tiny shapes, no compile: checks the runner (seconds)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (default bench/results)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default torch's")
    p.add_argument("--quiet", action="store_true")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``python -m bench: error: ...``, exit 2), like every other command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


COMMANDS = ("scoring", "engines", "member-steps", "training", "pipeline", "kernels", "gpu", "report", "all")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m bench", description="fastweedout benchmark suite")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    s = sub.add_parser("scoring", help="population scoring: engines vs baselines")
    _common(s)
    _scoring_args(s)
    e = sub.add_parser("engines", help="the CPU engine table: engines x the fastest baseline, WRN-16-4, P=16, B=64")
    _common(e, presets=False)
    _scoring_args(e)
    e.add_argument("--profile", action="store_true",
                   help="also profile loop vs folded at eta=0 (torch.profiler + page faults) into <out>")

    ms = sub.add_parser("member-steps", help="Weedout after K steps per member: one at a time vs batched (vmap)")
    _common(ms)
    for name, typ in (("--model", str), ("--etas", str), ("--population", int), ("--steps", int),
                      ("--member-batch", int), ("--val-batch", int), ("--repeats", int)):
        ms.add_argument(name, type=typ)

    t = sub.add_parser("training", help="training step: dense vs pruned vs masked, eager vs compile")
    _common(t)
    t.add_argument("--models")
    t.add_argument("--etas")
    t.add_argument("--batch", type=int)
    t.add_argument("--image-size", type=int)
    t.add_argument("--in-channels", type=int)
    t.add_argument("--variants", help="comma list of pruned,masked (dense is always eta=0)")
    t.add_argument("--compile", choices=["both", "eager", "compiled"], default=None)
    t.add_argument("--compile-etas", help="compile only at these etas")
    t.add_argument("--dtypes", help="float32,bfloat16")
    t.add_argument("--layouts", help="comma list of nchw,channels_last, timed side by side (default: the one "
                                     "training uses on the device: channels_last on a GPU, nchw on a CPU)")
    t.add_argument("--repeats", type=int)
    t.add_argument("--warmup", type=int)

    pl = sub.add_parser("pipeline", help="one Weedout run: search + training + evaluation per phase")
    _common(pl)
    pl.add_argument("--model")
    pl.add_argument("--dataset")
    pl.add_argument("--train-size", type=int)
    pl.add_argument("--test-size", type=int)
    pl.add_argument("--val-size", type=int)
    pl.add_argument("--eta", type=float)
    pl.add_argument("--population", type=int)
    pl.add_argument("--generations", type=int)
    pl.add_argument("--search-batch", type=int)
    pl.add_argument("--engine")
    pl.add_argument("--epochs", type=int)
    pl.add_argument("--batch-size", type=int)

    k = sub.add_parser("kernels", help="Triton conv vs cuDNN grouped vs dense folded; epilogues vs copy (GPU)")
    _common(k, presets=False)
    k.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU through the interpreter)")
    k.add_argument("--members", type=int)
    k.add_argument("--batch", type=int, help="images per member")
    k.add_argument("--stages", help="comma list of WRN-28-10 stages, e.g. 2,3")
    k.add_argument("--etas", help="comma list of sparsities")
    k.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    k.add_argument("--repeats", type=int)

    gp = sub.add_parser("gpu", help="everything on one GPU: kernel tests, kernels, scoring, training (<= 9 min)")
    _common(gp, presets=False)
    gp.add_argument("--dry-run", action="store_true", help="the same steps on tiny shapes (CPU; what CI runs)")
    gp.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (default 450)")
    gp.add_argument("--skip", default="", help="comma list of tests,kernels,scoring,training to skip")
    gp.add_argument("--no-autotune", action="store_true", help="the Triton conv's default block sizes only")

    r = sub.add_parser("report", help="results JSONL -> Markdown table + PNG plots")
    r.add_argument("files", nargs="*", help="JSONL files (default: <out>/*.jsonl)")
    r.add_argument("--out", default=str(DEFAULT_OUT), help="where the PNGs (and README.md) go")
    r.add_argument("--md", default=None, help="Markdown path (default <out>/README.md)")
    r.add_argument("--all-runs", action="store_true", help="every run, not only the latest of each kind")
    r.add_argument("--no-plots", action="store_true")

    a = sub.add_parser("all", help="scoring + training + pipeline (+ kernels on --full) + report")
    _common(a)
    a.add_argument("--skip", default="", help="comma list of scoring,training,pipeline,kernels,report to skip")
    return ap


def _scoring_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--models", help="comma list, e.g. wrn_16_2,wrn_16_4")
    s.add_argument("--populations", help="comma list of P, e.g. 10,100")
    s.add_argument("--etas", help="comma list of sparsities")
    s.add_argument("--batch", type=int, help="images per batch")
    s.add_argument("--image-size", type=int)
    s.add_argument("--in-channels", type=int)
    s.add_argument("--engines", help="comma list of loop,folded,compact,folded-triton,compact-triton,"
                                     "torch.func,folded-compile,pruned-loop,vmap-pruned,torch-pruning,"
                                     "pruned-graph,compact-compile,compact-max-autotune (default: all that run here)")
    s.add_argument("--bn", choices=["batch", "running"])
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--chunk-size", type=int, help="members per chunk (default: each engine's auto rule)")
    s.add_argument("--repeats", type=int)
    s.add_argument("--warmup", type=int)
    s.add_argument("--compile-max-population", type=int)
    s.add_argument("--layout", choices=["channels_last", "nchw"],
                   help="memory format of the model and the images (default channels_last); the baselines run in "
                        "it, the engines always run channels_last")
    s.add_argument("--tag", help="appended to the preset name in the records (keeps a variant run apart in reports)")


def _preset(args) -> str:
    for name in ("full", "quick", "smoke"):
        if getattr(args, name, False):
            return name
    return "default"


def _override(d: dict, args, names: dict) -> dict:
    for arg, (key, conv) in names.items():
        v = getattr(args, arg, None)
        if v is not None:
            d[key] = conv(v) if conv else v
    return d


def _split(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _check_full(args, device) -> None:
    if getattr(args, "full", False) and device.type != "cuda":
        raise FullNeedsGPU(
            "--full is the GPU headline run (WRN-16-4 and WRN-28-10, P in {10, 100}, bf16, "
            f"989 TFLOP/s peak) and needs a CUDA device; this machine has none (device={device}). Nothing was "
            "run. On a CPU use --quick (< 10 min) or no preset (the CPU-sized matrix: WRN-16-2, P in {10, 100}).")


# ------------------------------------------------------------------------------------ commands
def cmd_scoring(args, preset: str | None = None) -> list:
    from .scoring import ScoringConfig, run_scoring
    device = resolve_device(args.device)
    _check_full(args, device)
    preset = preset or _preset(args)
    d = scoring_preset(preset, device.type == "cuda")
    _override(d, args, {"models": ("models", _split), "populations": ("populations", parse_ints),
                        "etas": ("etas", parse_floats), "batch": ("batch", None), "image_size": ("image_size", None),
                        "in_channels": ("in_channels", None), "engines": ("engines", _split), "bn": ("bn", None),
                        "dtype": ("dtype", None), "chunk_size": ("chunk_size", None), "repeats": ("repeats", None),
                        "warmup": ("warmup", None), "compile_max_population": ("compile_max_population", None),
                        "layout": ("channels_last", lambda v: v == "channels_last")})
    cfg = ScoringConfig(**d, preset=preset + (f"+{args.tag}" if getattr(args, "tag", None) else ""))
    return run_scoring(cfg, device, Path(args.out) / "scoring.jsonl", quiet=args.quiet)


def cmd_engines(args) -> list:
    from .engines import print_summary
    from .env import measure_cpu_peak
    rows = cmd_scoring(args, preset="cpu-engines")
    # the CPU's FLOP peak again, at the end of the same run (the rows divide by the one taken at its start)
    end_peak = measure_cpu_peak(fresh=True) if rows and rows[0].env.get("device_type") == "cpu" else None
    print_summary(rows, end_peak)
    if args.profile:
        from .engines import profile_eta0
        r0 = rows[0]
        profile_eta0(args.out, r0.model, r0.population, r0.batch, r0.image_size)
    return rows


def cmd_member_steps(args) -> list:
    from .member_steps import MemberStepsConfig, run_member_steps
    device = resolve_device(args.device)
    _check_full(args, device)
    preset = _preset(args)
    d = dict(preset=preset)
    if preset == "smoke":
        d.update(etas=(0.5,), population=3, steps=2, member_batch=8, val_batch=16, image_size=8, repeats=1)
    _override(d, args, {"model": ("model", None), "etas": ("etas", parse_floats), "population": ("population", None),
                        "steps": ("steps", None), "member_batch": ("member_batch", None),
                        "val_batch": ("val_batch", None), "repeats": ("repeats", None)})
    return run_member_steps(MemberStepsConfig(**d), device, Path(args.out) / "member_steps.jsonl", quiet=args.quiet)


def cmd_training(args) -> list:
    from .training import TrainingConfig, run_training
    device = resolve_device(args.device)
    _check_full(args, device)
    preset = _preset(args)
    d = training_preset(preset, device.type == "cuda")
    _override(d, args, {"models": ("models", _split), "etas": ("etas", parse_floats), "batch": ("batch", None),
                        "image_size": ("image_size", None), "in_channels": ("in_channels", None),
                        "variants": ("variants", _split), "compile_etas": ("compile_etas", parse_floats),
                        "dtypes": ("dtypes", _split), "layouts": ("layouts", _split), "repeats": ("repeats", None),
                        "warmup": ("warmup", None)})
    if args.compile is not None:
        d["compile_modes"] = {"both": [False, True], "eager": [False], "compiled": [True]}[args.compile]
    cfg = TrainingConfig(**d, preset=preset)
    return run_training(cfg, device, Path(args.out) / "training.jsonl", quiet=args.quiet)


def cmd_pipeline(args) -> list:
    from .pipeline import PipelineConfig, run_pipeline
    device = resolve_device(args.device)
    _check_full(args, device)
    preset = _preset(args)
    d = pipeline_preset(preset, device.type == "cuda")
    _override(d, args, {k: (k, None) for k in ("model", "dataset", "train_size", "test_size", "val_size", "eta",
                                                "population", "generations", "search_batch", "engine", "epochs",
                                                "batch_size")})
    cfg = PipelineConfig(**d, preset=preset)
    return run_pipeline(cfg, device, Path(args.out) / "pipeline.jsonl", quiet=args.quiet)


def cmd_kernels(args) -> list:
    from .kernels import KernelConfig, run_kernels, summarize
    device = resolve_device(args.device)
    cfg = KernelConfig(preset="smoke" if args.smoke else "default")
    if args.smoke:
        cfg = KernelConfig(members=2, batch=2, stages=[1, 2], etas=[0.5], widths=[(16, 8), (32, 4), (64, 2)],
                           dtype="float32", repeats=1, inner=1, preset="smoke")
    elif device.type != "cuda":
        raise FullNeedsGPU("kernels measures the Triton kernels at WRN-28-10 shapes and needs a CUDA device; "
                           "use --smoke to check the script on CPU")
    for name, conv in (("members", None), ("batch", None), ("stages", parse_ints), ("etas", parse_floats),
                       ("dtype", None), ("repeats", None)):
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, conv(v) if conv else v)
    rows = run_kernels(cfg, device, Path(args.out) / "kernels.jsonl", quiet=args.quiet)
    print(summarize(rows), flush=True)
    return rows


def cmd_gpu(args) -> int:
    from .gpu import STEPS, run_gpu
    device = resolve_device(args.device)
    skip = set(_split(args.skip))
    if skip - set(STEPS):
        raise FullNeedsGPU(f"--skip takes {','.join(STEPS)}, got {args.skip!r}")
    if device.type != "cuda" and not args.dry_run:
        raise FullNeedsGPU("gpu needs a CUDA device; --dry-run runs the same steps on tiny shapes here")
    steps = run_gpu(args.out, device, dry_run=args.dry_run, budget_s=args.budget_s, skip=skip, quiet=args.quiet,
                    autotune=not args.no_autotune)
    return 0 if all(s["status"] in ("ok", "skipped") for s in steps) else 1


def cmd_report(args):
    from .report import build_report, default_paths
    files = args.files or default_paths(args.out)
    md, figs = build_report(files, args.out, args.md, all_runs=args.all_runs, plots=not args.no_plots)
    print(f"report: {md}" + (f" and {len(figs)} plot(s) in {args.out}" if figs else ""))
    return md


def cmd_all(args) -> int:
    device = resolve_device(args.device)
    _check_full(args, device)
    skip = set(_split(args.skip))
    t0 = time.perf_counter()
    print(f"[bench all] preset={_preset(args)} device={device} load={load_average()}", flush=True)
    for name, fn in (("scoring", cmd_scoring), ("training", cmd_training), ("pipeline", cmd_pipeline)):
        if name in skip:
            continue
        ns = argparse.Namespace(**{**_defaults(name), **{k: v for k, v in vars(args).items() if k != "cmd"}})
        t = time.perf_counter()
        fn(ns)
        print(f"[bench all] {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    if device.type == "cuda" and "kernels" not in skip:
        cmd_kernels(argparse.Namespace(**{**_defaults("kernels"), "out": args.out, "device": args.device,
                                          "quiet": args.quiet}))
    if "report" not in skip:
        cmd_report(argparse.Namespace(files=[], out=args.out, md=None, all_runs=False, no_plots=False))
    print(f"[bench all] finished in {time.perf_counter() - t0:.0f} s, load={load_average()}", flush=True)
    return 0


def _defaults(cmd: str) -> dict:
    """The sub-command's own argument defaults (so `all` can call it with a namespace)."""
    ap = _parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    return {a.dest: a.default for a in sub._actions if a.dest != "help"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        _parser().print_help()
        return 0
    if not any(a in COMMANDS for a in argv if not a.startswith("-")) and not {"-h", "--help"} & set(argv):
        argv = ["all", *argv]  # `python -m bench --quick`: the quick preset of everything
    args = _parser().parse_args(argv)
    if getattr(args, "threads", None):
        set_threads(args.threads)
    try:
        if args.cmd == "scoring":
            cmd_scoring(args)
        elif args.cmd == "engines":
            cmd_engines(args)
        elif args.cmd == "member-steps":
            cmd_member_steps(args)
        elif args.cmd == "training":
            cmd_training(args)
        elif args.cmd == "pipeline":
            cmd_pipeline(args)
        elif args.cmd == "kernels":
            cmd_kernels(args)
        elif args.cmd == "gpu":
            return cmd_gpu(args)
        elif args.cmd == "report":
            cmd_report(args)
        elif args.cmd == "all":
            return cmd_all(args)
    except FullNeedsGPU as e:
        print(f"python -m bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
