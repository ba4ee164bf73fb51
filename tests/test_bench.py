"""The benchmark scripts (``python -m bench``, the repository's bench/ directory): the runner end to end on
tiny shapes, the one GPU command's dry run, its records, the report, the command line."""

import json
import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastweedout as fw
from bench import baselines as bl
from bench import cli
from bench.baselines import BASELINE_SET
from bench.common import Record, Timing, append_jsonl, read_jsonl
from bench.engines import print_summary
from bench.report import build_report, latest_runs, scoring_markdown, training_markdown
from bench.scoring import ScoringConfig, fastest_baseline, format_table, run_scoring
from fastweedout.engines.scoring import score_population
from helpers import randomize_bn
from tolerances import FITNESS_RTOL, TOL

SAMPLE = Path(__file__).parent / "data" / "bench_results_sample.jsonl"
ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = {"device", "device_type", "peak_flops_per_s", "peak_dtype", "peak_source", "peak_bytes_per_s", "torch",
            "triton", "cuda", "python", "git_rev", "git_dirty", "date", "threads"}
COMMON_KEYS = {"bench", "preset", "run_id", "env", "load_avg_before", "load_avg_after", "status", "note",
               "precision", "flops_convention", "schema"}


@pytest.fixture
def one_thread():
    """Tiny shapes: one thread (no OpenMP barriers to stall on a loaded machine), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines and all(line.strip() for line in lines)
    return [json.loads(line) for line in lines]  # every line is one whole JSON object


def _check_common(r: dict, bench: str, preset: str) -> None:
    assert COMMON_KEYS <= set(r), COMMON_KEYS - set(r)
    assert r["bench"] == bench and r["preset"] == preset and r["schema"] == "fastweedout.bench/2"
    assert ENV_KEYS <= set(r["env"]), ENV_KEYS - set(r["env"])
    assert r["env"]["peak_flops_per_s"] > 0 and r["env"]["torch"] == torch.__version__
    assert "2 FLOPs" in r["flops_convention"]
    assert r["status"] in ("ok", "skipped", "error")


def _check_timing(t: dict) -> None:
    assert t["repeats"] == len(t["times_s"]) >= 1
    assert 0 < t["min_s"] <= t["q25_s"] <= t["median_s"] <= t["q75_s"] <= t["max_s"]


def test_all_smoke_end_to_end(tmp_path, one_thread):
    """`python -m bench all --smoke`: every benchmark runs on tiny shapes, rows are well formed, report renders."""
    assert cli.main(["all", "--smoke", "--out", str(tmp_path), "--quiet"]) == 0

    scoring = _rows(tmp_path / "scoring.jsonl")
    etas = {0.0, 0.5}
    ok = [r for r in scoring if r["status"] == "ok"]
    assert {(r["engine"], r["eta"]) for r in ok} == {(e, eta) for e in ("loop", "folded", "compact", "torch.func",
                                                                         "pruned-loop") for eta in etas}
    for r in scoring:
        _check_common(r, "scoring", "smoke")
        assert r["model"] == "wrn_10_1" and r["population"] == 3 and r["batch"] == 4
        assert r["useful_flops"] > 0 and r["executed_flops"] > 0
        if r["engine"] == "loop":  # the loop runs every member's dense network: never less than useful
            assert r["executed_flops"] >= r["useful_flops"]
    for r in ok:
        _check_timing(r["timing"])
        assert r["timing"]["cpu_median_s"] is not None  # CPU runs record process CPU time
        assert r["members_images_per_s"] == pytest.approx(3 * 4 / r["timing"]["median_s"])
        assert r["useful_flops_per_s"] == pytest.approx(r["useful_flops"] / r["timing"]["median_s"])
        assert 0 < r["useful_fraction_of_peak"] < 1
        assert r["precision"] in (("tf32", "fp32") if torch.cuda.is_available() else ("fp32",))
        if r["flops_rule"] != "pruned":  # bytes moved and the bandwidth roofline beside the FLOPs
            assert r["bytes_moved"] > 0
            assert r["bytes_per_s"] == pytest.approx(r["bytes_moved"] / r["timing"]["median_s"])
            assert 0 < r["bandwidth_fraction"] < 10
        assert r["fitness_rel_err"] < 1e-4  # every method scores the same masks as loop
        kind = "cuda_max_allocated" if torch.cuda.is_available() else "cpu_live_tensors"
        assert r["peak_mem_bytes"] > 0 and r["mem_kind"] == kind
        loop = next(x for x in ok if x["engine"] == "loop" and x["eta"] == r["eta"])
        assert r["speedup_vs_loop"] == pytest.approx(loop["timing"]["median_s"] / r["timing"]["median_s"])
        base = next(x for x in ok if x["engine"] == "pruned-loop" and x["eta"] == r["eta"])  # the only baseline
        assert r["baseline"] == "pruned-loop" and r["auto_engine"] in ("folded", "compact")
        assert r["speedup_vs_baseline"] == pytest.approx(base["timing"]["median_s"] / r["timing"]["median_s"])
    # Triton variants are recorded as skipped on CPU (the interpreter is not a benchmark)
    if not torch.cuda.is_available():
        sk = [r for r in scoring if r["status"] == "skipped"]
        assert {r["engine"] for r in sk} == {"folded-triton", "compact-triton"}
    # compact executes fewer FLOPs at eta=0.5; loop/folded execute the dense network's; the pruned
    # networks execute exactly the live sub-networks
    ex = {(r["engine"], r["eta"]): r["executed_flops"] for r in ok}
    assert ex[("compact", 0.5)] < 0.5 * ex[("folded", 0.5)]
    assert ex[("loop", 0.5)] == ex[("loop", 0.0)]
    assert all(r["executed_flops"] == r["useful_flops"] for r in ok if r["engine"] == "pruned-loop")

    training = _rows(tmp_path / "training.jsonl")
    assert {(r["eta"], r["variant"]) for r in training} == {(0.0, "dense"), (0.5, "pruned"), (0.5, "masked")}
    for r in training:
        _check_common(r, "training", "smoke")
        assert r["status"] == "ok", r["note"]
        _check_timing(r["timing"])
        assert r["images_per_s"] == pytest.approx(4 / r["timing"]["median_s"])
        assert 0 < r["mfu"] < 1 and r["compiled"] is False and r["speedup_vs_dense"] > 0
    pr = {r["variant"]: r for r in training}
    assert pr["pruned"]["params"] < pr["dense"]["params"] == pr["masked"]["params"]
    assert pr["pruned"]["useful_flops_per_image"] == pr["masked"]["useful_flops_per_image"] \
        < pr["masked"]["executed_flops_per_image"] == pr["dense"]["executed_flops_per_image"]

    pipeline = _rows(tmp_path / "pipeline.jsonl")
    assert [r["phase"] for r in pipeline] == ["search", "training", "evaluation", "total"]
    for r in pipeline:
        _check_common(r, "pipeline", "smoke")
        assert r["wall_s"] > 0 and r["flops"] > 0
    phases = pipeline[:3]
    assert sum(r["share_wall"] for r in phases) == pytest.approx(1.0)
    assert sum(r["share_flops"] for r in phases) == pytest.approx(1.0)
    assert pipeline[3]["wall_s"] == pytest.approx(sum(r["wall_s"] for r in phases))

    md = (tmp_path / "README.md").read_text()
    assert "Population scoring" in md and "Training step" in md and "Pipeline" in md
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_scoring_compile_baseline_tiny(tmp_path, one_thread):
    """The torch.compile baseline: compile time separate from the timed calls, same fitness as loop."""
    rc = cli.main(["scoring", "--smoke", "--out", str(tmp_path), "--quiet", "--etas", "0.5",
                   "--engines", "loop,folded-compile", "--populations", "2"])
    assert rc == 0
    rows = {r["engine"]: r for r in _rows(tmp_path / "scoring.jsonl") if r["status"] == "ok"}
    c = rows["folded-compile"]
    assert c["compile_s"] is not None and c["first_call_s"] > c["timing"]["median_s"]
    assert c["fitness_rel_err"] < 1e-4


def test_report_renders_from_stored_results(tmp_path):
    md, figs = build_report([SAMPLE], tmp_path)
    text = md.read_text()
    assert "## Population scoring" in text and "## Training step" in text and "## Pipeline" in text
    assert "Speedup over `loop`" in text and "| engine |" in text and "1 multiply-add = 2 FLOPs" in text
    for eng in ("loop", "folded", "compact", "torch.func"):
        assert f"| {eng} |" in text
    assert "load average (1 min)" in text
    assert {f.name.split("-")[0] for f in figs} == {"scoring", "training", "pipeline"}
    assert all(f.exists() and f.read_bytes()[:4] == b"\x89PNG" for f in figs)
    # the CLI entry renders the same file
    out2 = tmp_path / "cli"
    assert cli.main(["report", str(SAMPLE), "--out", str(out2), "--no-plots"]) == 0
    assert (out2 / "README.md").read_text().count("## ") >= 3


def test_report_keeps_latest_run_and_rejects_garbage(tmp_path):
    rows = read_jsonl([SAMPLE])
    old = [dict(r, run_id="19990101T000000Z-1") for r in rows]
    assert latest_runs(old + rows) == rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"bench": "scoring"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl([bad])
    with pytest.raises(SystemExit, match="no such results"):
        build_report([tmp_path / "missing.jsonl"], tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_full_preset_fails_clearly_without_gpu(tmp_path, capsys):
    for cmd in (["all", "--full"], ["scoring", "--full"], ["training", "--full"], ["pipeline", "--full"], ["gpu"],
                ["kernels"]):
        assert cli.main([*cmd, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "needs a CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing was run or written


def _bench(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_option_is_one_line_and_exit_2():
    for args in (["--bad-option"], ["scoring", "--bad"], ["gpu", "--skip", "nope"], ["scoring", "--repeats", "x"]):
        r = _bench(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("python -m bench"), r.stderr
        assert not r.stdout


def test_member_steps_smoke(tmp_path, one_thread):
    """`python -m bench member-steps --smoke`: both paths timed on one population, rows well formed."""
    assert cli.main(["member-steps", "--smoke", "--out", str(tmp_path), "--quiet"]) == 0
    rows = read_jsonl([tmp_path / "member_steps.jsonl"])
    assert {r["variant"] for r in rows} == {"one-at-a-time", "batched"}
    for r in rows:
        _check_common(r, "member_steps", "smoke")
        assert r["useful_flops"] > 0 and r["timing"]["median_s"] > 0 and r["max_fitness_diff"] < 1e-4
    assert [r["speedup_vs_one_at_a_time"] for r in rows if r["variant"] == "one-at-a-time"] == [1.0]


def test_no_command_runs_everything(monkeypatch):
    """`python -m bench --quick` is `all --quick`; no argument at all prints the usage."""
    seen = []
    monkeypatch.setattr(cli, "cmd_all", lambda args: seen.append(args) or 0)
    assert cli.main(["--quick", "--out", "x"]) == 0
    assert seen and seen[0].cmd == "all" and seen[0].quick and seen[0].out == "x"
    assert cli.main([]) == 0 and len(seen) == 1


def test_gpu_dry_run(tmp_path, one_thread, capsys):
    """`python -m bench gpu --dry-run`: the GPU command's steps on tiny shapes on CPU (Triton through the
    interpreter): JSONL written per step, with device, versions, git revision, precision and both roofline
    ratios, and one summary table."""
    rc = cli.main(["gpu", "--dry-run", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    steps = _rows(tmp_path / "gpu.jsonl")
    assert [r["step"] for r in steps] == ["tests", "kernels", "scoring", "training"]
    assert rc == 0, [(r["step"], r["status"], r["note"]) for r in steps]
    for r in steps:
        _check_common(r, "gpu", "gpu-dry-run")
        assert r["status"] == "ok" and r["wall_s"] > 0
    assert steps[0]["summary"]["counts"]["passed"] >= 1
    kern = _rows(tmp_path / "kernels.jsonl")
    assert {(r["op"], r["method"]) for r in kern} >= {("conv", "cudnn_grouped"), ("conv", "triton"),
                                                       ("conv", "triton_fused"), ("conv", "dense_folded"),
                                                       ("epilogue", "copy"), ("epilogue", "bn_batch")}
    for r in kern:
        _check_common(r, "kernels", "gpu-dry-run")
        assert r["status"] == "ok", r["note"]
        assert r["bandwidth_fraction"] > 0 and r["bytes_moved"] > 0
        if r["op"] == "conv":
            assert r["flops_fraction_of_peak"] > 0 and r["speedup_vs_cudnn_grouped"] > 0
    scoring = _rows(tmp_path / "scoring.jsonl")
    ok = {"loop", "folded", "compact", "folded-triton", "compact-triton", "torch.func", "folded-compile",
          "pruned-loop", "vmap-pruned", "compact-compile"} | ({"torch-pruning"} if _has_torch_pruning() else set())
    assert {r["engine"] for r in scoring if r["status"] == "ok"} == ok
    for r in scoring:
        _check_common(r, "scoring", "gpu-dry-run")
        assert r["env"]["git_rev"] and r["env"]["torch"] and r["precision"] == "fp32"
        if r["status"] == "ok":
            assert r["useful_fraction_of_peak"] > 0 and r["fitness_rel_err"] < 1e-4
            assert r["baseline"] in BASELINE_SET and r["speedup_vs_baseline"] > 0
        else:  # on a CPU: the CUDA-only baselines, with the reason (and torch-pruning where it is not installed)
            assert r["status"] == "skipped" and r["note"]
            assert r["engine"] in {"pruned-graph", "compact-max-autotune", "torch-pruning"} - ok
    training = _rows(tmp_path / "training.jsonl")
    assert {r["variant"] for r in training} == {"dense", "pruned"} and all(r["compiled"] for r in training)
    assert "== bench gpu --dry-run" in out and "compact-triton / folded" in out


def test_training_layouts_side_by_side(tmp_path, one_thread):
    """`bench training --layouts nchw,channels_last`: both layouts of every variant in one run, each row
    with its own layout and its ratio to the dense step in the same layout; the default is the layout
    training uses on the device (NCHW on a CPU)."""
    assert cli.main(["training", "--smoke", "--out", str(tmp_path / "both"), "--quiet",
                     "--layouts", "nchw,channels_last"]) == 0
    rows = _rows(tmp_path / "both" / "training.jsonl")
    keys = [(r["eta"], r["variant"], r["channels_last"]) for r in rows]
    assert sorted(keys) == sorted((eta, v, cl) for eta, v in ((0.0, "dense"), (0.5, "pruned"), (0.5, "masked"))
                                  for cl in (False, True))
    dense = {r["channels_last"]: r["timing"]["median_s"] for r in rows if r["variant"] == "dense"}
    for r in rows:
        assert r["status"] == "ok", r["note"]
        assert r["speedup_vs_dense"] == pytest.approx(dense[r["channels_last"]] / r["timing"]["median_s"])
    md = "\n".join(training_markdown(rows))
    assert "| channels_last |" in md and "| nchw |" in md
    assert cli.main(["training", "--smoke", "--out", str(tmp_path / "default"), "--quiet"]) == 0
    assert {r["channels_last"] for r in _rows(tmp_path / "default" / "training.jsonl")} == {torch.cuda.is_available()}
    with pytest.raises(ValueError, match="unknown layouts"):
        cli.main(["training", "--smoke", "--out", str(tmp_path / "bad"), "--quiet", "--layouts", "nhwc"])


def test_gpu_plan_fits_one_call(monkeypatch):
    """What the first H200 run taught (2026-12-04): the headline eta is scored first, the shares leave
    slack under a 10-minute call, and the kernels step's autotuning does not leak into the scoring step."""
    from bench import gpu
    p = gpu.plan(dry_run=False)
    assert p.scoring.etas[0] == max(p.scoring.etas) == 0.8
    assert abs(sum(p.share.values()) - 1) < 1e-9 and p.budget_s <= 450
    monkeypatch.delenv("FASTWEEDOUT_AUTOTUNE", raising=False)
    with gpu.autotuning(True):
        assert os.environ["FASTWEEDOUT_AUTOTUNE"] == "1"
    assert "FASTWEEDOUT_AUTOTUNE" not in os.environ
    monkeypatch.setenv("FASTWEEDOUT_AUTOTUNE", "0")  # a user's setting survives, also on an error
    with pytest.raises(RuntimeError), gpu.autotuning(True):
        raise RuntimeError
    assert os.environ["FASTWEEDOUT_AUTOTUNE"] == "0"


