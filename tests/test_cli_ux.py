"""What users notice (issue 8): fast torch-free --help, loud broken commands, log lines without a TTY,
sample prompts, the CPU precision default, and one compiled-decode smoke test in the fast suite."""
from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neoformer import ModelConfig, build_model
from neoformer.cli import COMMANDS, build_parser
from neoformer.generate import generate
from neoformer.train import TrainConfig, causal_lm, fit
from neoformer.train.monitor import ProgressBar
from neoformer.train.sampling import STDLIB_PROMPTS

REPO = Path(__file__).resolve().parents[1]
fit_module = importlib.import_module("neoformer.train.fit")  # `neoformer.train.fit` the attribute is the function
# prints --help for argv, then whether torch was imported (stdout: help text, then "torch: True/False")
HELP_PROBE = """
import sys
from neoformer.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("torch:", "torch" in sys.modules)
"""


def run_python(code: str, *argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_does_not_import_torch(command):
    out = run_python(HELP_PROBE, *filter(None, [command]), "--help")
    assert "usage: neoformer" in out
    assert out.rstrip().endswith("torch: False")


def test_config_import_is_torch_free_and_package_names_resolve_lazily():
    out = run_python("import sys, neoformer.config, neoformer.train.run_config; print('torch' in sys.modules)\n"
                     "import neoformer.train.fit\n"  # the submodule must not shadow the function fit
                     "from neoformer.train import fit, TrainConfig\n"
                     "from neoformer import build_model\n"
                     "print(callable(fit), fit.__module__, build_model.__module__)")
    assert out.split() == ["False", "True", "neoformer.train.fit", "neoformer.model"]


def test_a_command_that_fails_to_import_fails_loudly(monkeypatch):
    monkeypatch.setitem(COMMANDS, "broken", "neoformer.cli._no_such_command")
    with pytest.raises(ModuleNotFoundError, match="_no_such_command"):
        build_parser()


# ---- progress: a bar on a terminal, log lines elsewhere ------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def counting_batches(batch=4, seq=8, vocab=32):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(4, vocab, (batch, seq + 1), generator=g)
        yield ids[:, :-1], ids[:, 1:]


def tiny_fit(log) -> None:
    torch.manual_seed(0)
    model = build_model("neoformer-x-debug", vocab_size=32, max_seq_len=32)
    cfg = TrainConfig(max_steps=6, log_every=2, progress=True, plot=False, eval_every=0, save_every=0,
                      device="cpu", threads=1)
    fit(model, causal_lm, counting_batches(), cfg, log=log)


def test_without_a_terminal_training_prints_one_line_per_interval(capsys):
    lines: list[str] = []
    tiny_fit(lines.append)
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out
    assert [line.split("|")[0].split() for line in lines if line.startswith("step")] == [
        ["step", "2"], ["step", "4"], ["step", "6"]]


def test_on_a_terminal_training_draws_a_progress_bar(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lines: list[str] = []
    tiny_fit(lines.append)
    assert "\r" in terminal.getvalue() and "6/6" in terminal.getvalue()
    assert not [line for line in lines if line.startswith("step")]  # the bar shows loss and tok/s instead


def test_progress_bar_only_on_a_terminal():
    cfg = TrainConfig(max_steps=3, progress=True)
    assert ProgressBar(cfg, 0, print, stream=io.StringIO()).bar is None
    bar = ProgressBar(cfg, 0, print, stream=FakeTerminal())
    assert bar.bar is not None
    bar.close()
    assert ProgressBar(cfg.replace(progress=False), 0, print, stream=FakeTerminal()).bar is None


# ---- precision auto on CPU ---------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(fit_module, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert fit_module.resolve_precision("auto", cpu) == (torch.bfloat16 if native else None)
    assert fit_module.resolve_precision("fp32", cpu) is None
    header = fit_module.describe_precision("auto", cpu)
    assert header.startswith("bf16 autocast (auto: this CPU has native bf16") if native else header == "fp32"


def test_native_bf16_is_read_from_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert fit_module.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


# ---- samples ------------------------------------------------------------------------------------
def test_sample_prompts_do_not_end_in_whitespace():
    """A byte-level BPE prompt ending in a space makes the model print 'def  main'."""
    assert STDLIB_PROMPTS and all(prompt == prompt.rstrip() for prompt in STDLIB_PROMPTS)


# ---- compiled decode in the fast suite ----------------------------------------------------------
@pytest.mark.slow  # .ci/run runs it by name after `make test`, so every CI run still compiles once
def test_compiled_decode_smoke():
    """torch.compile of the one-token decode step on a 1-layer model: ~18-22 s on a cold inductor
    cache (2 CPU cores), ~5 s warm; the thorough compiled tests are marked slow too."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_hidden=64,
                                    max_seq_len=32)).eval()
    expected = generate(model, [1, 2, 3], max_new_tokens=8)
    assert torch.equal(generate(model, [1, 2, 3], max_new_tokens=8, compile=True), expected)
