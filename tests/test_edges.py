"""Inputs validated at the edge, through the CLI: unwritable or full disks, masks and checkpoints of
another model or run, NaN/inf fitness, a diverging training. Exit 2 (bad input or disk) or 1 (a
run failed), one line on stderr, no traceback, nothing already written damaged."""

import errno
import json
import os
import shutil
import warnings

import pytest
import torch

import fastweedout.experiment.pipeline as P
import fastweedout.experiment.stages as E
from fastweedout import Masks, atomic
from fastweedout.cli import main
from fastweedout.experiment import records, runs
from fastweedout.training import checkpoint
from helpers import CLI_DATA, CLI_SEARCH, run_dirs, snapshot  # noqa: F401

T = __import__("importlib").import_module("fastweedout.training.loop")

DATA, SEARCH = CLI_DATA, CLI_SEARCH
TRAIN = ["--batch-size", "64", "--epochs", "2"]
TINY = DATA + SEARCH + TRAIN




def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], err
    return lines[0]


def finished_state(path):
    """Every file of a results directory parses: records, masks, checkpoints."""
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            assert not runs._TEMPORARY.match(f) and ".corrupt-" not in f, p
            if f == runs.RESULTS_NAME:
                records.read_jsonl(p)
            elif f.endswith(".pt") or f.endswith(".ckpt"):
                torch.load(p, map_location="cpu", weights_only=False)
            elif f in (runs.CONFIG_NAME, runs.DONE_NAME):
                json.load(open(p))


# ------------------------------------------------------------------------------------ disks
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_results_dir_by_chmod(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    res.chmod(0o555)
    try:
        assert main(["run", *TINY, "--arm", "random", "--results", str(res)]) == 2
        one_error_line(capsys, "not writable")
        assert os.listdir(res) == []
    finally:
        res.chmod(0o755)


@pytest.mark.parametrize("code,why", [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "disk full")])
def test_unwritable_results_dir_exits_2_before_any_work(tmp_path, monkeypatch, capsys, code, why):
    res = tmp_path / "res"
    res.mkdir()
    real = runs.tempfile.mkstemp

    def mkstemp(*a, **k):  # what a read-only mount or a full disk answers (also to root)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runs.tempfile, "mkstemp", mkstemp)
    assert main(["run", *TINY, "--arm", "random", "--results", str(res)]) == 2
    one_error_line(capsys, "not writable", why)
    assert os.listdir(res) == []
    monkeypatch.setattr(runs.tempfile, "mkstemp", real)


@pytest.mark.parametrize("fail_at", [3, 9])
def test_disk_full_in_the_middle_of_a_run_corrupts_nothing(tmp_path, monkeypatch, capsys, fail_at):
    ref = tmp_path / "ref"
    assert main(["run", *TINY, "--arm", "weedout", "--results", str(ref)]) == 0
    res = tmp_path / "res"
    real = os.replace
    calls = [0]

    def replace(src, dst, *a, **k):  # the disk fills up: from the fail_at-th rename on, writes fail
        calls[0] += 1
        if calls[0] >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["run", *TINY, "--arm", "weedout", "--results", str(res)]) == 2
    one_error_line(capsys, "disk full", "run the same command again")
    monkeypatch.setattr(os, "replace", real)
    finished_state(res)  # whatever was written is whole; no temporaries left
    (d,) = [n for n in os.listdir(res) if not n.startswith(".")]
    assert not os.path.exists(res / d / runs.DONE_NAME)
    assert main(["run", *TINY, "--arm", "weedout", "--results", str(res)]) == 0  # space is back: resume
    capsys.readouterr()
    got = records.strip_timing(records.read_jsonl(res / d / runs.RESULTS_NAME))
    want = records.strip_timing(records.read_jsonl(ref / d / runs.RESULTS_NAME))
    key = lambda r: json.dumps(records.record_key(r))  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)