def test_append_jsonl_is_atomic_per_row(tmp_path):
    @dataclass
    class R(Record):
        payload: str = ""

    path = tmp_path / "x.jsonl"

    def writer(i):
        for j in range(40):
            append_jsonl(path, [R(bench="t", preset="p", run_id=f"{i}", env={}, load_avg_before=None,
                                  load_avg_after=None, payload="y" * (1000 * (j % 7)))])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = read_jsonl([path])
    assert len(rows) == 160 and sorted({r["run_id"] for r in rows}) == ["0", "1", "2", "3"]


def test_timing_statistics():
    t = Timing.of([3.0, 1.0, 2.0, 10.0], cpu=[1.0, 1.0, 1.0, 1.0])
    assert (t.min_s, t.median_s, t.max_s, t.repeats) == (1.0, 2.5, 10.0, 4)
    assert t.q25_s <= t.median_s <= t.q75_s and t.cpu_median_s == 1.0
    assert math.isclose(Timing.of([2.0]).median_s, 2.0)



# ------------------------------------------------------------------------------------ the baselines
def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def _single_live(model, population: int) -> fw.Masks:
    """One live node per node set, a different one per member (same live counts: layerwise shapes)."""
    out = {}
    for name, c in model.node_layers().items():
        m = torch.zeros(population, c, dtype=torch.bool)
        m[torch.arange(population), (torch.arange(population) * 3 + 1) % c] = True
        out[name] = m
    return fw.Masks(out)


