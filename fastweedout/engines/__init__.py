"""Population scoring engines: backends of ``WideResNet.walk`` that run many masked members at once."""

from fastweedout.engines.compact import PAD_MULTIPLE, CompactBackend, pad_multiple
from fastweedout.engines.folded import FoldedBackend

__all__ = ["FoldedBackend", "CompactBackend", "PAD_MULTIPLE", "pad_multiple"]
