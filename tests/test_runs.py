"""Run directories: config hashing (whole config, defaults included), atomic JSONL, validation."""

import dataclasses
import errno
import json
import os
import tempfile

import pytest

from fastweedout.config import DataConfig, ModelConfig, RunConfig, SearchConfig, TrainConfig, make_run_config
from fastweedout.experiment import records, runs
from fastweedout.experiment.records import RunError
from fastweedout.experiment.runs import RunDir


def base_config(**kw) -> RunConfig:
    return RunConfig(data=DataConfig("synthetic", val_size=40, train_subset=100, synthetic=dict(train_size=200)),
                     model=ModelConfig("wrn_10_1"), arm="weedout", sparsity=0.5, mode="layerwise", seed=1,
                     search=SearchConfig(population=4, batch_size=16), training=TrainConfig(epochs=2), **kw)


# A different valid value for every leaf field the mutation test visits.
_STRINGS = {("model", "name"): "wrn_16_1", ("mode",): "global", ("search", "metric"): "accuracy",
            ("search", "bn"): "running", ("search", "engine"): "loop", ("training", "schedule"): "step",
            ("granularity",): "weight"}
_NONES = {("data", "val_size"): 30, ("data", "train_subset"): 50, ("search", "batch_size"): 8,
          ("training", "compile"): False, ("training", "amp"): False, ("training", "channels_last"): True}
_SKIP = {("arm",), ("data", "name"), ("search", "strategy"), ("mask_sha256",), ("rewind",), ("prune",),
         ("throughout",)}  # structural: tested separately


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _changed(path, v):
    if path in _SKIP:
        return None
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v / 2 if v > 0 else 0.1
    if v is None:
        return _NONES.get(path)
    return _STRINGS.get(path)


def test_every_field_changes_the_hash():
    cfg = base_config()
    d = cfg.to_dict()
    h = cfg.hash
    assert len(h) == runs.HASH_CHARS and RunConfig.from_dict(json.loads(json.dumps(d))).hash == h
    visited = 0
    for path, v in _leaves(d):
        new = _changed(path, v)
        if new is None:
            assert path in _SKIP, f"no mutation for field {path}"
            continue
        m = json.loads(json.dumps(d))
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = new
        assert RunConfig.from_dict(m).hash != h, f"changing {'.'.join(path)} left the hash unchanged"
        visited += 1
    assert visited > 30  # data, synthetic, model, search, training, top-level fields


def test_defaults_are_part_of_the_hash():
    cfg = base_config()
    d = cfg.to_dict()
    # Every field is written, defaults included, so a changed default never silently aliases old runs.
    assert d["training"]["weight_decay"] == 5e-4 and d["search"]["generations"] == 5
    assert d["data"]["synthetic"]["image_size"] == 16 and d["version"] == 2
    explicit = dataclasses.replace(cfg, training=TrainConfig(epochs=2, lr=0.1, weight_decay=5e-4))
    assert explicit.hash == cfg.hash
    assert runs.config_hash({**d, "training": {k: v for k, v in d["training"].items() if k != "lr"}}) != cfg.hash
    # numbers are normalised: 0 and 0.0, 1 and 1.0 hash alike
    assert dataclasses.replace(cfg.training, lr=1).lr == 1.0
    assert dataclasses.replace(cfg, sparsity=0.5).hash == cfg.hash


