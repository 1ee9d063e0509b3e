"""neoformer: build, train, evaluate, compress, serve and export transformer language models."""
from .config import ConfigError, ModelConfig
from .model import build_model
from .presets import PRESETS, get_preset

__version__ = "0.1.0"


def from_hf(path_or_model, dtype=None, **kwargs):
    """Load a local Hugging Face model folder (or a transformers model object) as a neoformer model."""
    from .hf import from_hf as _from_hf

    return _from_hf(path_or_model, dtype, **kwargs)


__all__ = ["ModelConfig", "ConfigError", "build_model", "from_hf", "PRESETS", "get_preset", "__version__"]
