"""Configs: immutable, never edited behind the caller's back, one name per concept, old checkpoints
still load, one "did you mean", one override parser, and docs/config.md lists every field."""
import dataclasses
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import pattern_batches

from neoformer import ModelConfig, build_model
from neoformer.config import ConfigError
from neoformer.generate import GenerationConfig, generate
from neoformer.generate.api import plan
from neoformer.presets import PRESETS, get_preset
from neoformer.tokenizer import get_tokenizer
from neoformer.train import TrainConfig, causal_lm, fit
from neoformer.train.run_config import DataConfig, RunConfig, TokenizerConfig, load_run_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def tok(fox_tokenizer):
    return fox_tokenizer


@pytest.fixture(scope="module")
def model(fox_model):
    return fox_model


@pytest.mark.parametrize("cfg, name", [
    (ModelConfig(), "n_layers"), (TrainConfig(), "lr"), (DataConfig(), "source"), (TokenizerConfig(), "kind"),
    (RunConfig(model=ModelConfig()), "preset"), (GenerationConfig(), "temperature"),
])
def test_configs_are_frozen(cfg, name):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, getattr(cfg, name))


def test_replace_validates_and_suggests():
    cfg = ModelConfig()
    assert dataclasses.replace(cfg, n_layers=6).n_layers == 6 and cfg.n_layers == 4
    with pytest.raises(ConfigError, match="must be divisible"):
        dataclasses.replace(cfg, n_heads=3)
    with pytest.raises(ConfigError, match=r"unknown model config field 'n_layer' \(did you mean 'n_layers'\?\)"):
        cfg.replace(n_layer=6)
    with pytest.raises(ConfigError, match=r"unknown train field 'lrr' \(did you mean 'lr'\?\)"):
        TrainConfig().replace(lrr=1e-3)
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        TokenizerConfig(vocab_size=1)  # validated when built, not only when read from YAML


def test_fit_with_gradient_checkpointing_leaves_the_preset_alone():
    """Regression: fit() set gradient_checkpointing on the shared PRESETS object, so every later
    build_model(same preset) in the process checkpointed too."""
    model = build_model("lumi-debug")
    assert model.config is PRESETS["lumi-debug"]
    cfg = TrainConfig(max_steps=1, gradient_checkpointing=True, progress=False, plot=False, eval_every=0,
                      save_every=0)
    fit(model, causal_lm, pattern_batches(), cfg, log=lambda _msg: None)
    assert model.config.gradient_checkpointing and model.decoder.cfg.gradient_checkpointing  # on for this model
    assert not PRESETS["lumi-debug"].gradient_checkpointing
    assert not build_model("lumi-debug").config.gradient_checkpointing


def test_generate_leaves_the_callers_config_alone(model, tok):
    """Regression: plan() (every generate/stream call) wrote the tokenizer's EOS into the caller's config."""
    cfg = GenerationConfig.build(max_new_tokens=4)
    p = plan(model, [[5, 6, 7]], cfg, tokenizer=tok)
    assert cfg.eos_token_id is None and p.cfg.eos_token_id == tok.eos_id
    out = generate(model, [[5, 6, 7]], tokenizer=tok, generation_config=cfg, temperature=0, return_dict=True)
    assert cfg == GenerationConfig.build(max_new_tokens=4)
    assert len(out.new_tokens[0]) <= 4
    with pytest.raises(ValueError, match="generation_config must be a GenerationConfig"):
        GenerationConfig.build(generation_config={"max_new_tokens": 3})


def test_generation_context_window_and_its_old_name(model):
    with pytest.warns(DeprecationWarning, match="max_seq_len is now context_window"):
        old = GenerationConfig.build(max_seq_len=16)
    assert old == GenerationConfig.build(context_window=16)
    with pytest.raises(ValueError, match=r"context_window \(1\) must be an integer >= 2"):
        GenerationConfig.build(context_window=1)
    x = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert torch.equal(generate(model, x, 20, context_window=8), generate(model, x, 20, max_seq_len=8))
    from neoformer.cli import build_parser
    from neoformer.cli.generate import _options

    for flag in ("--context-window", "--max-seq-len"):
        args = build_parser().parse_args(["generate", "ckpt", "--prompt", "a", flag, "16"])
        assert args.context_window == 16 and _options(args)["context_window"] == 16


