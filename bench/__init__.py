"""fastweedout's benchmarks: repository scripts, run as ``python -m bench ...`` from the repository root
(not installed). One harness (``common.py``, ``env.py``), one JSONL schema."""
