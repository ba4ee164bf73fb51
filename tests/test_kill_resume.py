"""Kill anywhere, lose nothing: `fastweedout experiment` SIGKILLed at >= 20 random moments (during the
search, the training and the writing of files), re-run with the same arguments until it finishes,
gives exactly the results of an uninterrupted run.

Cost control: the uninterrupted reference is one real `python -m fastweedout.cli` process; the
interrupted attempts are forked from a "zygote" process that has imported torch and fastweedout
once, so each attempt costs only its work (a fraction of a second), not a 5-10 s interpreter start.
The zygote makes every ``os.replace`` wait a few milliseconds first, so that a good share of the kill
moments fall between a temporary file being written and its rename (the window atomicity is about).
"""

import json
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch

from fastweedout.experiment import records, runs

pytestmark = pytest.mark.slow

ARGS = ["experiment", "--dataset", "synthetic", "--train-subset", "64", "--val-size", "32", "--model", "wrn_10_1",
        "--population", "4", "--generations", "3", "--search-batch", "16", "--epochs", "2", "--batch-size", "16",
        "--sparsities", "0.4,0.8", "--arms", "weedout,random", "--seeds", "0", "--device", "cpu", "--threads", "1",
        "--no-progress"]
MIN_KILLS = 20
MAX_KILLS = 80
SLOW_REPLACE_S = 0.01
PHASES = {"search", "training", "writing"}

