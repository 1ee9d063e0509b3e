"""``python -m neoformer.kernels``: build (or find) the CPU decode kernels and say whether they load here."""
from __future__ import annotations

import sys
import time

from .build import cache_dir, load, unavailable_reason

start = time.perf_counter()
if load():
    print(f"neoformer CPU kernels: ready in {time.perf_counter() - start:.1f} s ({cache_dir()})")
else:
    print(f"neoformer CPU kernels: not used here ({unavailable_reason()}); PyTorch's own ops run instead")
sys.exit(0)
