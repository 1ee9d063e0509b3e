"""Small helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import torch


def pattern_batches(batch=8, seq=16, vocab=32, seed=0):
    """A learnable stream: token t+1 = (t + 1) mod vocab' from random starts (stateless generator)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab - 1, (batch, 1), generator=g)
        ids = (start + torch.arange(seq + 1)) % (vocab - 4) + 4
        yield ids[:, :-1], ids[:, 1:]
