"""``python -m bench ...`` from the repository root (see ``bench/cli.py``)."""

import os
import sys

if __name__ == "__main__":
    # A dry run on a machine without a GPU goes through Triton's interpreter, which must be switched on
    # before any kernel module is imported (the library itself never sets it).
    if "--dry-run" in sys.argv or "--smoke" in sys.argv:
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.cli import main

    sys.exit(main())
