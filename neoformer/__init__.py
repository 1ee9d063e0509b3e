"""neoformer: build, train, evaluate, compress, serve and export transformer language models."""
from .config import ConfigError, ModelConfig
from .lazy import lazy_exports
from .presets import PRESETS, get_preset

__version__ = "0.1.0"

# Names whose modules import torch are resolved on first use (PEP 562), so that `import neoformer.config`
# and `neoformer --help` stay fast and torch-free.
__getattr__, __dir__ = lazy_exports(__name__, {"build_model": "neoformer.model"})


def from_hf(path_or_model, dtype=None, **kwargs):
    """Load a local Hugging Face model folder (or a transformers model object) as a neoformer model."""
    from .hf import from_hf as _from_hf

    return _from_hf(path_or_model, dtype, **kwargs)


__all__ = ["ModelConfig", "ConfigError", "build_model", "from_hf", "PRESETS", "get_preset", "__version__"]
