"""load_checkpoint: one loader for every command; refuses wrong kinds and contents with one line."""
from __future__ import annotations

import json

import pytest
import torch

from neoformer import build_model
from neoformer import checkpoint as ckpt
from neoformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("lumi-debug")
    path = save_checkpoint(tmp_path / "ck", 1, model)
    return path, model


def _set_contents(path, contents):
    config = json.loads((path / "config.json").read_text())
    config["contents"] = contents
    (path / "config.json").write_text(json.dumps(config))  # config.json may be edited (not in the manifest check)


def test_loads_model_config_and_places_dtype(saved):
    path, model = saved
    loaded, tokenizer, config = load_checkpoint(path)
    assert tokenizer is None and config["model"]["kind"] == "decoder" and not loaded.training
    x = torch.randint(0, model.config.vocab_size, (1, 5))
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0], rtol=0, atol=0)
    half, _, _ = load_checkpoint(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_refuses_a_kind_the_command_cannot_use(saved):
    with pytest.raises(CheckpointError, match=r"kind 'decoder'; fill-mask needs encoder$"):
        load_checkpoint(saved[0], kinds=("encoder",), command="fill-mask")


def test_contents_pick_their_registered_loader_and_unknown_ones_are_refused(saved, monkeypatch):
    path, model = saved
    _set_contents(path, "toy")
    with pytest.raises(CheckpointError, match="'toy' contents, which this neoformer does not know"):
        load_checkpoint(path)
    calls = []

    def toy_loader(where, config, *, device=None, dtype=None):
        calls.append((where, config["contents"], device, dtype))
        return build_model("lumi-debug"), None

    monkeypatch.setitem(ckpt.CONTENTS_LOADERS, "toy", toy_loader)
    loaded, _, config = load_checkpoint(path, device="cpu")
    assert calls == [(path, "toy", "cpu", None)] and config["contents"] == "toy"
    with pytest.raises(CheckpointError, match="holds a toy checkpoint; merge takes adapter ones"):
        load_checkpoint(path, contents=("adapter",), command="merge")


def test_a_contents_loader_that_is_not_installed_is_one_line(saved, monkeypatch):
    path, _ = saved
    _set_contents(path, "toy")
    monkeypatch.setitem(ckpt.CONTENTS_LOADERS, "toy", "neoformer.no_such_module:load")
    with pytest.raises(CheckpointError, match="cannot load toy checkpoints"):
        load_checkpoint(path)
