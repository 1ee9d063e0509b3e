"""neoformer.finetune: LoRA module swap, adapter checkpoints, chat loss masks, packing, resume, CLI."""
from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch

from neoformer import build_model
from neoformer.chat import ChatTemplate
from neoformer.checkpoint import CheckpointError, load_checkpoint, read_config
from neoformer.cli import main
from neoformer.config import IGNORE_INDEX, ModelConfig
from neoformer.finetune import (
    AdapterModel, LoraConfig, LoraLinear, add_lora, chat_example, finetune, load_adapter, merge_lora,
)
from neoformer.checkpoint import save_single_checkpoint
from neoformer.finetune.data import Example, SFTBatches, load_examples, packed_batch
from neoformer.model.weights import writes_residual
from neoformer.tokenizer import CharTokenizer
from neoformer.train.run_config import TrainConfig

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 3"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "add 4 4"},
                {"role": "assistant", "content": "8"}]


def tiny(**changes):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **changes})).eval()


def randomize_adapter(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.weight.copy_(0.1 * torch.randn(module.lora_B.weight.shape, generator=gen))
    return model


def logits_of(model, x):
    if model.config.kind == "encoder_decoder":
        return model(x, x)[0]
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


KIND_CASES = {
    "decoder": dict(),
    "decoder-fused-qkv": dict(fused_qkv=True),
    "encoder": dict(kind="encoder", fused_qkv=True, position="learned", learned_pos_offset=1),
    "encoder_decoder": dict(kind="encoder_decoder", n_encoder_layers=1),
    "moe-rmc": dict(moe_experts=2, rmc=True, nsb=True),
}


@pytest.mark.parametrize("case", KIND_CASES)
def test_zero_init_lora_leaves_logits_unchanged_and_merge_equals_unmerged(case):
    model = tiny(**KIND_CASES[case])
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        before = logits_of(model, x)
        names = add_lora(model, LoraConfig(r=4, targets=("all-linear",) if "moe" in case else ("q", "v", "o", "down")))
        assert names and all(isinstance(model.get_submodule(n), LoraLinear) for n in names)
        torch.testing.assert_close(logits_of(model.eval(), x), before, rtol=0, atol=0)  # B = 0: exactly the base
        adapted = logits_of(randomize_adapter(model), x)
        assert (adapted - before).abs().max() > 1e-3  # the adapter does something
        merged = logits_of(merge_lora(model), x)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_fused_qkv_lora_adapts_only_the_chosen_slices():
    model = tiny(fused_qkv=True)
    add_lora(model, LoraConfig(r=4, targets=("q", "v")))
    layer = model.decoder.blocks[0].attn.qkv
    q_dim, kv_dim = 4 * 8, 2 * 8
    delta = randomize_adapter(model).decoder.blocks[0].attn.qkv.delta_weight()
    assert layer.lora_B.weight.shape == (q_dim + kv_dim, 4)
    assert delta[q_dim:q_dim + kv_dim].abs().max() == 0  # K rows untouched
    assert delta[:q_dim].abs().max() > 0 and delta[q_dim + kv_dim:].abs().max() > 0


def test_only_adapter_parameters_get_gradients_and_residual_marks_survive():
    model = tiny()
    add_lora(model, LoraConfig(r=4, dropout=0.1, rslora=True))
    wrapped = AdapterModel(model, LoraConfig(r=4)).train()
    x = torch.randint(0, 96, (2, 9))
    loss, _ = wrapped.loss(x, x)
    loss.backward()
    for name, param in wrapped.base_model.named_parameters():
        assert (param.grad is not None) == (".lora_" in name), name
        assert param.requires_grad == (".lora_" in name), name
    # the A grads are zero at init (B = 0), the B grads are not
    assert wrapped.base_model.decoder.blocks[0].attn.q_proj.lora_B.weight.grad.abs().max() > 0
    assert writes_residual(model.decoder.blocks[0].attn.o_proj) and writes_residual(model.decoder.blocks[0].ffn.down)
    assert not writes_residual(model.decoder.blocks[0].attn.q_proj)
    assert model.decoder.blocks[0].attn.q_proj.scaling == pytest.approx(32 / 2)  # rsLoRA: alpha / sqrt(r)
    assert set(wrapped.state_dict()) == {f"{n}.{f}.weight" for n, m in model.named_modules()
                                         if isinstance(m, LoraLinear) for f in ("lora_A", "lora_B")}


class Int8Linear(torch.nn.Module):
    """The contract of a quantized linear (neoformer.quantize): in/out_features, forward, dequantize()."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.abs().amax(1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(linear.weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantize(self):
        return self.codes.float() * self.scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantize().to(x.dtype))


def test_lora_wraps_a_quantized_linear_and_merges_through_dequantize():
    model = tiny()
    for block in model.decoder.blocks:
        block.attn.q_proj, block.ffn.down = Int8Linear(block.attn.q_proj), Int8Linear(block.ffn.down)
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        before = model(x)[0]
        add_lora(model, LoraConfig(r=4, targets=("q", "down")))
        layer = model.decoder.blocks[0].attn.q_proj
        assert isinstance(layer.base_layer, Int8Linear) and layer.lora_A.weight.dtype == torch.float32
        torch.testing.assert_close(model(x)[0], before, rtol=0, atol=0)
        randomize_adapter(model)
        adapted = model(x)[0]
        torch.testing.assert_close(merge_lora(model)(x)[0], adapted, rtol=1e-5, atol=1e-5)
    assert isinstance(model.decoder.blocks[0].attn.q_proj, torch.nn.Linear)


def test_lora_config_parses_cli_strings_and_rejects_bad_ones():
    cfg = LoraConfig.parse("r=8,alpha=16,dropout=0,rslora=true", "q,v")
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.targets, cfg.rslora) == (8, 16.0, 0.0, ("q", "v"), True)
    for spec, targets, message in (("r=0", None, "lora r"), ("rank=8", None, "key=value"),
                                   (None, "q,attn", "--targets q,attn"), (None, "all-linear,q", "all-linear")):
        with pytest.raises(ValueError, match=message):
            LoraConfig.parse(spec, targets)


# ---- data -------------------------------------------------------------------------------------
@pytest.fixture
def tokenizer():
    return CharTokenizer.from_texts(["<|im_start|>system user assistant\n<|im_end|> Be brief. add 0123456789 "
                                     "reverse the words: cat dog sun hello world Alpaca instruction"])


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    template = ChatTemplate()
    example = chat_example(CONVERSATION, template, tokenizer)
    text, spans = template.assistant_spans(CONVERSATION)
    assert tokenizer.decode(example.ids.tolist()) == text
    trained = tokenizer.decode(example.ids[example.trained].tolist())
    assert trained == "".join(text[a:b] for a, b in spans) == "5<|im_end|>\n8<|im_end|>\n"
    everything = chat_example(CONVERSATION, template, tokenizer, train_on="all")
    assert everything.trained[1:].all() and not everything.trained[0]
    batch = packed_batch([example])  # targets: position t predicts token t+1 where that one is trained
    kept = batch["targets"][0][batch["targets"][0] != IGNORE_INDEX]
    assert tokenizer.decode(kept.tolist()) == trained


def test_packed_examples_do_not_see_each_other():
    model = tiny()
    a, b = torch.randint(0, 96, (1, 7)), torch.randint(0, 96, (1, 5))
    examples = [Example(t[0].numpy(), torch.ones(t.shape[1], dtype=torch.bool).numpy()) for t in (a, b)]
    batch = packed_batch(examples)
    with torch.no_grad():
        packed = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])[0]
        torch.testing.assert_close(packed[:, :7], model(a)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[:, 7:], model(b)[0], rtol=1e-5, atol=1e-5)


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_formats_truncation_and_batches(tmp_path, tokenizer):
    alpaca = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "add", "input": "2 3", "output": "5"}] * 3)
    examples, report = load_examples(alpaca, tokenizer, ChatTemplate(), 128)
    assert report.format == "alpaca" and report.examples == 3
    assert tokenizer.decode(examples[0].ids[examples[0].trained].tolist()) == "5<|im_end|>\n"
    long = _write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 2)
    first_reply_end = ChatTemplate().assistant_spans(CONVERSATION)[1][0][1]
    examples, report = load_examples(long, tokenizer, ChatTemplate(), first_reply_end)  # the 2nd reply is cut
    assert report.truncated == 2 and report.examples == 2 and "2 truncated" in report.describe()
    assert tokenizer.decode(examples[0].ids[examples[0].trained].tolist()) == "5<|im_end|>\n"
    with pytest.raises(ValueError, match=r"no trainable example .* 2 dropped"):
        load_examples(long, tokenizer, ChatTemplate(), 40)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    examples, report = load_examples(text, tokenizer, ChatTemplate(), 50)
    assert report.format == "text" and len(examples) == 5 and sum(len(e.ids) for e in examples) == 240
    batches = SFTBatches(examples, batch_size=2, seq_len=50, seed=0)
    first = next(batches)
    lengths = first["cu_seqlens"].diff().tolist()  # whole examples, at most batch * seq tokens
    assert sorted(lengths) in ([40, 50], [50, 50]) and first["input_ids"].shape == (1, sum(lengths))
    padded = next(SFTBatches(examples, batch_size=2, seq_len=50, packed=False, shuffle=False))
    assert padded["input_ids"].shape == (2, 50)
    assert padded["attention_mask"].sum(1).tolist() == [50, 50]  # unshuffled: the first two windows
    assert (padded["targets"][~padded["attention_mask"]] == IGNORE_INDEX).all()


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad\.jsonl:2: not a JSON object"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"bad\.jsonl:2: messages\[0\] has role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     r"bad\.jsonl:2: an assistant turn is empty"),
    ('{"messages": [{"content": "hi"}]}', r"bad\.jsonl:2: messages\[0\] has role None"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, base_checkpoint, capsys, line, message):
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION}, line])
    code = main(["finetune", str(base_checkpoint), "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


# ---- runs, checkpoints, resume, merge ------------------------------------------------------------
@pytest.fixture
def base_checkpoint(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "vocab_size": tokenizer.vocab_size}))
    return save_single_checkpoint(tmp_path / "base", model, {}, tokenizer)


@pytest.fixture
def chat_data(tmp_path):
    records = [{"messages": [{"role": "user", "content": f"add {a} {b}"},
                             {"role": "assistant", "content": str(a + b)}]} for a in range(5) for b in range(5)]
    return _write_jsonl(tmp_path / "chat.jsonl", records)


def _train(steps, **kw):
    return TrainConfig(max_steps=steps, lr=1e-2, batch_size=4, eval_every=0, save_every=0, progress=False,
                       log_every=1,
                       plot=False, device="cpu", precision="fp32", threads=1, warmup_steps=0, **kw)


def test_adapter_run_resumes_bit_exactly_and_holds_only_the_adapter(tmp_path, base_checkpoint, chat_data):
    lora = LoraConfig(r=4, dropout=0.1)
    quiet = dict(lora=lora, log=lambda *_: None, seq_len=80)
    straight = finetune(base_checkpoint, chat_data, tmp_path / "a", train=_train(4), **quiet)

    def stop_at_step_2(event, info):
        if event == "step" and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = finetune(base_checkpoint, chat_data, tmp_path / "b", train=_train(4), callbacks=[stop_at_step_2], **quiet)
    assert stopped.step == 2 and stopped.stop_reason == "terminated"
    resumed = finetune(base_checkpoint, chat_data, tmp_path / "b", train=_train(4), resume=True, **quiet)
    assert straight.step == resumed.step == 4
    from safetensors.torch import load_file

    first = load_file(straight.checkpoint / "model.safetensors")
    second = load_file(resumed.checkpoint / "model.safetensors")
    assert set(first) == set(second) and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    config = read_config(straight.checkpoint)
    assert config["contents"] == "adapter" and config["lora"]["r"] == 4
    assert config["base"]["weights_sha256"] == json.loads((base_checkpoint / "manifest.json").read_text())[
        "files"]["model.safetensors"]["sha256"]
    assert config["chat_template"]["template"] == ChatTemplate().template


def test_adapter_checkpoint_loads_everywhere_merges_and_refuses_a_changed_base(tmp_path, base_checkpoint, chat_data,
                                                                               capsys):
    run = finetune(base_checkpoint, chat_data, tmp_path / "run", lora=LoraConfig(r=4, dropout=0.0),
                   train=_train(3), log=lambda *_: None, seq_len=80)
    adapter, tokenizer, _ = load_adapter(run.checkpoint)
    x = torch.tensor([tokenizer.encode("<|im_start|>user\nadd 1 2<|im_end|>\n")])
    with torch.no_grad():
        expected = adapter(x)[0]
        base_logits = load_checkpoint(base_checkpoint)[0](x)[0]
        assert (expected - base_logits).abs().max() > 1e-4  # it trained
        loaded, _, _ = load_checkpoint(run.checkpoint)  # the registered contents loader (generate, serve, eval)
        torch.testing.assert_close(loaded(x)[0], expected, rtol=1e-5, atol=1e-5)
        assert main(["finetune", "merge", str(run.checkpoint), "--out", str(tmp_path / "merged")]) == 0
        merged, _, merged_config = load_checkpoint(tmp_path / "merged")
        torch.testing.assert_close(merged(x)[0], expected, rtol=1e-5, atol=1e-5)
    assert merged_config.get("contents", "full") == "full" and merged_config["chat_template"]
    # the base moved: refused by hash unless --base names a copy with the same weights
    other = load_checkpoint(base_checkpoint)[0]
    with torch.no_grad():
        other.decoder.norm.weight.add_(1.0)  # one changed weight: another model
    copy = save_single_checkpoint(tmp_path / "other", other, {}, tokenizer)
    with pytest.raises(CheckpointError, match="weights sha256 .* refused. Pass the right base with --base"):
        load_adapter(run.checkpoint, base=copy)
    moved = tmp_path / "moved-base"
    base_checkpoint.rename(moved)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(run.checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(run.checkpoint, base=moved)[0](x)[0], expected, rtol=0, atol=0)


def test_cli_full_finetune_writes_a_normal_checkpoint_with_the_template(tmp_path, base_checkpoint, chat_data, capsys):
    code = main(["finetune", str(base_checkpoint), "--data", str(chat_data), "--out", str(tmp_path / "full"),
                 "--full", "--max-steps", "2", "--batch", "4", "--seq", "80", "--no-progress", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "full fine-tuning" in out and "fine-tuned 2 steps" in out
    model, tokenizer, config = load_checkpoint(tmp_path / "full")
    assert config.get("contents", "full") == "full" and "template" in config["chat_template"]
    assert tokenizer is not None
    assert main(["finetune", "merge", "--out", str(tmp_path / "x")]) == 2
    assert "needs ADAPTER" in capsys.readouterr().err


# ---- peft: our adapter in peft, peft's adapter in neoformer ------------------------------------------
def our_adapter_in_peft(tmp_path, fused: bool, lora, randomize):
    """A tiny base exported to transformers, our adapter on it exported as peft files and loaded by peft:
    (our model with the adapter, base checkpoint, peft's model, input ids)."""
    import peft
    import transformers

    from neoformer.finetune import adapter_settings
    from neoformer.hf import to_hf

    model = tiny(fused_qkv=fused)
    base = save_single_checkpoint(tmp_path / "base", model, {}, None)
    to_hf(model, tmp_path / "hf")
    add_lora(model, lora)
    randomize(model)
    adapter = save_single_checkpoint(tmp_path / "adapter", AdapterModel(model, lora), adapter_settings(base, lora, None),
                                     None)
    assert main(["finetune", "export-peft", str(adapter), "--out", str(tmp_path / "peft")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    return model.eval(), base, theirs, torch.randint(0, 96, (2, 11))


@pytest.mark.parametrize("fused, targets", [(False, ("all-linear",)), (True, ("q", "v", "down"))])
def test_peft_round_trip_both_ways(tmp_path, monkeypatch, fused, targets):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")  # in the test extra: runs in `make test`
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets, rslora=fused)
    model, base, theirs, x = our_adapter_in_peft(tmp_path, fused, lora, randomize_adapter)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x)[0], rtol=1e-5, atol=1e-5)
    if fused:
        return  # peft's q/k/v LoRAs have separate A matrices: imported onto unfused bases only
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    torch.manual_seed(3)
    trained_elsewhere = peft.get_peft_model(hf, peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        use_rslora=True, lora_dropout=0.0))
    trained_elsewhere.save_pretrained(tmp_path / "theirs")
    assert main(["finetune", "import-peft", str(tmp_path / "theirs"), "--base", str(base),
                 "--out", str(tmp_path / "imported")]) == 0
    imported, _, config = load_checkpoint(tmp_path / "imported")
    assert config["lora"]["targets"] == ["q", "v", "down"] and config["lora"]["rslora"]
    with torch.no_grad():
        torch.testing.assert_close(imported(x)[0], trained_elsewhere.eval()(x).logits, rtol=1e-5, atol=1e-5)


