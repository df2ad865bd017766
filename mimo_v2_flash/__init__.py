"""MiMo-V2-Flash: config, NumPy reference, model, KV cache and generation.

The names below are imported on first use (PEP 562), so `import mimo_v2_flash` stays cheap: the
model pulls in NumPy, and checkpoints ml_dtypes and safetensors (~0.5 s), only when used.
"""

from importlib import import_module

_EXPORTS = {"ConfigError": ".config", "MiMoV2FlashConfig": ".config", "load_config": ".config",
            "MiMoV2FlashModel": ".model"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
