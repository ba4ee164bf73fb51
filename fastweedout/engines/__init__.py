"""Population scoring engines: backends of ``WideResNet.walk`` that run many masked members at once."""

from .compact import CompactBackend
from .folded import FoldedBackend

__all__ = ["FoldedBackend", "CompactBackend"]