def test_one_name_per_concept():
    cfg = ModelConfig(d_model=64, n_heads=4)
    assert (cfg.resolved_head_dim, cfg.resolved_n_kv_heads, cfg.resolved_ffn_hidden) == (16, 4, 256)
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=100)
    assert (cfg.resolved_head_dim, cfg.resolved_n_kv_heads, cfg.resolved_ffn_hidden) == (8, 2, 100)
    for old in ("dim_head", "kv_heads", "ffn_dim"):
        assert not hasattr(cfg, old)


def test_checkpoint_config_written_before_the_rename_loads(tmp_path):
    """config.json as `neoformer train` wrote it before this change (tests/data) loads and resumes."""
    from neoformer.checkpoint import load_checkpoint, save_checkpoint

    saved = json.loads((REPO / "tests" / "data" / "checkpoint_config_v1.json").read_text())
    model_cfg = ModelConfig.from_dict(saved["model"])
    assert (model_cfg.n_kv_heads, model_cfg.head_dim, model_cfg.ffn_hidden) == (2, 16, 96)
    save_checkpoint(tmp_path, 2, build_model(model_cfg), config={k: v for k, v in saved.items() if k != "step"})
    model, _, config = load_checkpoint(tmp_path)
    assert model.config == model_cfg and model.decoder.blocks[0].attn.k_proj.out_features == 2 * 16
    run = RunConfig.from_dict({"model": config["model"], "train": config["train"], "data": config["data"],
                               "tokenizer": config["tokenizer_config"]})
    assert run.model == model_cfg and run.train.threads == "auto" and run.tokenizer.kind == "char"


def test_did_you_mean_is_one_helper():
    cases = [
        (lambda: ModelConfig.from_dict({"n_layer": 2}), "unknown model config field 'n_layer' (did you mean 'n_layers'?)"),
        (lambda: get_preset("lumi-tiy"), "unknown preset 'lumi-tiy' (did you mean 'lumi-tiny'?)"),
        (lambda: GenerationConfig.build(temprature=1), "unknown generation option 'temprature' (did you mean 'temperature'?)"),
        (lambda: get_tokenizer("bpee", ["x"]), "unknown tokenizer 'bpee' (did you mean 'bpe'?)"),
        (lambda: RunConfig.from_dict({"trian": {}}), "unknown config section 'trian' (did you mean 'train'?)"),
        (lambda: load_run_config(preset="lumi-debug", overrides={"data.sorce": "x"}),
         "unknown data field 'sorce' (did you mean 'source'?)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value)


def test_override_parser_is_the_cli_parser():
    assert parse_overrides(["--model.n_kv_heads", "null", "--train.lr=1e-3", "--train.threads", "auto"]) == {
        "model.n_kv_heads": None, "train.lr": 1e-3, "train.threads": "auto"}
    with pytest.raises(ConfigError, match="unrecognised argument '--train.lrr'"):
        parse_overrides(["--train.lrr", "1"])
    with pytest.raises(ConfigError, match="expected one argument"):
        parse_overrides(["--train.lr"])


def _config_doc_module():
    spec = importlib.util.spec_from_file_location("gen_config_md", REPO / "docs" / "gen_config_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_config_md_lists_every_field_and_is_current():
    doc = _config_doc_module()
    assert doc.problems() == []
    assert (REPO / "docs" / "config.md").read_text() == doc.render(), "run `python docs/gen_config_md.py`"
    text = doc.render()
    for cls in (ModelConfig, GenerationConfig, TrainConfig, DataConfig, TokenizerConfig, RunConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text