def _tiny(kind: str, mode: str = "layerwise"):
    """WRN-10-1 with non-trivial BN state, 4 images of 3x8x8, P=3 masks: all live (eta=0), half off, or one
    live channel per node set."""
    model = randomize_bn(fw.create_model("wrn_10_1")).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    if kind == "single":
        return model, _single_live(model, 3), x, y
    masks = fw.sample_masks(model, 3, {"all": 0.0, "half": 0.5}[kind], mode, torch.Generator().manual_seed(1))
    return model, masks, x, y


def _baseline(name: str, model, masks, x, y, bn: str, backend: str = "aot_eager"):
    if name == "pruned-loop":
        return bl.make_pruned_loop(model, masks, x, y, bn, "loss")
    if name == "vmap-pruned":
        return bl.make_vmap_pruned(model, masks, x, y, bn, "loss", chunk=2)  # two chunks: 2 + 1 members
    if name == "torch-pruning":
        return bl.make_torch_pruning(model, masks, x, y, bn, "loss")
    if name == "pruned-graph":  # on a CPU: the static buffers replayed eagerly (the graph itself needs CUDA)
        return bl.make_pruned_graph(model, masks, x, y, bn, "loss", capture=torch.cuda.is_available())
    return bl.make_compact_compile(model, masks, x, y, bn, "loss", chunk=2, backend=backend)