def test_structural_fields_change_the_hash():
    data, model = DataConfig("synthetic"), ModelConfig()
    kw = dict(data=data, model=model, training=TrainConfig(epochs=1), seed=0)
    w, r = make_run_config("weedout", 0.5, **kw), make_run_config("random", 0.5, **kw)
    d0, d1 = make_run_config("weedout", 0.0, **kw), make_run_config("random", 0.0, **kw)
    assert d0 == d1 and d0.arm == "dense" and d0.search is None and d0.mode is None  # one dense run per seed
    assert len({w.hash, r.hash, d0.hash}) == 3
    assert make_run_config("weedout", 0.5, **{**kw, "data": DataConfig("fashion-mnist")}).hash != w.hash
    assert RunConfig.from_dict({**w.to_dict(), "training": None}).hash != w.hash  # search-only run
    k = make_run_config("weedout", 0.5, pretrain_steps=10, **kw)
    kr = make_run_config("weedout", 0.5, pretrain_steps=10, rewind=True, **kw)
    assert len({k.hash, kr.hash, w.hash}) == 3
    with pytest.raises(ValueError, match="rewind needs"):
        make_run_config("weedout", 0.5, rewind=True, **kw)
    snip = make_run_config("snip", 0.5, search=SearchConfig(population=7), **kw)
    assert snip.search is None and snip.prune is not None  # only the arm's own sub-config is kept
    assert make_run_config("throughout", 0.5, pretrain_steps=5, **kw).pretrain_steps == 0


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown dataset"):
        DataConfig("imagenet")
    with pytest.raises(ValueError, match="unknown model"):
        ModelConfig("resnet50")
    with pytest.raises(ValueError, match="depth"):
        ModelConfig("wrn_11_1")
    with pytest.raises(ValueError, match="sparsity"):
        dataclasses.replace(base_config(), sparsity=1.0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown arm"):
        make_run_config("lottery", 0.5, data=DataConfig("synthetic"), model=ModelConfig())
    with pytest.raises(ValueError, match="unknown RunConfig fields"):
        RunConfig.from_dict({**base_config().to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="dense"):
        RunConfig(arm="weedout", sparsity=0.0)
    with pytest.raises(ValueError, match="rewind needs pretrain_steps"):
        dataclasses.replace(base_config(), rewind=True)
    with pytest.raises(ValueError, match="weight granularity"):
        make_run_config("snip", 0.5, granularity="weight")
    with pytest.raises(ValueError, match="search config belongs"):
        dataclasses.replace(base_config(), arm="random")


def test_run_dir_is_named_by_the_hash_and_checked(tmp_path):
    cfg = base_config()
    rd = RunDir.open(tmp_path, cfg.name, cfg)
    assert rd.name == f"{cfg.name}-{cfg.hash}"
    assert json.load(open(rd.file("config.json"))) == cfg.to_dict()
    assert RunDir.open(tmp_path, cfg.name, cfg).path == rd.path  # re-opened, verified
    assert runs.check_results_dir(tmp_path) == str(tmp_path)
    # a hand-edited config no longer matches the name it is stored under
    d = cfg.to_dict()
    d["seed"] = 7
    with open(rd.file("config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(RunError, match="hash"):
        runs.check_results_dir(tmp_path)
    with pytest.raises(RunError, match="hash"):
        RunDir.open(tmp_path, cfg.name, cfg)


def test_results_dir_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunError, match="not a directory"):
        runs.check_results_dir(f)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(RunError, match="disk full"):
        runs.check_results_dir(tmp_path / "new")


def test_jsonl_upsert_never_duplicates_and_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "results.jsonl"
    records.upsert_jsonl(p, [dict(type="epoch", epoch=1, acc=0.1), dict(type="phase", phase="search", wall_s=1.0)])
    records.upsert_jsonl(p, [dict(type="epoch", epoch=2, acc=0.2), dict(type="epoch", epoch=1, acc=0.15)])
    recs = records.read_jsonl(p)
    assert [(r["type"], r.get("epoch")) for r in recs] == [("phase", None), ("epoch", 1), ("epoch", 2)]
    assert recs[1]["acc"] == 0.15  # replaced, not appended
    records.upsert_jsonl(p, [dict(type="final", loss=float("nan"))])
    assert records.read_jsonl(p)[-1]["loss"] is None  # JSON has no NaN
    before = p.read_bytes()

    def boom(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        records.upsert_jsonl(p, [dict(type="epoch", epoch=3)])
    assert p.read_bytes() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl"]  # and no temporary file is left


def test_corrupt_jsonl_is_reported_with_its_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"type": "epoch", "epoch": 1}\n{"type": "ep')
    with pytest.raises(RunError, match="line 2"):
        records.read_jsonl(p)


def test_lock_keeps_a_second_process_out(tmp_path):
    cfg = base_config()
    a = RunDir.open(tmp_path, cfg.name, cfg)
    b = RunDir.open(tmp_path, cfg.name, cfg)
    with a, pytest.raises(RunError, match="another process"):
        b.lock()
    with b:  # released
        pass


def test_done_marker_and_strip_timing(tmp_path):
    cfg = base_config()
    rd = RunDir.open(tmp_path, cfg.name, cfg)
    assert not rd.is_done() and rd.done_summary() is None
    rd.mark_done(dict(final=dict(test_acc=0.5, wall_time_s=3.0)))
    assert rd.is_done() and rd.done_summary()["final"]["test_acc"] == 0.5
    assert records.strip_timing([dict(a=1, wall_s=2.0, b=dict(train_time_s=1, c=2))]) == [dict(a=1, b=dict(c=2))]


def test_temporaries_left_by_a_kill_are_removed(tmp_path):
    cfg = base_config()
    rd = RunDir.open(tmp_path, cfg.name, cfg)
    os.makedirs(rd.train_dir)
    junk = [rd.file(".results.jsonl.k3j.tmp"), rd.file("mask.pt.tmp.4242"),
            os.path.join(rd.train_dir, "checkpoint.pt.tmp.77"), os.path.join(rd.train_dir, ".checkpoint.prev.x.tmp.pt")]
    keep = [rd.file("results.jsonl"), os.path.join(rd.train_dir, "checkpoint.pt")]
    for p in junk + keep:
        open(p, "w").close()
    with rd:
        assert sorted(rd.remove_temporaries()) == sorted(os.path.basename(p) for p in junk)
    assert all(os.path.exists(p) for p in keep) and not any(os.path.exists(p) for p in junk)


def test_records_stay_in_order_whatever_order_they_are_written_in(tmp_path):
    """A kill between an epoch's checkpoint and its record, then a resume that writes the later epochs
    and the totals first, must still leave the file ordered (phase, mask, epochs, totals, final)."""
    p = tmp_path / "results.jsonl"
    records.upsert_jsonl(p, [dict(type="epoch", epoch=3), dict(type="final", phase="training"),
                          dict(type="phase", phase="evaluation"), dict(type="phase", phase="training")])
    records.upsert_jsonl(p, [dict(type="epoch", epoch=1), dict(type="mask"), dict(type="phase", phase="search"),
                          dict(type="epoch", epoch=2), dict(type="phase", phase="pretrain")])
    got = [(r["type"], r.get("phase"), r.get("epoch")) for r in records.read_jsonl(p)]
    assert got == [("phase", "pretrain", None), ("phase", "search", None), ("mask", None, None), ("epoch", None, 1),
                   ("epoch", None, 2), ("epoch", None, 3), ("phase", "training", None), ("phase", "evaluation", None),
                   ("final", "training", None)]


_CREATOR = """
import os, sys, tempfile
from fastweedout.experiment import runs
d = tempfile.mkdtemp(prefix=runs.creation_prefix(sys.argv[2]), suffix=".tmp", dir=sys.argv[1])  # as RunDir.open
print(os.path.basename(d), flush=True)
if sys.argv[3] == "kill":
    os._exit(137)  # killed before the rename: no clean-up runs
sys.stdin.read()  # alive until told to go
"""


def _creator(results, target, how):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _CREATOR, str(results), target, how], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    return p, results / p.stdout.readline().strip()


def test_a_kill_while_creating_a_run_dir_leaves_nothing_after_an_immediate_rerun(tmp_path):
    """A kill between the hidden temporary directory and its rename, then the same command at once:
    the dead creator's temporary is removed (and one without a creator in its name once its run
    directory exists); a live creator's is kept until it is gone."""
    cfg = base_config()
    target = runs.run_dir_name(cfg.name, runs.to_jsonable(cfg))
    killed, dead = _creator(tmp_path, target, "kill")
    assert killed.wait(timeout=60) == 137 and dead.is_dir()
    unnamed = tmp_path / f".{target}.abc123.tmp"  # an older version's name: no creator in it
    unnamed.mkdir()
    live, alive = _creator(tmp_path, target, "wait")
    other, other_alive = _creator(tmp_path, "other-run-0123456789ab", "wait")
    try:
        runs.check_results_dir(tmp_path)  # the rerun: the results directory, then the run directory
        assert not dead.exists() and unnamed.exists() and alive.exists() and other_alive.exists()
        rd = RunDir.open(tmp_path, cfg.name, cfg)
        assert rd.name == target and os.path.exists(rd.file(runs.CONFIG_NAME))
        assert not unnamed.exists() and alive.exists() and other_alive.exists()
    finally:
        live.communicate("", timeout=60)
        other.communicate("", timeout=60)
    runs.check_results_dir(tmp_path)  # their creators are gone now
    assert sorted(os.listdir(tmp_path)) == [target]


def test_stale_creations_and_finished_runs_are_tidied(tmp_path):
    cfg = base_config()
    rd = RunDir.open(tmp_path, cfg.name, cfg)
    # a kill while another run directory was being created leaves its hidden temporary directory
    left = tmp_path / f".{rd.name}.abc123.tmp"
    left.mkdir()
    fresh = tmp_path / ".other-run-0123456789ab.xyz.tmp"  # being created right now by someone else
    fresh.mkdir()
    runs.check_results_dir(tmp_path)
    assert not left.exists() and fresh.exists()
    old = os.stat(fresh).st_mtime - 3600
    os.utime(fresh, (old, old))
    runs.check_results_dir(tmp_path)
    assert not fresh.exists()
    # a kill between the done-marker and the lock's removal leaves the lock file in a finished run
    with rd:
        rd.mark_done({})
    open(rd.file(".lock"), "w").close()
    open(rd.file(".results.jsonl.q1.tmp"), "w").close()
    rd.tidy_finished()
    assert sorted(os.listdir(rd.path)) == ["config.json", "done"]
