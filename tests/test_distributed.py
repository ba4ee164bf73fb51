"""torch.distributed: sharded scoring, DDP training, the grid over ranks (CPU, gloo, 2 processes).

Process groups are started with torch.multiprocessing (spawn, FileStore rendezvous); the grid is
run by separate processes that get their rank from the environment, as torchrun sets it, and the
killed-rank test launches the real ``torchrun --nproc-per-node 2``.
"""

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.multiprocessing as mp

import fastweedout as fw
import fastweedout.experiment.claims as D
import fastweedout.world as W
from fastweedout.config import TrainConfig
from fastweedout.data.datasets import load_dataset
from fastweedout.data.loader import DeviceLoader
from fastweedout.training.loop import criterion, lr_factor, make_optimizer, train

WORLD = 2
TIMEOUT_S = 60


# ------------------------------------------------------------------------------------ launching
def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=30))


def _entry(rank, fn, world, tmp, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _init(rank, world, os.path.join(tmp, "store"))
    try:
        out = fn(rank, *args)
        torch.save(out, os.path.join(tmp, f"out{rank}.pt"))
        # no rank tears its gloo pairs down while the other still uses them: once, a rank aborted
        # ("terminate called without an active exception") in teardown under load without this
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def launch(fn, tmp, *args, world=WORLD, timeout=TIMEOUT_S):
    """Run ``fn(rank, *args)`` on ``world`` spawned ranks in one gloo group; their return values."""
    tmp = str(tmp)
    ctx = mp.start_processes(_entry, args=(fn, world, tmp, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise AssertionError(f"the ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(tmp, f"out{r}.pt"), weights_only=False) for r in range(world)]



# ------------------------------------------------------------------------------------ helpers (no processes)
def test_shard_range_partitions():
    for n in (0, 1, 2, 5, 16, 17):
        for w in (1, 2, 3, 8):
            parts = [W.shard_range(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        W.shard_range(4, 2, 2)


def test_order_for_rank_covers_the_grid_and_starts_with_own_share():
    for n in (1, 7, 12):
        for w in (1, 2, 3):
            for r in range(w):
                order = D.order_for_rank(n, r, w)
                assert sorted(order) == list(range(n))
                own = list(range(r, n, w))
                assert order[:len(own)] == own
                assert all(i % w != r for i in order[len(own):])
    configs = ["a", "b", "c", "d", "e"]
    assert D.grid_for_rank(configs, 1, 2) == ["b", "d", "e", "c", "a"]


def test_world_and_distributed_argument_without_a_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert W.env_world() == (0, 1) and not W.is_distributed() and W.World.current() == W.World()
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert W.env_world() == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert W.env_world() == (1, 2)  # torchrun's variables win over Slurm's
    assert W.use_distributed(None) is False and W.use_distributed(False) is False
    one = W.World()
    t = torch.ones(3)
    assert one.shard(5) == (0, 5) and one.all_reduce_(t) is t and one.broadcast_object(7) == 7
    m = fw.WideResNet(10, 1, num_classes=4)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    masks = fw.sample_masks(m, 3, 0.5, generator=0)
    with pytest.raises(ValueError, match="process group"):
        fw.score_population(m, masks, x, y, distributed=True)
    with pytest.raises(ValueError, match="distributed must be"):
        fw.score_population(m, masks, x, y, distributed="yes")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="not in"):
        W.env_world()


def test_done_marker_name_matches_run_directories():
    from fastweedout.experiment import runs

    assert D.DONE_NAME == runs.DONE_NAME
    assert D.CLAIM_NAME != getattr(runs, "LOCK_NAME", None)


# ------------------------------------------------------------------------------------ claims (one process)
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_claim(run_dir, **owner):
    me = D._me()
    me.update(owner)
    with open(os.path.join(run_dir, D.CLAIM_NAME), "w") as f:
        json.dump(me, f)


def test_claim_is_exclusive_reentrant_and_respects_done(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    assert D.claim(d) and D.claim(d)  # ours, and claiming again is fine
    owner = D.claim_owner(d)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    D.release(d)
    assert D.claim_owner(d) is None
    # a live process's claim (here: this test's parent process) is respected
    _write_claim(d, pid=os.getppid(), start=D.proc_start(os.getppid()))
    assert not D.claim(d)
    os.unlink(d / D.CLAIM_NAME)
    (d / D.DONE_NAME).write_text("{}")
    assert not D.claim(d) and D.claim_owner(d) is None
    with D.claimed(d) as mine:
        assert not mine


def test_stale_claims_are_broken(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    # same host, dead pid
    _write_claim(d, pid=_dead_pid(), start=None)
    assert D.claim(d) and D.claim_owner(d)["pid"] == os.getpid()
    D.release(d)
    # same host, pid alive but reused by another process (start time differs)
    _write_claim(d, pid=os.getppid(), start="1")
    assert D.claim(d)
    D.release(d)
    # another host: unknown liveness, broken only when its heartbeat is older than stale_after
    _write_claim(d, host="elsewhere", boot_id="x", pid=1)
    assert not D.claim(d, stale_after=60)
    old = time.time() - 120
    os.utime(d / D.CLAIM_NAME, (old, old))
    assert not D.claim(d, stale_after=None)
    assert D.claim(d, stale_after=60)
    D.release(d)
    # a torn claim file (creator died between create and write) is broken once it is old
    (d / D.CLAIM_NAME).write_text("")
    assert not D.claim(d)
    os.utime(d / D.CLAIM_NAME, (old, old))
    assert D.claim(d)
    D.release(d)


# ------------------------------------------------------------------------------------ sharded scoring
def _scoring_setup(population=7):
    m = fw.WideResNet(10, 1, num_classes=4, in_channels=3)
    m.reset_parameters(torch.Generator().manual_seed(0))  # the same weights in every process
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (24,), generator=g)
    masks = fw.sample_masks(m, population, 0.5, generator=1)
    return m, masks, x, y


SEARCH = dict(config=fw.SearchConfig(population=5, generations=3, batch_size=12, engine="compact"), sparsity=0.5,
              seed=7)


def _scoring_worker(rank):
    m, masks, x, y = _scoring_setup()
    out = {}
    for engine in ("loop", "folded", "compact"):
        out[engine] = fw.score_population(m, masks, x, y, engine=engine, chunk_size=2)
    out["auto"], out["info"] = fw.score_population(m, masks, x, y, return_info=True)
    out["accuracy"] = fw.score_population(m, masks, x, y, engine="compact", metric="accuracy")
    out["one_member"] = fw.score_population(m, masks.select(3), x, y, engine="loop")  # rank 1 scores nothing
    r = fw.random_search(m, x, y, **SEARCH)
    out["search"] = (dict(r.winner.items()), r.fitness, r.elite_index)
    try:  # the ranks disagree about the batch: every rank gets an error, none hangs
        fw.score_population(m, masks, x, y if rank == 0 else y.roll(1), engine="loop")
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


def test_sharded_scoring_and_search_equal_single_process(tmp_path):
    outs = launch(_scoring_worker, tmp_path)
    m, masks, x, y = _scoring_setup()
    for engine in ("loop", "folded", "compact"):
        ref = fw.score_population(m, masks, x, y, engine=engine, chunk_size=2)
        for o in outs:
            assert o[engine].shape == (7,) and o[engine].dtype == torch.float32
            # the same members in the same chunks: bitwise equal to the single-process result
            assert torch.equal(o[engine], ref), engine
    ref_auto, ref_info = fw.score_population(m, masks, x, y, return_info=True)
    for o in outs:
        torch.testing.assert_close(o["auto"], ref_auto, atol=1e-5, rtol=1e-4)
        assert o["info"]["engine"] == ref_info["engine"]
        assert torch.equal(o["accuracy"], fw.score_population(m, masks, x, y, engine="compact", metric="accuracy"))
        assert torch.equal(o["one_member"], fw.score_population(m, masks.select(3), x, y, engine="loop"))
        assert o["mismatch"] is not None and "checksums differ" in o["mismatch"]
    r = fw.random_search(m, x, y, **SEARCH)
    for o in outs:
        winner, fitness, elite = o["search"]
        assert fw.Masks(winner) == r.winner
        assert elite == r.elite_index
        torch.testing.assert_close(fitness, r.fitness, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ DDP training
def _tiny_data():
    return load_dataset("synthetic", synthetic=dict(train_size=96, test_size=29, val_size=32, image_size=8,
                                                    channels=1, num_classes=4))


def _train_setup():
    model = fw.WideResNet(10, 1, num_classes=4, in_channels=1)
    model.reset_parameters(torch.Generator().manual_seed(0))
    mask = fw.sample_masks(model, 1, 0.5, generator=3)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, compile=False, amp=False, eval_batch_size=7,
                      channels_last=False)
    return model, mask, cfg


def _records(res):
    return [(r.epoch, r.lr, r.train_loss, r.train_acc, r.test_loss, r.test_acc) for r in res.records]


def _ddp_worker(rank, ckpt_root):
    model, mask, cfg = _train_setup()
    data = _tiny_data()
    out = {}
    steps = []
    res = train(model, mask, data, cfg, device="cpu", ddp_bn="sync", on_step=lambda s, loss: steps.append(loss),
                progress=False)
    out["sync"] = (_records(res), res.model.state_dict(), steps)
    assert all(type(mod) is torch.nn.BatchNorm2d for mod in res.model.modules()
               if isinstance(mod, torch.nn.BatchNorm2d))
    steps = []
    res = train(model, mask, data, cfg, device="cpu", ddp_bn="local", on_step=lambda s, loss: steps.append(loss),
                progress=False)
    out["local"] = (_records(res), res.model.state_dict(), steps)
    # interrupted after epoch 1 (on_epoch says stop), then resumed from the checkpoint
    ck = os.path.join(ckpt_root, "ckpt")
    first = train(model, mask, data, cfg, device="cpu", checkpoint_dir=ck, on_epoch=lambda r: r.epoch == 1,
                  progress=False)
    again = train(model, mask, data, cfg, device="cpu", checkpoint_dir=ck, progress=False)
    out["resume"] = (len(first.records), first.completed, again.resumed_from, _records(again),
                     again.model.state_dict())
    return out


def _ghost_bn_reference(model, mask, data, cfg, world):
    """Single process, per-shard BN statistics: what DDP with local BN computes (parameters and losses)."""
    net = model.prune(mask.member(0))
    net.train()
    loader = DeviceLoader(data.train, cfg.batch_size, mean=data.mean, std=data.std, shuffle=True,
                          augment=data.augment, drop_last=cfg.drop_last, seed=0)
    opt = make_optimizer(net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, len(loader)))
    losses = []
    for _ in range(cfg.epochs):
        for x, y in loader:
            b = y.shape[0]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for r in range(world):
                lo, hi = W.shard_range(b, r, world)
                s = criterion(net(x[lo:hi]), y[lo:hi], cfg.label_smoothing, reduction="sum")
                (s / b).backward()
                total += float(s.detach())
            opt.step()
            sched.step()
            losses.append(total / b)
    return losses, dict(net.named_parameters())


def _close_states(a, b, keys=None, tol=1e-4):
    for k in keys if keys is not None else a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=tol, rtol=tol, msg=k)


def test_ddp_training_matches_single_process(tmp_path):
    outs = launch(_ddp_worker, tmp_path, str(tmp_path))
    model, mask, cfg = _train_setup()
    data = _tiny_data()
    # bn="sync": the statistics of the whole global batch -> single-process training with that batch
    ref = train(model, mask, data, cfg, device="cpu", progress=False)
    ref_state = ref.model.state_dict()
    for o in outs:
        recs, state, steps = o["sync"]
        assert len(steps) == 2 * (64 // 16)
        for got, want in zip(recs, _records(ref)):
            assert got[:2] == want[:2]
            assert got[2:] == pytest.approx(want[2:], rel=1e-5, abs=1e-5)
        assert sum(steps[:4]) / 4 == pytest.approx(recs[0][2], rel=1e-6)
        _close_states(state, ref_state)  # weights and BN running statistics
    # bn="local" (standard DDP): per-rank statistics -> single-process training with per-shard BN
    ref_losses, ref_params = _ghost_bn_reference(model, mask, data, cfg, WORLD)
    for o in outs:
        recs, state, steps = o["local"]
        assert steps == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        _close_states(state, ref_params, keys=list(ref_params))
    assert outs[0]["local"][0] == outs[1]["local"][0]  # every rank reports the same records
    _close_states(outs[0]["local"][1], outs[1]["local"][1], tol=0)  # and holds the same network
    # ...and it is not single-process training with the global batch (the BN statistics differ)
    assert outs[0]["local"][2][0] != pytest.approx(outs[0]["sync"][2][0], rel=1e-6)
    # interrupted after one epoch and resumed == uninterrupted
    for o in outs:
        n_first, completed, resumed_from, recs, state = o["resume"]
        assert (n_first, completed, resumed_from) == (1, False, 1)
        for got, want in zip(recs, o["local"][0]):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
        _close_states(state, o["local"][1], tol=1e-6)


def test_train_validates_its_distributed_arguments():
    model, mask, cfg = _train_setup()
    data = _tiny_data()
    with pytest.raises(ValueError, match="ddp_bn must be"):
        train(model, mask, data, cfg, ddp_bn="global")
    with pytest.raises(TypeError):
        train(torch.nn.Linear(2, 2), mask, data, cfg)
    with pytest.raises(ValueError, match="divisible by the world size"):
        train(model, mask, data, TrainConfig(epochs=1, batch_size=15), world=W.World(0, 2))


# ------------------------------------------------------------------------------------ the grid over ranks
GRID_WORKER = textwrap.dedent("""
    import json, os, sys, time
    import fastweedout.experiment.claims as D
    from fastweedout.world import env_world

    root, n, hang = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rank, world = env_world()
    # start together (a file barrier), so that both ranks take part
    open(os.path.join(root, f"ready{rank}"), "w").close()
    while not all(os.path.exists(os.path.join(root, f"ready{r}")) for r in range(world)):
        time.sleep(0.02)

    def run(i, d):
        with open(os.path.join(d, "log"), "a") as f:
            f.write(f"start {rank} {os.getpid()}\\n")
        if hang == f"{rank}" and not os.path.exists(os.path.join(root, "hung")):
            with open(os.path.join(root, "hung"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(3600)  # killed here by the test
        time.sleep(0.05)
        with open(os.path.join(d, "log"), "a") as f:
            f.write(f"end {rank} {os.getpid()}\\n")
        with open(os.path.join(d, "done"), "w") as f:
            f.write("{}")

    runs = [os.path.join(root, f"run{i:02d}") for i in range(n)]
    for d in runs:
        os.makedirs(d, exist_ok=True)
    ran = []
    for i in D.grid_for_rank(list(range(n))):  # own share first, then steal
        with D.claimed(runs[i]) as mine:
            if mine:
                run(i, runs[i])
                ran.append(i)
    with open(os.path.join(root, f"ran{rank}.{os.getpid()}.json"), "w") as f:
        json.dump(ran, f)
""")


def _grid_env(rank=None, world=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    env["OMP_NUM_THREADS"] = "1"
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world))
    return env


def _logs(root, n):
    return [(root / f"run{i:02d}" / "log").read_text().split("\n")[:-1] for i in range(n)]


def test_grid_split_no_run_twice_none_missing(tmp_path):
    n = 12
    script = tmp_path / "worker.py"
    script.write_text(GRID_WORKER)
    root = tmp_path / "grid"
    root.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(n), "none"], env=_grid_env(r, WORLD))
             for r in range(WORLD)]
    for p in procs:
        assert p.wait(timeout=TIMEOUT_S) == 0
    ran = [json.loads(f.read_text()) for f in sorted(root.glob("ran*.json"))]
    assert len(ran) == WORLD and all(ran)  # both ranks worked
    assert sorted(sum(ran, [])) == list(range(n))  # a partition: none twice, none missing
    for i, log in enumerate(_logs(root, n)):
        assert len(log) == 2 and log[0].startswith("start") and log[1].startswith("end"), (i, log)
        assert (root / f"run{i:02d}" / "done").exists() and not (root / f"run{i:02d}" / D.CLAIM_NAME).exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun on PATH")
def test_killed_rank_runs_are_finished_by_a_rerun(tmp_path):
    n = 6
    script = tmp_path / "worker.py"
    script.write_text(GRID_WORKER)
    root = tmp_path / "grid"
    root.mkdir()
    cmd = ["torchrun", "--standalone", "--nproc-per-node", str(WORLD), "--max-restarts", "0", str(script), str(root),
           str(n)]  # (--standalone: a free port, so concurrent test runs do not collide)
    job = subprocess.Popen(cmd + ["1"], env=_grid_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        hung = root / "hung"
        deadline = time.monotonic() + TIMEOUT_S
        # rank 1 hangs in its first run; rank 0 does every other run (stealing the rest of rank 1's share)
        while not (hung.exists() and list(root.glob("ran0.*.json"))):
            assert time.monotonic() < deadline and job.poll() is None, "the first job did not get going"
            time.sleep(0.1)
        victim = int(hung.read_text())
        os.kill(victim, signal.SIGKILL)
        assert job.wait(timeout=TIMEOUT_S) != 0  # torchrun reports the failed rank
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    logs = _logs(root, n)
    unfinished = [i for i in range(n) if not (root / f"run{i:02d}" / "done").exists()]
    assert unfinished == [1]  # rank 1's first run: claimed by the dead rank, left behind
    assert D.claim_owner(root / "run01")["pid"] == victim
    assert logs[1] == [f"start 1 {victim}"]

    for f in root.glob("ready*"):
        f.unlink()
    rerun = subprocess.run(cmd + ["none"], env=_grid_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=TIMEOUT_S)
    assert rerun.returncode == 0
    logs = _logs(root, n)
    for i in range(n):
        assert (root / f"run{i:02d}" / "done").exists()
        ends = [line for line in logs[i] if line.startswith("end")]
        assert len(ends) == 1, (i, logs[i])  # finished exactly once
    assert len(logs[1]) == 3  # the killed attempt, then the re-run's
    assert not list(root.glob(f"run*/{D.CLAIM_NAME}"))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun on PATH")
def test_experiment_grid_under_torchrun(tmp_path):
    import re

    res = tmp_path / "results"
    cmd = ["torchrun", "--standalone", "--nproc-per-node", str(WORLD), "-m", "fastweedout.cli", "experiment",
           "--dataset", "synthetic", "--train-subset", "64", "--val-size", "32", "--model", "wrn_10_1",
           "--population", "4", "--generations", "2", "--search-batch", "16", "--epochs", "1", "--batch-size", "16",
           "--sparsities", "0,0.5", "--seeds", "0,1", "--results", str(res), "--no-progress", "--threads", "1"]
    out = subprocess.run(cmd, env=_grid_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    ran = [int(n) for n in re.findall(r"(\d+) ran\b", out.stdout)]
    assert len(ran) == WORLD and sum(ran) == 6, out.stdout  # 6 runs, each done by exactly one rank
    dirs = [d for d in res.iterdir() if not d.name.startswith(".")]
    assert len(dirs) == 6 and all((d / "done").exists() and not (d / D.CLAIM_NAME).exists() for d in dirs)
