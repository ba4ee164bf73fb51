"""The runtime is resolved once per process and passed down; the grid checks every run against its data
and the memory once, before the first run directory is written."""

import pytest
import torch

from fastweedout.config import DataConfig, ModelConfig, Runtime, make_run_config
from fastweedout.experiment import grid, pipeline
from fastweedout.experiment.runtime import ResolvedRuntime, environment, resolve_runtime

DATA = DataConfig("synthetic", val_size=32, synthetic=dict(train_size=96, test_size=32, image_size=8))


def test_resolved_once_and_read_through():
    rt = resolve_runtime(Runtime(device="cpu", chunk_size=3, progress=False))
    assert isinstance(rt, ResolvedRuntime) and rt.device == torch.device("cpu")
    assert rt.chunk_size == 3 and rt.progress is False and rt.settings.device == "cpu"
    assert resolve_runtime(rt) is rt  # passed down, never resolved again
    assert environment(rt.device)["device"] == "cpu"


@pytest.mark.parametrize("device, match", [("gpu", "unknown device"), ("meta", "only cpu and cuda")])
def test_a_device_this_machine_lacks_is_a_clear_error(device, match):
    with pytest.raises(ValueError, match=match):
        resolve_runtime(Runtime(device=device))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_runtime(Runtime(device="cuda:0"))


def test_the_grid_checks_each_run_once(tmp_path, monkeypatch):
    calls = {"data": 0, "resources": 0, "resolve": 0}
    real_data, real_res, real_resolve = grid.check_against_data, grid.check_resources, grid.resolve_runtime

    def count(key, fn):
        def wrapped(*a, **k):
            if key != "resolve" or not isinstance(a[0], ResolvedRuntime):  # resolving work, not a pass-through
                calls[key] += 1
            return fn(*a, **k)
        return wrapped

    for mod in (grid, pipeline):
        monkeypatch.setattr(mod, "check_against_data", count("data", real_data))
        monkeypatch.setattr(mod, "check_resources", count("resources", real_res))
        monkeypatch.setattr(mod, "resolve_runtime", count("resolve", real_resolve))
    configs = [make_run_config("l1", 0.5, data=DATA, model=ModelConfig("wrn_10_1"), seed=s, training=None)
               for s in (0, 1)]
    out = grid.run_grid(configs, tmp_path, Runtime(device="cpu", progress=False))
    assert out.ran == 2
    assert calls["data"] == calls["resources"] == 2  # once per run (prepare), not again in execute_run
    assert calls["resolve"] == 1  # run_grid; prepare and each execute_run are handed the resolved runtime
