"""Same seed, two separate processes (one with --deterministic), CPU: bitwise-identical masks,
fitness (hence order) and winner, and identical training numbers and weights."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastweedout.experiment import records, runs

pytestmark = pytest.mark.slow

ARGS = ["run", "--arm", "weedout", "--dataset", "synthetic", "--train-subset", "64", "--val-size", "32",
        "--population", "6", "--generations", "2", "--search-batch", "16", "--sparsity", "0.5", "--epochs", "2",
        "--batch-size", "16", "--seed", "3", "--device", "cpu", "--threads", "1", "--no-progress"]


def _run(results, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "fastweedout.cli", *ARGS, *extra, "--results", str(results)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (d,) = [n for n in os.listdir(results) if not n.startswith(".")]
    return os.path.join(results, d)


def test_two_processes_same_seed_bitwise_identical(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", "--deterministic")
    assert os.path.basename(a) == os.path.basename(b)  # --deterministic is not part of a run's identity
    ma = torch.load(os.path.join(a, runs.MASK_NAME), weights_only=True)
    mb = torch.load(os.path.join(b, runs.MASK_NAME), weights_only=True)
    assert ma["masks"].keys() == mb["masks"].keys()
    assert all(torch.equal(ma["masks"][k], mb["masks"][k]) for k in ma["masks"])  # the same winner
    sa, sb = ma["meta"]["search"], mb["meta"]["search"]
    assert sa["fitness"] == sb["fitness"]  # every member's fitness, bit for bit (floats round-trip exactly)
    assert sa["elite_index"] == sb["elite_index"] and sa["best_fitness"] == sb["best_fitness"]
    ra = records.strip_timing(records.read_jsonl(os.path.join(a, runs.RESULTS_NAME)))
    rb = records.strip_timing(records.read_jsonl(os.path.join(b, runs.RESULTS_NAME)))
    assert ra == rb  # training numbers per epoch, init evaluation, final
    assert [r for r in ra if r["type"] == "epoch"] and any(r["type"] == "final" for r in ra)
    ca = torch.load(os.path.join(a, runs.TRAIN_DIR, "checkpoint.pt"), weights_only=True)["model"]
    cb = torch.load(os.path.join(b, runs.TRAIN_DIR, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    da, db = (json.load(open(os.path.join(p, runs.DONE_NAME))) for p in (a, b))
    assert records.strip_timing(da)["final"] == records.strip_timing(db)["final"]