# ---- QLoRA: LoRA on a base quantized by neoformer.quantize ----------------------------------------
def _capture_trained_model(monkeypatch):
    """The model finetune() hands to fit(), kept for comparison with what is loaded back."""
    from neoformer.finetune import run as run_module

    seen = {}

    def recording_fit(model, *args, **kwargs):
        seen["model"] = model
        return real_fit(model, *args, **kwargs)

    real_fit = run_module.fit
    monkeypatch.setattr(run_module, "fit", recording_fit)
    return seen


@pytest.mark.parametrize("scheme, group_size, merge_atol", [("nf4", 32, 2e-2), ("int8", None, 2e-2)])
def test_qlora_trains_the_adapter_on_a_frozen_quantized_base_reloads_and_merges(
        tmp_path, base_checkpoint, chat_data, monkeypatch, scheme, group_size, merge_atol):
    from neoformer.quantize import QuantizedLinear, quantize_model

    seen = _capture_trained_model(monkeypatch)
    lora = LoraConfig(r=4, dropout=0.0, targets=("q", "v"))  # k, o, gate, up, down stay quantized, unadapted
    run = finetune(base_checkpoint, chat_data, tmp_path / "run", lora=lora, train=_train(3), qlora=scheme,
                   qlora_group_size=group_size, log=lambda *_: None, seq_len=80)
    trained = seen["model"].eval()
    base = trained.base_model
    # the base is quantized (every linear but the head) and frozen; only the adapter has parameters that train
    quantized = [m for m in base.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 2 * 7 and all(m.scheme == scheme and m.group_size == group_size for m in quantized)
    assert all(isinstance(m.base_layer, QuantizedLinear) for m in base.modules() if isinstance(m, LoraLinear))
    assert {n for n, p in base.named_parameters() if p.requires_grad} == set(trained.state_dict())
    fresh = quantize_model(load_checkpoint(base_checkpoint)[0], scheme, group_size)
    for name, module in fresh.named_modules():  # training did not touch the packed base
        if isinstance(module, QuantizedLinear):
            held = base.get_submodule(name.replace("q_proj", "q_proj.base_layer").replace("v_proj", "v_proj.base_layer"))
            assert torch.equal(held.stored()["qweight"], module.stored()["qweight"]), name
    # gradients reached every adapter: B starts at zero and moved
    assert all(m.lora_B.weight.abs().max() > 0 for m in base.modules() if isinstance(m, LoraLinear))
    config = read_config(run.checkpoint)
    assert (config["quantize"], config["quantize_group_size"]) == (scheme, group_size)
    x = torch.randint(0, base.config.vocab_size, (2, 13))
    with torch.no_grad():
        expected = trained(x)[0]
        assert (expected - load_checkpoint(base_checkpoint)[0](x)[0]).abs().max() > 1e-4  # it trained
        loaded, _, _ = load_checkpoint(run.checkpoint)  # rebuilt: base quantized again + adapter, unmerged
        assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 2 * 7
        torch.testing.assert_close(loaded(x)[0], expected, rtol=0, atol=1e-6)
    assert main(["finetune", "merge", str(run.checkpoint), "--out", str(tmp_path / "merged")]) == 0
    merged, _, merged_config = load_checkpoint(tmp_path / "merged")
    assert merged_config.get("contents", "full") == "full"
    assert not any(isinstance(m, (QuantizedLinear, LoraLinear)) for m in merged.modules())
    # the merged weight is the dequantized base + scaling * B A (float64 recomputation)
    layer = base.decoder.blocks[1].attn.v_proj
    want = layer.base_layer.dequantize().double() + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    torch.testing.assert_close(merged.decoder.blocks[1].attn.v_proj.weight.double(), want, rtol=0, atol=1e-6)
    with torch.no_grad():  # the quantized CPU paths round activations to bf16 / int8: hence the loose tolerance
        torch.testing.assert_close(merged(x)[0], expected, rtol=0, atol=merge_atol)


def test_qlora_run_resumes_bit_exactly(tmp_path, base_checkpoint, chat_data):
    quiet = dict(lora=LoraConfig(r=4, dropout=0.1), log=lambda *_: None, seq_len=80, qlora="nf4", qlora_group_size=32)
    straight = finetune(base_checkpoint, chat_data, tmp_path / "a", train=_train(4), **quiet)

    def stop_at_step_2(event, info):
        if event == "step" and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = finetune(base_checkpoint, chat_data, tmp_path / "b", train=_train(4), callbacks=[stop_at_step_2], **quiet)
    assert stopped.step == 2
    resumed = finetune(base_checkpoint, chat_data, tmp_path / "b", train=_train(4), resume=True, **quiet)
    from safetensors.torch import load_file

    first = load_file(straight.checkpoint / "model.safetensors")
    second = load_file(resumed.checkpoint / "model.safetensors")
    assert resumed.step == 4 and set(first) == set(second) and all(".lora_" in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("flags, message", [
    (["--qlora", "nf4", "--full"], "--qlora trains an adapter on a quantized base; it cannot be combined with --full"),
    (["--qlora", "nf4"], "group size 64 does not divide the input width 32"),  # the tiny base is 32 wide
    (["--qlora-group-size", "32"], "--qlora-group-size applies to --qlora nf4 only"),
    (["--qlora", "int8", "--qlora-group-size", "32"], "int8 scales each output row"),
])
def test_qlora_refuses_bad_combinations_in_one_line(tmp_path, base_checkpoint, chat_data, capsys, flags, message):
    code = main(["finetune", str(base_checkpoint), "--data", str(chat_data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress", "--threads", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("float_head", [False, True])
def test_qlora_quantizes_an_untied_head_unless_asked_and_reloads_the_same_base(tmp_path, tokenizer, chat_data,
                                                                              float_head):
    from neoformer.finetune.adapter import attach_adapter
    from neoformer.quantize import QuantizedLinear

    torch.manual_seed(0)
    untied = build_model(ModelConfig(**{**TINY, "vocab_size": tokenizer.vocab_size, "tie_embeddings": False}))
    base = save_single_checkpoint(tmp_path / "untied", untied, {}, tokenizer)
    run = finetune(base, chat_data, tmp_path / "run", lora=LoraConfig(r=4, targets=("q",)), train=_train(1),
                   qlora="nf4", qlora_group_size=32, qlora_float_head=float_head, log=lambda *_: None, seq_len=80)
    loaded, _, config = load_checkpoint(run.checkpoint)
    assert config["quantize_skip"] == (["lm_head", "embed"] if float_head else ["embed"])
    assert isinstance(loaded.lm_head, QuantizedLinear) != float_head
    assert isinstance(loaded.embed.tokens, torch.nn.Embedding)  # the embedding always stays float
    # an adapter written before the head was quantized (no "quantize_skip") reloads with a float head
    older = {k: v for k, v in config.items() if k != "quantize_skip"}
    assert not isinstance(attach_adapter(load_checkpoint(base)[0], older).lm_head, QuantizedLinear)
