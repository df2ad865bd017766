"""MiMo-V2-Flash: config, NumPy reference, model, KV cache and generation."""

from .config import ConfigError, MiMoV2FlashConfig, load_config
from .model import MiMoV2FlashModel

__all__ = ["ConfigError", "MiMoV2FlashConfig", "MiMoV2FlashModel", "load_config"]