@pytest.mark.parametrize("budget", [0, 700, 3_000, 12_000, 30_000, 60_000, 150_000, 250_000, 400_000])
def test_disk_full_at_any_size_exits_2_and_resumes(tmp_path, monkeypatch, capsys, budget):
    """Every file of a run goes through one writer; the disk fills up after `budget` bytes (wherever that
    falls: a config, a search checkpoint, a mask, records, a training checkpoint): exit 2, one line, nothing
    torn, and the same command resumes once there is space again."""
    res = tmp_path / "res"
    res.mkdir()
    real = atomic.write_all
    left = [budget]

    def write_all(fd, data):
        n = len(memoryview(data).cast("B"))
        if n > left[0]:
            os.write(fd, bytes(memoryview(data).cast("B")[:left[0]]))
            left[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        left[0] -= n
        return real(fd, data)

    monkeypatch.setattr(atomic, "write_all", write_all)
    rc = main(["run", *TINY, "--arm", "weedout", "--results", str(res)])
    monkeypatch.setattr(atomic, "write_all", real)
    if rc == 0:  # the budget was enough for the whole run
        assert budget >= 150_000
        return
    assert rc == 2
    one_error_line(capsys, "disk full")
    finished_state(res)
    assert main(["run", *TINY, "--arm", "weedout", "--results", str(res)]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------------------------ masks and checkpoints
class Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        assert main(["search", *DATA, *SEARCH, "--sparsity", "0.5", "--results", str(root / "s"),
                     "--out", str(root / "m.pt")]) == 0
    return root


def test_mask_meta_carries_the_model_config(searched):
    m = Masks.load(searched / "m.pt")
    mc = m.meta["model_config"]
    assert m.meta["model"] == "wrn_10_1" and mc["name"] == "wrn_10_1" and mc["dropout"] == 0.0
    assert mc["num_classes"] >= 2 and mc["in_channels"] >= 1 and m.meta["node_layers"]


def test_mask_of_another_model_exits_2(searched, tmp_path, capsys):
    m = Masks.load(searched / "m.pt")
    forged = tmp_path / "forged.pt"
    m.save(forged, **dict(m.meta, model="wrn_16_1"))  # fits wrn_10_1's shapes, but says it was made for another
    res = tmp_path / "res"
    assert main(["train", *DATA, *TRAIN, "--mask", str(forged), "--results", str(res)]) == 2
    one_error_line(capsys, "wrn_16_1")
    assert main(["train", *DATA, *TRAIN, "--model", "wrn_10_2", "--mask", str(searched / "m.pt"),
                 "--results", str(res)]) == 2  # the wrong model: shapes differ
    one_error_line(capsys)
    assert not res.exists()


def test_checkpoint_of_another_run_exits_2_and_is_kept(searched, tmp_path, monkeypatch, capsys):
    res = tmp_path / "res"
    assert main(["train", *DATA, *TRAIN, "--results", str(res)]) == 0  # dense: a finished run and its checkpoint
    (dense,) = os.listdir(res)
    real = E.train

    def die_after_one_epoch(*a, on_epoch=None, **k):
        def hook(rec):
            on_epoch(rec)
            raise Killed

        return real(*a, on_epoch=hook, **k)

    monkeypatch.setattr(E, "train", die_after_one_epoch)  # a masked run killed after its first epoch
    with pytest.raises(Killed):
        main(["train", *DATA, *TRAIN, "--mask", str(searched / "m.pt"), "--results", str(res)])
    monkeypatch.setattr(E, "train", real)
    capsys.readouterr()
    (given,) = [n for n in os.listdir(res) if n != dense and not n.startswith(".")]
    ck = res / given / runs.TRAIN_DIR / checkpoint.CHECKPOINT_NAME
    shutil.copyfile(res / dense / runs.TRAIN_DIR / checkpoint.CHECKPOINT_NAME, ck)  # someone copies in another run's
    os.remove(res / given / runs.TRAIN_DIR / checkpoint.PREV_NAME)
    before = snapshot(res)
    assert main(["train", *DATA, *TRAIN, "--mask", str(searched / "m.pt"), "--results", str(res)]) == 2
    one_error_line(capsys, "belongs to a different training run")
    assert snapshot(res) == before


# ------------------------------------------------------------------------------------ NaN
def _nan_head(columns):
    """build_model with NaN in some input columns of the classifier: members with such a channel live
    (compact engine: dead channels are really gone) get NaN logits, the others stay finite."""
    real = E.build_model

    def build(*a, **k):
        m = real(*a, **k)
        with torch.no_grad():
            m.fc.weight[:, columns] = float("nan")
        return m

    return build


def test_nan_fitness_members_get_minus_inf_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, "build_model", _nan_head([0]))
    res = tmp_path / "res"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["search", *DATA, "--population", "8", "--generations", "2", "--search-batch", "32",
                   "--engine", "compact", "--sparsity", "0.5", "--results", str(res)])
    assert rc == 0
    assert any("non-finite fitness" in str(w.message) for w in caught)
    (d,) = os.listdir(res)
    s = json.load(open(res / d / "summary.json"))
    fit = torch.tensor([[float("-inf") if v is None else v for v in row] for row in s["fitness"]])
    assert bool(torch.isinf(fit).any()) and bool(torch.isfinite(fit).any())
    assert all(torch.isfinite(fit[g, s["elite_index"][g]]) for g in range(2))  # a -inf member never wins