ZYGOTE = r"""
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # pays torch._dynamo's lazy import once, here
import fastweedout.cli as C
import fastweedout.experiment.pipeline, fastweedout.experiment.grid, fastweedout.training.loop
import fastweedout.search.weedout, fastweedout.analysis.report
slow = float(sys.argv[1])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        rc = 99
        try:
            real = os.replace
            def slow_replace(*a, **k):
                time.sleep(slow)  # widen the window between a temporary's write and its rename
                return real(*a, **k)
            os.replace = slow_replace
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            rc = C.main(req["argv"])
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)
    delay = req.get("kill_after")
    while True:
        r, status = os.waitpid(pid, os.WNOHANG)
        if r:
            break
        if delay is not None and time.monotonic() - t0 >= delay:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    print(json.dumps({"killed": os.WIFSIGNALED(status), "rc": os.waitstatus_to_exitcode(status),
                      "elapsed": time.monotonic() - t0}), flush=True)
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


class Zygote:
    def __init__(self, tmp_path):
        script = tmp_path / "zygote.py"
        script.write_text(ZYGOTE)
        self.log = str(tmp_path / "attempts.log")
        self.p = subprocess.Popen([sys.executable, str(script), str(SLOW_REPLACE_S)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=_env())
        assert json.loads(self.p.stdout.readline())["ready"]

    def attempt(self, results, kill_after=None) -> dict:
        self.p.stdin.write(json.dumps({"argv": ARGS + ["--results", str(results)], "kill_after": kill_after,
                                       "log": self.log}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


def run_dirs(results):
    return sorted(d for d in os.listdir(results) if not d.startswith(".") and os.path.isdir(os.path.join(results, d)))


def state_at_kill(results) -> set[str]:
    """Which phases the kill interrupted, read off what it left on disk."""
    hit = set()
    if not os.path.isdir(results):
        return hit
    if any(n.startswith(".") and ".tmp" in n for n in os.listdir(results)):
        hit.add("writing")  # a run directory being created
    for d in run_dirs(results):
        p = os.path.join(results, d)
        for sub in (p, os.path.join(p, runs.TRAIN_DIR)):
            if os.path.isdir(sub) and any(runs._TEMPORARY.match(n) for n in os.listdir(sub)):
                hit.add("writing")
        if os.path.exists(os.path.join(p, runs.DONE_NAME)):
            continue
        if os.path.exists(os.path.join(p, runs.MASK_NAME)):
            hit.add("training")
        elif "-weedout-" in d:
            hit.add("search")
    return hit


def outputs(results) -> dict:
    """Everything that must be identical, per run directory: the records without their timings (and
    never a duplicated key), the mask, the done summary without timings, the trained weights."""
    out = {}
    for d in run_dirs(results):
        p = os.path.join(results, d)
        names = [n for _, _, files in os.walk(p) for n in files]
        assert not [n for n in names if ".corrupt-" in n], (d, names)  # nothing was ever found torn
        assert not [n for n in names if runs._TEMPORARY.match(n)], (d, names)  # no temporaries left behind
        recs = records.read_jsonl(os.path.join(p, runs.RESULTS_NAME))  # every line parses: none torn
        keys = [records.record_key(r) for r in recs]
        assert len(keys) == len(set(keys)), d  # none duplicated
        mask = torch.load(os.path.join(p, runs.MASK_NAME), weights_only=True)["masks"]
        done = json.load(open(os.path.join(p, runs.DONE_NAME)))
        ck = torch.load(os.path.join(p, runs.TRAIN_DIR, "checkpoint.pt"), map_location="cpu", weights_only=True)
        out[d] = dict(records=sorted(records.strip_timing(recs), key=lambda r: json.dumps(records.record_key(r))),
                      mask={k: v.tolist() for k, v in mask.items()},
                      done=records.strip_timing(done),
                      weights=dict(ck["model"].items()))
    return out


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for d in want:
        g, w = got[d], want[d]
        assert g["records"] == w["records"], d
        assert g["mask"] == w["mask"], d
        assert g["done"] == w["done"], d
        assert g["weights"].keys() == w["weights"].keys()
        for k in w["weights"]:
            assert torch.equal(g["weights"][k], w["weights"][k]), (d, k)  # bitwise


def test_sigkill_at_random_moments_then_rerun_gives_identical_results(tmp_path):
    # 1. the uninterrupted reference: the real command in its own process
    ref = tmp_path / "reference"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fastweedout.cli", *ARGS, "--results", str(ref)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"4 runs: 4 ran, 0 already done, 0 failed", out.stdout), out.stdout
    want = outputs(ref)
    assert len(want) == 4 and time.monotonic() - t0 < 300

    zyg = Zygote(tmp_path)
    try:
        # 2. an uninterrupted attempt from the zygote: the same results, and how long the whole grid takes
        warm = tmp_path / "uninterrupted"
        r = zyg.attempt(warm)
        assert r["rc"] == 0 and not r["killed"]
        assert_same(outputs(warm), want)
        duration = r["elapsed"]

        # 3. kill at random moments, re-run until done, in fresh results directories ("chains")
        rng = random.Random(20240312)
        kills, hit, chains, attempts = 0, set(), 0, 0
        results = None
        while kills < MIN_KILLS or not PHASES <= hit:
            assert kills < MAX_KILLS, f"{kills} kills covered only {sorted(hit)}"
            if results is None:
                chains += 1
                results = tmp_path / f"chain{chains}"
            r = zyg.attempt(results, kill_after=rng.uniform(0.0, duration))
            attempts += 1
            if r["killed"]:
                kills += 1
                hit |= state_at_kill(results)
                continue
            assert r["rc"] == 0, open(zyg.log).read()[-3000:]
            assert_same(outputs(results), want)  # a chain of killed attempts finished: identical
            results = None
        if results is not None:  # finish the last chain without a kill
            r = zyg.attempt(results)
            assert r["rc"] == 0 and not r["killed"], open(zyg.log).read()[-3000:]
            assert_same(outputs(results), want)
        # a finished grid is not redone: the next attempt only reports
        before = {d: os.stat(results / d / runs.DONE_NAME).st_mtime_ns for d in run_dirs(results)}
        r = zyg.attempt(results)
        assert r["rc"] == 0
        assert before == {d: os.stat(results / d / runs.DONE_NAME).st_mtime_ns for d in run_dirs(results)}
    finally:
        zyg.close()
    assert kills >= MIN_KILLS and PHASES <= hit
    print(f"{kills} kills in {attempts} attempts over {chains} chains; phases hit {sorted(hit)}; "
          f"uninterrupted grid {duration:.2f} s")
