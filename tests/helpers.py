"""Small helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch


def pattern_batches(batch=8, seq=16, vocab=32, seed=0):
    """A learnable stream: token t+1 = (t + 1) mod vocab' from random starts (stateless generator)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab - 1, (batch, 1), generator=g)
        ids = (start + torch.arange(seq + 1)) % (vocab - 4) + 4
        yield ids[:, :-1], ids[:, 1:]


REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serving(checkpoint, max_batch: int, timeout_s: float = 60.0):
    """`neoformer serve CHECKPOINT` in a subprocess on a free 127.0.0.1 port; yields (port, process) once
    /health answers (bounded wait), then sends SIGTERM and waits for the exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "neoformer.cli", "serve", str(checkpoint), "--port", str(port),
                             "--max-batch", str(max_batch), "--threads", "1", "--model-name", "tiny",
                             "--log-level", "warning"],
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(int(timeout_s * 10)):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("server did not start: " + proc.stdout.read().decode()[-2000:])
    try:
        yield port, proc
    finally:
        proc.terminate()


MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_mc_task(folder: Path, data: Path) -> Path:
    """A local lm-eval multiple-choice task `tiny_mc` over the JSON lines file ``data``."""
    folder.mkdir(exist_ok=True)
    (folder / "tiny_mc.yaml").write_text(MC_TASK.format(data=data))
    return folder