def test_all_nan_fitness_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, "build_model", _nan_head(slice(None)))
    res = tmp_path / "res"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["search", *DATA, *SEARCH, "--sparsity", "0.5", "--results", str(res)]) == 2
    one_error_line(capsys, "NaN")


def test_nan_loss_in_training_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = T.criterion
    steps = [0]

    def criterion(logits, labels, label_smoothing=0.0, reduction="mean"):
        loss = real(logits, labels, label_smoothing, reduction)
        if logits.requires_grad:  # training steps (evaluation runs without gradients)
            steps[0] += 1
            if steps[0] > 2:  # 2 steps per epoch: epoch 2 diverges
                return loss * float("nan")
        return loss

    monkeypatch.setattr(T, "criterion", criterion)
    res = tmp_path / "res"
    assert main(["run", *TINY, "--arm", "random", "--results", str(res)]) == 1
    line = one_error_line(capsys, "training diverged", "last good checkpoint (epoch 1)")
    assert "nan" in line
    (d,) = [n for n in os.listdir(res) if not n.startswith(".")]
    ck = torch.load(res / d / runs.TRAIN_DIR / checkpoint.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and not os.path.exists(res / d / runs.DONE_NAME)
    recs = records.read_jsonl(res / d / runs.RESULTS_NAME)
    assert any(r["type"] == "error" and "diverged" in r["error"] for r in recs)
    finished_state(res)


# ------------------------------------------------------------------------------------ memory safety
def test_chunk_size_is_reported(tmp_path, capsys):
    res = tmp_path / "res"
    assert main(["search", *DATA, *SEARCH, "--sparsity", "0.5", "--chunk-size", "3", "--results", str(res)]) == 0
    assert "scored in chunks of 3 members" in capsys.readouterr().out
    (d,) = os.listdir(res)
    (search,) = [r for r in records.read_jsonl(res / d / runs.RESULTS_NAME) if r.get("phase") == "search"]
    assert search["chunk_size"] == 3
    assert json.load(open(res / d / runs.DONE_NAME))["search"]["chunk_size"] == 3


def test_nan_images_are_bad_input_not_bad_members():
    import fastweedout as fw

    m = fw.WideResNet(10, 1, num_classes=4, in_channels=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    x[3, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fw.score_population(m, fw.sample_masks(m, 3, 0.5), x, y)


def test_two_experiment_processes_share_a_grid(tmp_path):
    """The second process skips the run the first one holds, takes the others, then waits for the busy
    one to finish: every run is done exactly once and both exit 0."""
    import subprocess
    import sys
    import time

    res = tmp_path / "res"
    argv = [sys.executable, "-m", "fastweedout.cli", "experiment", *TINY, "--sparsities", "0,0.5", "--arms",
            "random", "--seeds", "0,1", "--threads", "1", "--results", str(res)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    a = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)
    b = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out_a, err_a = a.communicate(timeout=300)
    out_b, err_b = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    ran = [int(o.split(" ran,")[0].split()[-1]) for o in (out_a.splitlines()[-1], out_b.splitlines()[-1])]
    assert sum(ran) == 4  # each run ran once, in one of the two processes
    dirs = [d for d in os.listdir(res) if not d.startswith(".")]
    assert len(dirs) == 4 and all(os.path.exists(res / d / runs.DONE_NAME) for d in dirs)
    assert not [d for d in dirs if os.path.exists(res / d / ".lock") or os.path.exists(res / d / ".claim")]
