"""AutoPatcher: put mHC into existing mlx-lm models without changing their outputs."""

from . import io
from .architectures import BlockLayout, supported_architectures
from .block import PatchedBlock
from .patcher import AutoPatcher, PatchConfig

__all__ = ["AutoPatcher", "PatchConfig", "PatchedBlock", "BlockLayout", "supported_architectures"]
