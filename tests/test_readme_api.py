"""README.md's Python API section runs as it stands, and ``fastweedout``'s public names all resolve."""

import os
import re

import fastweedout as fw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: what ``import fastweedout as fw`` must offer (issue 17)
PUBLIC = ["WideResNet", "create_model", "Masks", "sample_masks", "score_population", "random_search", "SearchConfig",
          "train", "TrainConfig", "load_dataset", "prune_at_init", "random_mask", "sample_weight_masks",
          "check_weight_masks", "member_weights", "score_weight_population", "WeightMaskedNet", "MaskedNet"]


def api_blocks() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)


def test_public_api_resolves():
    assert len(set(fw.__all__)) == len(fw.__all__)
    missing = [n for n in fw.__all__ if not hasattr(fw, n)]
    assert not missing, f"fastweedout.__all__ names what the package lacks: {missing}"
    assert not [n for n in PUBLIC if n not in fw.__all__]


def test_readme_python_api_runs_verbatim(tmp_path, monkeypatch):
    blocks = api_blocks()
    assert blocks, "README.md's Python API section has no ```python block"
    monkeypatch.chdir(tmp_path)  # it writes mask.pt
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md (Python API, block {i + 1})", "exec"), {"__name__": "__readme__"})
    assert os.path.exists(tmp_path / "mask.pt")
