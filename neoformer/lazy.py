"""Package names imported on first use (PEP 562), so `import neoformer` and `neoformer --help` stay torch-free."""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: each name in ``exports`` (name -> defining module) is
    imported when first looked up, then cached on the package so later lookups are plain attributes."""
    module = sys.modules[package]

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(module, name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(module)) | set(exports))

    return __getattr__, __dir__
