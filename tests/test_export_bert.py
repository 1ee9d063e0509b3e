"""BERT-shaped encoders <-> transformers' ``BertForMaskedLM``, both ways, logits within 1e-5.

neoformer's encoder is BERT-shaped with learned positions, post-norm LayerNorm, biases, a GELU
FFN, ``embed_norm``, ``mlm_transform`` and ``head_bias``; such a model exports as the stock class
(no custom code) and a BERT folder imports as one (token type 0 folded into the positions).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neoformer import build_model  # noqa: E402
from neoformer.checkpoint import load_checkpoint  # noqa: E402
from neoformer.cli import main  # noqa: E402
from neoformer.config import ModelConfig  # noqa: E402
from neoformer.export import export  # noqa: E402
from neoformer.planner import count_parameters  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
BERT_SHAPED = dict(kind="encoder", vocab_size=96, d_model=32, n_layers=2, n_heads=4, ffn_hidden=40,
                   activation="gelu", norm="layernorm", norm_position="post", norm_eps=1e-12, bias=True,
                   position="learned", max_seq_len=32, embed_norm=True, mlm_transform=True, head_bias=True,
                   pad_token_id=0)


def _randomized(model, seed=0):
    """Every parameter random (biases and LayerNorms too), so a swapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _ids_and_mask():
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -3:] = 0
    return ids, mask


@pytest.mark.parametrize("tied, act", [(True, "gelu"), (False, "relu")])
def test_bert_folder_imports_with_matching_logits(tied, act, tmp_path):
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=40, max_position_embeddings=32, type_vocab_size=2,
                                     hidden_act=act, tie_word_embeddings=tied)
    hf = _randomized(transformers.BertForMaskedLM(config))
    hf.save_pretrained(tmp_path / "bert")
    assert main(["import", str(tmp_path / "bert"), "--out", str(tmp_path / "ck")]) == 0
    ours, _, _ = load_checkpoint(tmp_path / "ck")
    assert ours.config.embed_norm and ours.config.mlm_transform and ours.config.norm_position == "post"
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(mine[keep], theirs[keep], atol=1e-5, rtol=1e-5)


def test_bert_shaped_encoder_exports_as_stock_bert_and_back_bit_identical(tmp_path, capsys):
    from neoformer.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = _randomized(build_model(ModelConfig(**BERT_SHAPED)))
    result = export(model, tmp_path / "hf", "hf")
    assert result.max_diff <= 1e-5 and "BertForMaskedLM" in result.checked
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and "auto_map" not in config
    assert not (tmp_path / "hf" / "modeling_neoformer.py").exists()
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        keep = mask.bool()
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[keep],
                                   model(ids, attention_mask=mask)[keep], atol=1e-5, rtol=1e-5)
    ckpt = save_checkpoint(tmp_path / "run", 1, model)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf2")]) == 0
    assert main(["import", str(tmp_path / "hf2"), "--out", str(tmp_path / "back")]) == 0
    back, _, _ = load_checkpoint(tmp_path / "back")
    assert model.state_dict().keys() == back.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name


def test_an_encoder_that_is_not_bert_shaped_gets_custom_code(tmp_path):
    model = _randomized(build_model(ModelConfig(**{**BERT_SHAPED, "mlm_transform": False})))
    export(model, tmp_path / "hf", "hf")
    assert "auto_map" in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_planner_counts_the_bert_parts():
    cfg = ModelConfig(**BERT_SHAPED)
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in build_model(cfg).parameters())
    assert counts.by_component["embedding_norm"] == 2 * 32
    assert counts.by_component["mlm_transform"] == 32 * 32 + 32 + 2 * 32
    assert "other" not in counts.by_component


# ---- sharded safetensors -------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["nexus-debug", "neobert-debug"])  # stock class, custom code
def test_sharded_export_loads_in_transformers_and_imports_back(preset, tmp_path, capsys):
    from neoformer.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(preset, vocab_size=96).eval()
    ckpt = save_checkpoint(tmp_path / "run", 1, model)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--max-shard-size", "20KB"]) == 0
    assert "verified" in capsys.readouterr().out  # transformers loaded the shards (verification)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "hf" / "model.safetensors").exists()
    assert all((tmp_path / "hf" / s).stat().st_size <= 20_000 + 1024 or len(
        [k for k, v in index["weight_map"].items() if v == s]) == 1 for s in shards)  # +header; or one big tensor
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, _, _ = load_checkpoint(tmp_path / "back")
    for name, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name


def test_shard_index_must_stay_inside_the_folder_and_sizes_must_parse(tmp_path, capsys):
    torch.manual_seed(0)
    export(build_model("nexus-debug", vocab_size=96), tmp_path / "hf", "hf", max_shard_size="20KB", verify=False)
    index_file = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    (tmp_path / "model-escape.safetensors").write_bytes((tmp_path / "hf" / index["weight_map"][first]).read_bytes())
    index["weight_map"][first] = "../model-escape.safetensors"
    index_file.write_text(json.dumps(index))
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "outside the model folder" in err, err
    ckpt_model = build_model("nexus-debug", vocab_size=96)
    for size, message in (("12 parsecs", "give a size such as"), ("0", "must be positive")):
        with pytest.raises(ValueError, match=message):
            export(ckpt_model, tmp_path / "x", "hf", max_shard_size=size)
    with pytest.raises(ValueError, match="use it with --format hf"):
        export(ckpt_model, tmp_path / "x", "onnx", max_shard_size="1GB")
    assert not (tmp_path / "x").exists()
