"""neoformer: build, train, evaluate, compress, serve and export transformer language models."""
from .config import ConfigError, ModelConfig
from .presets import PRESETS, get_preset

__version__ = "0.1.0"

# Names whose modules import torch are resolved on first use (PEP 562), so that `import neoformer.config`
# and `neoformer --help` stay fast and torch-free.
_LAZY = {"build_model": "neoformer.model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'neoformer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def from_hf(path_or_model, dtype=None, **kwargs):
    """Load a local Hugging Face model folder (or a transformers model object) as a neoformer model."""
    from .hf import from_hf as _from_hf

    return _from_hf(path_or_model, dtype, **kwargs)


__all__ = ["ModelConfig", "ConfigError", "build_model", "from_hf", "PRESETS", "get_preset", "__version__"]
