"""DoRA (``--lora dora=true``): zero-init, merge, gradients, peft parity both ways, a CLI run."""
from __future__ import annotations

import pytest
import torch

from neoformer.checkpoint import load_checkpoint, read_config, save_single_checkpoint
from neoformer.cli import main
from neoformer.finetune import AdapterModel, LoraConfig, LoraLinear, add_lora, load_adapter, merge_lora
from test_finetune import (KIND_CASES, _train, base_checkpoint, chat_data, logits_of,  # noqa: F401
                           our_adapter_in_peft, tiny, tokenizer)

CASES = {name: KIND_CASES[name] for name in ("decoder", "decoder-fused-qkv", "encoder", "encoder_decoder")}


def randomize_dora(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.weight.copy_(0.1 * torch.randn(module.lora_B.weight.shape, generator=gen))
                magnitude = module.lora_magnitude_vector
                magnitude.mul_(1 + 0.2 * torch.randn(magnitude.shape, generator=gen))
    return model


@pytest.mark.parametrize("case", CASES)
def test_zero_init_dora_leaves_logits_unchanged_and_merge_equals_unmerged(case):
    model = tiny(**CASES[case])
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        before = logits_of(model, x)
        add_lora(model, LoraConfig(r=4, dora=True, targets=("q", "v", "o", "down")))
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        assert layers and all(m.lora_magnitude_vector.shape == (m.lora_B.weight.shape[0],) for m in layers)
        torch.testing.assert_close(logits_of(model.eval(), x), before, rtol=0, atol=0)  # m = ||W||, B = 0
        adapted = logits_of(randomize_dora(model), x)
        assert (adapted - before).abs().max() > 1e-3
        merged = logits_of(merge_lora(model), x)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_dora_layer_is_the_papers_formula_in_float64():
    layer = torch.nn.Linear(12, 6, dtype=torch.float64)
    dora = randomize_dora(torch.nn.Sequential(LoraLinear(layer, LoraConfig(r=3, alpha=6, dropout=0.0, dora=True))))[0]
    x = torch.randn(4, 12, dtype=torch.float64)
    adapted = layer.weight + dora.scaling * dora.lora_B.weight @ dora.lora_A.weight
    want = (dora.lora_magnitude_vector / adapted.norm(dim=1))[:, None] * adapted
    with torch.no_grad():
        torch.testing.assert_close(dora.eval()(x), x @ want.T + layer.bias, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dora.merged().weight, want, rtol=1e-12, atol=1e-12)
        # training with dropout: the base term (m/n - 1) W h sees the same dropped-out input h as B A h
        dropping = LoraLinear(layer, LoraConfig(r=3, alpha=6, dropout=0.5, dora=True))
        dropping.load_state_dict(dora.state_dict())
        torch.manual_seed(5)
        out = dropping.train()(x)
        torch.manual_seed(5)
        h = torch.nn.functional.dropout(x, 0.5, training=True)
        scale = (dora.lora_magnitude_vector / adapted.norm(dim=1))
        lora = dora.scaling * h @ (dora.lora_B.weight @ dora.lora_A.weight).T
        torch.testing.assert_close(out, x @ layer.weight.T + layer.bias + (scale - 1) * (h @ layer.weight.T)
                                   + scale * lora, rtol=1e-12, atol=1e-12)


def test_dora_magnitudes_train_with_the_adapter_and_nothing_else():
    model = tiny()
    add_lora(model, LoraConfig(r=4, dora=True, dropout=0.1))
    wrapped = AdapterModel(model, LoraConfig(r=4, dora=True)).train()
    x = torch.randint(0, 96, (2, 9))
    wrapped.loss(x, x)[0].backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (".lora_" in name), name
    magnitudes = [k for k in wrapped.state_dict() if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 2 * 7 and all(model.get_parameter(k).grad.abs().max() > 0 for k in magnitudes)


@pytest.mark.parametrize("fused", [False, True])
def test_dora_peft_parity_both_ways(tmp_path, monkeypatch, fused):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, dora=True, targets=("q", "v", "down") if fused else ("all-linear",))
    model, base, theirs, x = our_adapter_in_peft(tmp_path, fused, lora, randomize_dora)
    assert theirs.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x)[0], rtol=1e-5, atol=1e-5)
    if fused:
        return
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    torch.manual_seed(3)
    trained_elsewhere = peft.get_peft_model(hf, peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        use_dora=True, lora_dropout=0.0))
    with torch.no_grad():  # magnitudes that differ from the row norms
        for name, param in trained_elsewhere.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    trained_elsewhere.save_pretrained(tmp_path / "theirs")
    assert main(["finetune", "import-peft", str(tmp_path / "theirs"), "--base", str(base),
                 "--out", str(tmp_path / "imported")]) == 0
    imported, _, config = load_checkpoint(tmp_path / "imported")
    assert config["lora"]["dora"]
    with torch.no_grad():
        torch.testing.assert_close(imported(x)[0], trained_elsewhere.eval()(x).logits, rtol=1e-5, atol=1e-5)


def test_cli_dora_run_saves_magnitudes_and_reloads_merged_equal(tmp_path, base_checkpoint, chat_data):
    assert main(["finetune", str(base_checkpoint), "--data", str(chat_data), "--out", str(tmp_path / "run"),
                 "--lora", "r=4,alpha=8,dropout=0,dora=true", "--targets", "q,v", "--max-steps", "3",
                 "--lr", "1e-2", "--batch", "4", "--seq", "80", "--no-progress", "--threads", "1",
                 "--precision", "fp32"]) == 0
    run = tmp_path / "run" / "latest"
    assert read_config(run)["lora"]["dora"] is True
    adapter, _, _ = load_adapter(run)
    magnitudes = [m.lora_magnitude_vector for m in adapter.modules() if isinstance(m, LoraLinear)]
    assert len(magnitudes) == 2 * 2 and all(m is not None for m in magnitudes)
    merged = load_checkpoint(run)[0]  # an adapter checkpoint loads folded into its base
    x = torch.randint(0, merged.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapter.eval()(x)[0], rtol=1e-5, atol=1e-5)
