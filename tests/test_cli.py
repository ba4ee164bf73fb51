"""The `fastweedout` command end to end on the synthetic set, and its answers to bad input."""

import json
import os
import subprocess

import pytest

from fastweedout.cli import main
from fastweedout.experiment import runs
from helpers import CLI_DATA, CLI_SEARCH, run_dirs, snapshot  # noqa: F401

DATA, SEARCH = CLI_DATA, CLI_SEARCH
TRAIN = ["--batch-size", "64", "--epochs", "1"]
TINY = DATA + SEARCH + TRAIN  # run and experiment take all three




def test_search_train_run_experiment_report(tmp_path, capsys):
    res = str(tmp_path / "res")
    # search alone: the winning mask and a JSON summary
    assert main(["search", *DATA, *SEARCH, "--sparsity", "0.5", "--results", res, "--out", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert "winner fitness" in out and os.path.exists(tmp_path / "m.pt")
    (search_dir,) = run_dirs(res)
    summary = json.load(open(os.path.join(res, search_dir, "summary.json")))
    assert len(summary["best_fitness"]) == 2 and summary["population"] == 4

    # train that mask (its seed comes from the file), then the dense network
    assert main(["train", *DATA, *TRAIN, "--mask", str(tmp_path / "m.pt"), "--results", res]) == 0
    assert main(["train", *DATA, *TRAIN, "--results", res]) == 0
    names = run_dirs(res)
    assert any("-given-" in n for n in names) and any("-dense-" in n for n in names)

    # run: search then train, and the random control
    assert main(["run", *TINY, "--sparsity", "0.5", "--arm", "weedout", "--results", res]) == 0
    assert main(["run", *TINY, "--sparsity", "0.5", "--arm", "random", "--results", res]) == 0
    assert "done:" in capsys.readouterr().out
    assert main(["run", *TINY, "--sparsity", "0.5", "--arm", "random", "--results", res]) == 0
    assert "already done" in capsys.readouterr().out

    # the grid: dense once per seed; the runs done above are reused
    exp = str(tmp_path / "exp")
    argv = ["experiment", *TINY, "--sparsities", "0,0.5", "--seeds", "0,1", "--results", exp]
    assert main(argv) == 0
    assert "6 runs: 6 ran" in capsys.readouterr().out
    assert len(run_dirs(exp)) == 6
    assert main(argv) == 0
    assert "0 ran, 6 already done" in capsys.readouterr().out

    # report
    assert main(["report", exp]) == 0
    for f in ("report.md", "summary.csv", "figure2.png", "curves.png"):
        assert os.path.getsize(os.path.join(exp, f)) > 0
    assert "weedout" in open(os.path.join(exp, "summary.csv")).read()


def test_console_script_in_a_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(["fastweedout", "run", *TINY, "--arm", "random", "--sparsity", "0.25", "--threads", "1",
                        "--results", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("done:") and "Traceback" not in p.stderr
    (d,) = run_dirs(tmp_path)
    assert os.path.exists(os.path.join(tmp_path, d, "done"))


@pytest.mark.parametrize("command", ["search", "train", "run", "experiment", "report", "demo", None])
def test_help_everywhere(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    assert main(argv) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A results directory with one finished run, and a mask file of another model."""
    root = tmp_path_factory.mktemp("bad")
    res = str(root / "res")
    assert main(["run", *TINY, "--arm", "random", "--sparsity", "0.5", "--results", res]) == 0
    assert main(["search", *DATA, *SEARCH, "--model", "wrn_10_2", "--sparsity", "0.5", "--results", str(root / "s"),
                 "--out", str(root / "wide.pt")]) == 0
    (root / "garbage.pt").write_bytes(b"not a mask")
    (root / "afile").write_text("x")
    return root


BAD = {
    "unknown dataset": ["run", "--dataset", "imagenet"],
    "unknown arm": ["run", *TINY, "--arm", "lottery"],
    "unknown model": ["run", *TINY, "--model", "resnet50"],
    "bad model depth": ["run", *TINY, "--model", "wrn_12_1"],
    "sparsity 1": ["run", *TINY, "--sparsity", "1"],
    "sparsity negative": ["run", *TINY, "--sparsity", "-0.1"],
    "sparsity nan": ["run", *TINY, "--sparsity", "nan"],
    "sparsity text": ["run", *TINY, "--sparsity", "half"],
    "sparsities out of range": ["experiment", *TINY, "--sparsities", "0,0.5,1.2"],
    "unknown arm in grid": ["experiment", *TINY, "--arms", "weedout,lottery"],
    "rewind without pretraining": ["run", *TINY, "--rewind"],
    "weight granularity with a pruning method": ["run", *TINY, "--arm", "snip", "--granularity", "weight"],
    "bad seeds": ["experiment", *TINY, "--seeds", "a,b"],
    "epochs 0": ["run", *TINY, "--epochs", "0"],
    "population 0": ["run", *TINY, "--population", "0"],
    "lr 0": ["run", *TINY, "--lr", "0"],
    "search at sparsity 0": ["search", *DATA, *SEARCH, "--sparsity", "0"],
    "search batch larger than the validation split": ["run", *TINY, "--search-batch", "100000"],
    "train subset larger than the training split": ["run", *TINY, "--train-subset", "10000000"],
    "missing dataset": ["run", *TINY[2:], "--dataset", "mnist", "--data-root", "{root}/nowhere"],
    "search option given to train": ["train", *DATA, "--population", "3"],
    "mask of another model": ["train", *DATA, *TRAIN, "--mask", "{root}/wide.pt"],
    "mask file that is not a mask": ["train", *DATA, *TRAIN, "--mask", "{root}/garbage.pt"],
    "missing mask file": ["train", *DATA, *TRAIN, "--mask", "{root}/missing.pt"],
    "results is a file": ["run", *TINY, "--results", "{root}/afile"],
    "unknown device": ["run", *DATA[:-2], *SEARCH, *TRAIN, "--device", "tpu"],
    "no such command": ["frobnicate"],
    "no command": [],
    "report of nothing": ["report", "{root}/nowhere"],
    "unknown option": ["run", "--frobnicate"],
    "search --out is a directory": ["search", *DATA, *SEARCH, "--out", "{root}"],
    "too many threads": ["run", *TINY, "--threads", "100000"],
    "null byte in a path": ["run", *TINY, "--results", "{root}/a\x00b"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, finished, capsys):
    argv = [a.replace("{root}", str(finished)) for a in BAD[case]]
    if "--results" not in argv and argv and argv[0] in ("run", "train", "search", "experiment"):
        argv += ["--results", str(finished / ("res" if case.startswith("search batch") else "new"))]
    before = snapshot(finished)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if argv:
        assert len(err.strip().splitlines()) == 1 and "error" in err, err
    assert snapshot(finished) == before  # nothing written, nothing overwritten
    assert not os.path.exists(finished / "new")  # not even an empty results directory


def test_tampered_results_dir_exits_2(tmp_path, capsys):
    res = tmp_path / "res"
    assert main(["run", *TINY, "--arm", "random", "--sparsity", "0.5", "--results", str(res)]) == 0
    (d,) = run_dirs(res)
    cfg = json.load(open(res / d / runs.CONFIG_NAME))
    cfg["seed"] = 9
    (res / d / runs.CONFIG_NAME).write_text(json.dumps(cfg))
    capsys.readouterr()
    before = snapshot(res)
    assert main(["run", *TINY, "--arm", "weedout", "--sparsity", "0.5", "--results", str(res)]) == 2
    assert main(["report", str(res)]) == 2
    err = capsys.readouterr().err
    assert "hash" in err and "Traceback" not in err
    assert snapshot(res) == before


def test_every_config_field_is_a_flag_declared_once():
    """The CLI is generated from the config dataclasses: every field with a flag appears on `run`
    (and as a list on `experiment`), its default is the field's default, and no flag is duplicated."""
    import argparse
    import dataclasses

    from fastweedout import flags
    from fastweedout.cli import build_parser
    from fastweedout.config import SECTIONS, RunConfig, Runtime

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = {a.dest: a for a in sub.choices["run"]._actions}
    seen = []
    for prefix, cls in [("", RunConfig), ("runtime.", Runtime)] + [(k + ".", c) for k, c in SECTIONS.items()]:
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli"):
                continue
            act = run[prefix + f.name]
            assert flags.flag_name(f) in act.option_strings and act.default == f.default, f.name
            seen.append(flags.flag_name(f))
    assert len(seen) == len(set(seen)) > 40


@pytest.mark.parametrize("command", ["run", "experiment"])
def test_search_after_steps_is_the_pretrain_steps_flag(command):
    from fastweedout.cli import build_parser

    parser = build_parser()
    a = parser.parse_args([command, "--search-after-steps", "7"])
    b = parser.parse_args([command, "--pretrain-steps", "7"])
    assert vars(a) == vars(b) and a.pretrain_steps in (7, [7])


@pytest.mark.parametrize("argv", [["--sparsities", "0.2,,0.4"], ["--seeds", "0,,1"], ["--arms", "weedout,"],
                                  ["--populations", ","], ["--seeds", "4-2"]])
def test_empty_or_bad_list_items_exit_2(argv, tmp_path, capsys):
    assert main(["experiment", *TINY, *argv, "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err and not os.path.exists(tmp_path / "r")


def test_a_population_that_cannot_fit_exits_2_before_writing(tmp_path, capsys):
    res = tmp_path / "r"
    assert main(["run", *DATA, "--population", "1000000000", *TRAIN, "--results", str(res)]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and len(err.strip().splitlines()) == 1 and not os.path.exists(res)


def test_search_strategy_flag(tmp_path, capsys):
    from fastweedout.cli import main
    base = ["search", "--dataset", "synthetic", "--model", "wrn_10_1", "--population", "4", "--generations", "2",
            "--search-batch", "16", "--sparsity", "0.5", "--results", str(tmp_path), "--no-progress"]
    assert main(base + ["--strategy", "evolution"]) == 0
    assert main(base + ["--strategy", "annealing"]) == 2
    assert "annealing" in capsys.readouterr().err


@pytest.mark.parametrize("seed_args, expected", [(["--seed", "5"], 5), (["--seed=5"], 5), (["--see", "5"], 5),
                                                 ([], 3)])
def test_train_seed_in_any_spelling_reaches_the_config(seed_args, expected, tmp_path, monkeypatch, capsys):
    """`train --mask`: a seed given in any spelling argparse accepts wins over the mask file's seed
    (3 here); without one the file's seed is used. Also for the dense network."""
    import fastweedout as fw
    from fastweedout.experiment import pipeline

    seen = []

    def fake_execute_run(cfg, *args, **kwargs):
        seen.append(cfg)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(pipeline, "execute_run", fake_execute_run)
    model = fw.create_model("wrn_10_1", num_classes=10, in_channels=1)
    fw.sample_masks(model, population=1, sparsity=0.5, generator=0).save(tmp_path / "m.pt", model="wrn_10_1", seed=3)
    res = str(tmp_path / "res")
    assert main(["train", *DATA, *TRAIN, "--mask", str(tmp_path / "m.pt"), *seed_args, "--results", res]) == 130
    assert main(["train", *DATA, *TRAIN, *seed_args, "--results", res]) == 130
    assert [c.seed for c in seen] == [expected, 0 if not seed_args else expected]


def test_one_version_pyproject_takes_it_from_the_package(capsys):
    """The version lives in fastweedout.__version__ only: pyproject declares it dynamic, read from there."""
    import fastweedout

    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastweedout.__version__"}
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastweedout {fastweedout.__version__}"
