"""Preset run defaults: only where a preset declares them, and always shown where they apply."""
from __future__ import annotations

import json

import pytest

from neoformer.cli import main
from neoformer.presets import PRESET_RUN_DEFAULTS, PRESETS, format_run_defaults, run_defaults
from neoformer.train.run_config import RunConfig, TrainConfig, TokenizerConfig


def test_only_declared_presets_change_the_run_config():
    demo = RunConfig.from_dict({"preset": "neoformer-x-demo"})
    assert demo.train.time_budget == PRESET_RUN_DEFAULTS["neoformer-x-demo"]["train"]["time_budget"] == 180.0
    assert demo.tokenizer.vocab_size == 4096
    assert RunConfig.from_dict({"preset": "neoformer-x-demo", "train": {"lr": 1e-3}}).train.lr == 1e-3  # user wins
    for name in PRESETS:
        if name not in PRESET_RUN_DEFAULTS:
            run = RunConfig.from_dict({"preset": name})
            assert run.train == TrainConfig() and run.tokenizer == TokenizerConfig(), name
            assert run_defaults(name) == {} and format_run_defaults(name) is None


def test_info_shows_the_run_defaults(capsys):
    assert main(["info", "neoformer-x-demo"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("preset neoformer-x-demo sets: train.lr=0.002 ") and "tokenizer.vocab_size=4096" in last
    assert main(["info", "neoformer-x-demo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_defaults"] == PRESET_RUN_DEFAULTS["neoformer-x-demo"]
    assert main(["info", "lumi-debug"]) == 0
    assert "sets:" not in capsys.readouterr().out


def test_train_header_shows_the_run_defaults(tmp_path, word_corpus, capsys, monkeypatch):
    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(PRESET_RUN_DEFAULTS, "nexus-debug", {"train": {"log_every": 3}})
    corpus = word_corpus(tmp_path / "corpus", docs=3, lines=40, words_per_line=6)
    assert main(["train", "--preset", "nexus-debug", "--data", str(corpus), "--tokenizer", "char", "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--batch", "2", "--seq", "16", "--no-progress",
                 "--threads", "1", "--samples", "0", "--train.plot", "false"]) == 0
    assert "preset nexus-debug sets: train.log_every=3 (your config and flags override them)" in capsys.readouterr().out
    assert "log_every: 3" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize("name", sorted(PRESET_RUN_DEFAULTS))
def test_run_defaults_are_valid_config_fields(name):
    defaults = run_defaults(name)
    TrainConfig.from_dict(defaults.get("train", {}))
    TokenizerConfig.from_dict(defaults.get("tokenizer", {}))


def test_modern_shakespeare_preset_is_the_benchmarks_modern_recipe():
    """The preset must train what benchmarks/shakespeare.py measured as `modern` (BENCHMARKS.md)."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    from neoformer import ModelConfig

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "shakespeare.py"
    spec = importlib.util.spec_from_file_location("shakespeare_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_fields, train_fields = bench.recipe("modern")
    measured = ModelConfig(name="modern-shakespeare", vocab_size=70, d_model=128, n_layers=4, n_heads=4,
                           max_seq_len=bench.T, **model_fields)
    assert PRESETS["modern-shakespeare"] == measured
    preset_train = run_defaults("modern-shakespeare")["train"]
    expected = {"batch_size": bench.B, "seq_len": bench.T, "warmup_steps": 100, "grad_clip": 1.0, **train_fields}
    assert {k: preset_train[k] for k in expected} == expected
    assert preset_train["optimizer"] == "muon" and preset_train["precision"] == "bf16"
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= set(preset_train)