@pytest.mark.parametrize("bn", ["batch", "running"])
@pytest.mark.parametrize("kind", ["all", "half", "single"])
@pytest.mark.parametrize("name", ["pruned-loop", "vmap-pruned", "torch-pruning", "pruned-graph", "compact-compile"])
def test_baseline_fitness_equals_loop(name, kind, bn, one_thread):
    """Every baseline scores the same fitness as `loop` (fp32 tolerances), at eta=0, at eta=0.5 and with
    one live channel per node set, in both BN modes; the model is left as it was."""
    if name == "torch-pruning" and not _has_torch_pruning():
        pytest.skip("torch-pruning is not installed (pip install -e '.[bench]')")
    model, masks, x, y = _tiny(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = score_population(model, masks, x, y, engine="loop", bn=bn)
    fn = _baseline(name, model, masks, x, y, bn)
    for _ in range(2):  # a second call (compiled: no recompilation needed) gives the same
        got = fn()
        atol, rtol = TOL[torch.float32]
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
        assert float((got - ref).abs().max() / ref.abs().max()) < FITNESS_RTOL
    if fn.prunes:
        assert len(fn.prune_times) == 2 and all(t > 0 for t in fn.prune_times)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compact_compile_inductor_equals_loop(one_thread):
    """compact-compile with Inductor itself (the other cases use aot_eager, which checks the traced path fast)."""
    model, masks, x, y = _tiny("half")
    ref = score_population(model, masks, x, y, engine="loop")
    got = _baseline("compact-compile", model, masks, x, y, "batch", backend="inductor")()
    torch.testing.assert_close(got, ref, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


def test_pruned_index_plan_gathers_what_prune_does():
    """pruned-graph's static-buffer gather writes exactly model.prune(member)'s state, for every member."""
    model = randomize_bn(fw.create_model("wrn_10_2"))  # width 2: a stem node set and a stage-1 projection
    masks = fw.sample_masks(model, 3, 0.6, generator=2)
    st = bl.StaticPruned(model, masks)
    idx = st.live_indices()
    for i in range(3):
        st.load(idx, i)
        want = model.prune(masks.member(i)).state_dict()
        for k, v in st.net.state_dict().items():
            assert torch.equal(v, want[k]), (i, k)


def _cfg(engines, mode="layerwise", etas=(0.5,), repeats=1, **kw) -> ScoringConfig:
    return ScoringConfig(models=["wrn_10_1"], populations=[3], etas=list(etas), batch=4, image_size=8,
                         repeats=repeats, engines=list(engines), mode=mode, memory_call=False,
                         compile_backend="aot_eager", preset="test", **kw)


def test_unavailable_baselines_are_skipped_with_the_reason(tmp_path, one_thread, monkeypatch):
    """Global sparsity (live counts differ per member): vmap-pruned and pruned-graph cannot hold one set of
    shapes; on a CPU pruned-graph and compact-max-autotune need a GPU; torch-pruning without the package."""
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # `import torch_pruning` raises ImportError
    rows = run_scoring(_cfg(["loop", "vmap-pruned", "pruned-graph", "compact-max-autotune", "torch-pruning",
                             "pruned-loop"], mode="global"), torch.device("cpu"), tmp_path / "s.jsonl", quiet=True)
    by = {r.engine: r for r in rows}
    assert by["loop"].status == by["pruned-loop"].status == "ok"
    assert by["pruned-loop"].fitness_rel_err < FITNESS_RTOL  # per-member pruning handles any live counts
    assert by["vmap-pruned"].status == "skipped" and "live counts differ" in by["vmap-pruned"].note
    assert by["torch-pruning"].status == "skipped" and "not installed" in by["torch-pruning"].note
    assert "[bench]" in by["torch-pruning"].note
    if not torch.cuda.is_available():
        assert by["pruned-graph"].status == "skipped" and "CUDA" in by["pruned-graph"].note
        assert by["compact-max-autotune"].status == "skipped" and "GPU only" in by["compact-max-autotune"].note
    on_disk = {r["engine"]: r for r in _rows(tmp_path / "s.jsonl")}
    assert on_disk["vmap-pruned"]["note"] == by["vmap-pruned"].note
    with pytest.raises(bl.Unavailable, match="one set of shapes"):  # on any device: one graph, one set of shapes
        bl.StaticPruned(*_tiny("half", mode="global")[:2])


def test_torch_pruning_that_cannot_express_the_masks_is_skipped(tmp_path, one_thread, monkeypatch):
    """If DepGraph's pruning does not give model.prune's shapes (a residual stream's shared mask not
    propagated to every convolution added into it), the row is skipped and says which tensors differ."""
    import copy
    import types

    monkeypatch.setitem(sys.modules, "torch_pruning", types.ModuleType("torch_pruning"))

    def uncoupled(model, member, example):  # prunes each block's own convolutions, not the shared stream
        net = copy.deepcopy(model)
        for blk in net.blocks():
            keep = torch.nonzero(member[blk.inner_set]).flatten()
            blk.conv1.weight = torch.nn.Parameter(blk.conv1.weight[keep])
        return net

    monkeypatch.setattr(bl, "torch_pruning_prune", uncoupled)
    rows = {r.engine: r for r in run_scoring(_cfg(["loop", "torch-pruning"]), torch.device("cpu"),
                                             tmp_path / "s.jsonl", quiet=True)}
    r = rows["torch-pruning"]
    assert r.status == "skipped" and "cannot express" in r.note and "residual stream" in r.note
    assert "pruned tensors differ from model.prune's" in r.note and ".weight" in r.note


def test_times_fastest_baseline_is_computed_from_the_fastest_baseline_row(tmp_path, one_thread, capsys):
    """Every row's `x base` = the fastest baseline's median / its own; the baseline itself reads 1.00x;
    engines that are not baselines (compact, loop) never count as the fastest; tables and the engine
    summary state it."""
    rows = run_scoring(_cfg(["loop", "compact", "pruned-loop", "vmap-pruned", "pruned-graph"], etas=(0.0, 0.5),
                            repeats=2), torch.device("cpu"), tmp_path / "s.jsonl", quiet=True)
    for eta in (0.0, 0.5):
        grp = [r for r in rows if r.eta == eta and r.status == "ok"]
        bases = [r for r in grp if r.engine in BASELINE_SET]
        fastest = min(bases, key=lambda r: r.timing["median_s"])
        by_cpu = min(bases, key=lambda r: r.timing["cpu_median_s"])  # on a CPU: also in process CPU time
        for r in grp:
            assert r.baseline == fastest.engine and r.baseline_median_s == fastest.timing["median_s"]
            assert r.speedup_vs_baseline == pytest.approx(fastest.timing["median_s"] / r.timing["median_s"])
            assert r.cpu_baseline == by_cpu.engine
            assert r.cpu_speedup_vs_baseline == pytest.approx(by_cpu.timing["cpu_median_s"] / r.timing["cpu_median_s"])
            assert 0 < r.useful_fraction_of_cpu_peak < 1.5
        assert fastest.speedup_vs_baseline == pytest.approx(1.0)
        assert f"fastest baseline: {fastest.engine}" in format_table(grp)
    capsys.readouterr()
    text = print_summary(rows)
    assert "fastest baseline: eta=0 " in text and "auto no slower than the fastest baseline" in text
    assert "pruned-graph (eta 0, 0.5): skipped" in text or torch.cuda.is_available()
    md = "\n".join(scoring_markdown([vars(r) for r in rows]))
    assert "Speedup over the fastest baseline" in md and "(vs " in md and "| x base |" in md
    # the rule alone: the lowest median among the baselines that ran, whatever ran faster outside them
    t = {k: Timing.of([v]) for k, v in {"loop": 1.0, "compact": 0.1, "pruned-loop": 0.5, "vmap-pruned": 0.3,
                                         "folded-compile": 0.05}.items()}
    assert fastest_baseline(t) == "vmap-pruned" and fastest_baseline({"loop": t["loop"]}) is None


def test_kernel_summary_picks_the_tile_table_from_the_config_rows():
    from bench.kernels import summarize

    def row(method, stage, eta, s):
        return dict(op="conv", method=method, stage=stage, eta=eta, timing=dict(median_s=s))

    rows = [row("triton_fused", 1, 0.8, 2e-4), row("triton_fused@128x64x32x4x3", 1, 0.8, 2.1e-4),
            row("triton_fused@128x64x32x4x4x2", 1, 0.8, 1e-4), row("triton_fused@64x64x32x4x4", 2, 0.4, 3e-4),
            row("triton", 1, 0.8, 1.5e-4)]
    table = summarize(rows)["conv_tile_table"]
    assert table["stage1 eta=0.8"]["config"] == "128x64x32x4x4x2"
    assert table["stage1 eta=0.8"]["speedup_vs_default"] == pytest.approx(2.0)
    assert table["stage2 eta=0.4"]["speedup_vs_default"] is None and len(table) == 2


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_scoring_layout_flag_reaches_the_rows(tmp_path, one_thread, layout):
    """The baselines run channels_last by default and in NCHW with --layout nchw; fitness unchanged."""
    rc = cli.main(["scoring", "--smoke", "--out", str(tmp_path), "--quiet", "--etas", "0.5",
                   "--engines", "loop,compact,pruned-loop", "--populations", "2", "--layout", layout])
    assert rc == 0
    rows = [r for r in _rows(tmp_path / "scoring.jsonl") if r["status"] == "ok"]
    assert rows and all(r["channels_last"] == (layout == "channels_last") for r in rows)
    assert all(r["fitness_rel_err"] < 1e-4 for r in rows)
