"""The model-kind registry (neoformer/kinds.py): one registration is all a new kind needs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from neoformer import ConfigError, ModelConfig, kinds
from neoformer.cli import main
from neoformer.generate import generate
from neoformer.model import DecoderLM
from neoformer.parallel.apply import _forward_methods
from neoformer.planner import count_parameters, kv_cache_bytes, num_parameters, param_specs
from neoformer.train import causal_lm, fit, objective_for
from neoformer.train.batches import build_eval_batches, build_task_data, steps_for_epochs
from neoformer.train.run_config import RunConfig
from neoformer.train.sampling import print_continuations, print_samples

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=32)


class ToyDecoder(DecoderLM):
    """A decoder under a new name, with one parameter of a kind no other module has heard of."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.toy_gate = nn.Parameter(torch.ones(cfg.d_model))


@pytest.fixture
def toy_kind():
    calls: list[str] = []

    def toy_objective(model, batch):
        calls.append("objective")
        return causal_lm(model, batch)

    def toy_printer(model, task, run):
        calls.append("printer")
        print_continuations(model, task, run)

    kind = kinds.register(kinds.ModelKind(
        name="toy", model_class=ToyDecoder, objective=toy_objective,
        train_data="neoformer.train.batches:causal_lm_data",
        eval_batches="neoformer.train.batches:causal_lm_eval_batches",
        sample_printer=toy_printer, cache=kinds.CacheLayout("decoder"), forward_methods=("loss",)))
    yield kind, calls
    kinds.unregister("toy")


def test_a_kind_registered_in_one_place_trains_samples_and_plans(toy_kind, word_corpus, tmp_path, capsys,
                                                                  monkeypatch):
    kind, calls = toy_kind
    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))
    corpus = word_corpus(tmp_path / "corpus", docs=3, lines=40, words_per_line=6)
    run = RunConfig.from_dict({
        "model": {**TINY, "kind": "toy"}, "data": {"source": str(corpus)}, "tokenizer": {"kind": "char"},
        "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "samples": 1, "sample_tokens": 4,
                  "eval_every": 0, "plot": False}})
    assert run.model.causal and kinds.get(run.model) is kind

    task = build_task_data(run)  # the registered builder and objective
    assert task.objective is objective_for("toy") is kind.objective
    assert task.row_tokens == 16 and steps_for_epochs(1.0, task, run) >= 1
    x, y = next(task.train)
    assert x.shape == y.shape == (2, 16)
    assert next(iter(build_eval_batches(run, task.tokenizer)()))[0].shape[1] == 16

    model = kind.build(run.model.replace(vocab_size=task.tokenizer.vocab_size))
    assert isinstance(model, ToyDecoder) and objective_for(model) is kind.objective
    result = fit(model, task.objective, task.train, run.train, log=lambda line: None)
    assert result.step == 2 and calls.count("objective") >= 2

    print_samples(model, task, run)  # the registered printer
    assert calls[-1] == "printer" and "--- sample 1 ---" in capsys.readouterr().out
    assert generate(model, [[1, 2, 3]], 3).shape == (1, 6)  # cache layout from the registry
    assert _forward_methods(model) == ("loss",)

    # the planner reads the toy model's tree: the unknown parameter is counted, in "other"
    cfg = model.config
    assert num_parameters(cfg) == model.num_parameters()
    assert {p.name: p.shape for p in param_specs(cfg)} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert count_parameters(cfg).by_component["other"] == cfg.d_model
    with torch.no_grad():
        _, past, _ = model.eval()(torch.zeros(1, cfg.max_seq_len, dtype=torch.long))
    assert kv_cache_bytes(cfg, dtype_bytes=4) == sum(t.numel() * 4 for kv in past for t in kv)


def test_registering_a_name_twice_is_refused(toy_kind):
    kind, _ = toy_kind
    with pytest.raises(ValueError, match="'toy' is already registered"):
        kinds.register(kind)
    assert kinds.register(kind, replace=True) is kind


@pytest.mark.parametrize("which", ["seq2sek", ModelConfig, {"kind": "x"}])
def test_unknown_kind_is_one_error_line_naming_the_known_kinds(which):
    with pytest.raises(ConfigError) as err:
        ModelConfig(kind="seq2sek") if which is ModelConfig else kinds.get(which)
    message = str(err.value)
    assert "\n" not in message and "must be one of: decoder, encoder, encoder_decoder" in message
    with pytest.raises(kinds.UnknownKindError):
        objective_for("seq2sek")


def test_unknown_kind_from_the_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "kind": "seq2sek"}))
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kind ('seq2sek') must be one of: decoder, encoder, encoder_decoder" in err


def test_builtin_kinds_and_their_facts():
    assert kinds.names()[:3] == ("decoder", "encoder", "encoder_decoder")
    assert kinds.names(generating=True)[:2] == ("decoder", "encoder_decoder")
    decoder, encoder, enc_dec = (kinds.get(n) for n in ("decoder", "encoder", "encoder_decoder"))
    assert decoder.cache.generates and not encoder.cache.generates and enc_dec.cache.cross_attention
    assert not encoder.causal and enc_dec.encoder_layers and decoder.memory_layer
    for kind in (decoder, encoder, enc_dec):  # every reference resolves
        for field in ("model_class", "objective", "train_data", "eval_batches", "sample_printer"):
            assert callable(kind.load(field)), (kind.name, field)


def test_encoder_cannot_generate_says_its_kind():
    model = kinds.get("encoder").build(ModelConfig(kind="encoder", **TINY))
    with pytest.raises(ValueError, match="a model of kind 'encoder' cannot generate"):
        generate(model, [[1, 2]], 2)


def test_importing_the_registry_loads_no_train_generate_or_parallel_code():
    code = ("import sys, neoformer.kinds as k; k.get('decoder'); "
            "print(sorted(m for m in sys.modules if m.startswith(('neoformer.train', 'neoformer.generate', "
            "'neoformer.parallel'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
