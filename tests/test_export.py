"""neoformer.export: every format checked against its consumer's own library, on tiny models.

Each export verifies itself (built in); these tests also compare independently: transformers /
onnxruntime / torch.jit / gguf outputs against neoformer's logits over a prefill plus three
cached decode steps, HF ``generate`` against neoformer's greedy tokens, tokenizers in exported
folders against ours, and import(export(ckpt)) weights bit for bit.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neoformer import build_model  # noqa: E402
from neoformer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from neoformer.cli import main  # noqa: E402
from neoformer.export import ExportError, export  # noqa: E402
from neoformer.export.common import decoder_reference, probe_ids  # noqa: E402
from neoformer.generate.api import generate  # noqa: E402
from neoformer.tokenizer import train_bpe  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
TOL = dict(atol=1e-5, rtol=1e-5)
TEXT = "the cat sat on the mat; export check 123\n  tabs\tand ünïcödé"
# every family's debug preset; the kind decides the Auto class
PRESETS = ["nexus-debug", "lumi-debug", "neoformer-x-debug", "nima-debug", "neobert-debug", "nima-transformer-debug"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT * 20, "hello world, a tiny corpus for a tiny vocabulary. " * 20], vocab_size=300)


def tiny(preset: str, tokenizer, **overrides):
    torch.manual_seed(0)
    return build_model(preset, vocab_size=tokenizer.vocab_size, **overrides).eval()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@torch.no_grad()
def hf_steps(hf, ids):
    """transformers logits: prefill 5, then one token per step with the HF cache."""
    out = hf(input_ids=ids[:, :5], use_cache=True)
    steps, past = [out.logits], out.past_key_values
    for t in range(5, ids.shape[1]):
        out = hf(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
        steps.append(out.logits)
        past = out.past_key_values
    return steps


def assert_steps_close(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(torch.as_tensor(b).float(), a, **TOL)


# ---- Hugging Face: every preset family ---------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_hf_export_of_every_family_matches_neoformer(preset, tokenizer, tmp_path):
    model = tiny(preset, tokenizer)
    result = export(model, tmp_path / "hf", "hf", tokenizer=tokenizer)
    assert result.max_diff is not None and result.max_diff <= 1e-5
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_id and config["pad_token_id"] == tokenizer.pad_id
    remote = "auto_map" in config
    kind = model.config.kind
    auto = {"decoder": transformers.AutoModelForCausalLM, "encoder": transformers.AutoModelForMaskedLM,
            "encoder_decoder": transformers.AutoModelForSeq2SeqLM}[kind]
    hf = auto.from_pretrained(tmp_path / "hf", trust_remote_code=remote).eval()
    ids = probe_ids(tokenizer.vocab_size, 8, seed=3)  # not the verification's ids
    with torch.no_grad():
        if kind == "decoder":
            assert_steps_close(decoder_reference(model, ids), hf_steps(hf, ids))
        elif kind == "encoder":
            torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), **TOL)
        else:
            torch.testing.assert_close(hf(input_ids=ids, decoder_input_ids=ids[:, :4]).logits,
                                       model(ids, ids[:, :4])[0], **TOL)
    # the tokenizer in the folder is a fast tokenizer that encodes like ours, chat template included
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    assert fast(TEXT, add_special_tokens=False).input_ids == tokenizer.encode(TEXT)
    assert fast.eos_token_id == tokenizer.eos_id and "messages" in fast.chat_template


def test_mixture_of_experts_exports_as_mixtral(tokenizer, tmp_path):
    model = tiny("nexus-debug", tokenizer, moe_experts=4, moe_top_k=2)
    export(model, tmp_path / "hf", "hf", tokenizer=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = probe_ids(tokenizer.vocab_size, 8, seed=4)
    assert_steps_close(decoder_reference(model, ids), hf_steps(hf, ids))


@pytest.mark.parametrize("preset", ["nexus-debug", "neoformer-x-debug", "nima-transformer-debug"])
def test_hf_generate_matches_neoformer_greedy_and_stops_at_eos(preset, tokenizer, tmp_path):
    model = tiny(preset, tokenizer)
    export(model, tmp_path / "hf", "hf", tokenizer=tokenizer)
    auto = transformers.AutoModelForSeq2SeqLM if model.config.kind == "encoder_decoder" else \
        transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    prompt = torch.tensor([tokenizer.encode("the cat sat")])
    theirs = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    ours = generate(model, prompt, 6, do_sample=False, eos_token_id=tokenizer.eos_id)
    n = min(theirs.shape[1], ours.shape[1])
    assert theirs[0, :n].tolist() == ours[0, :n].tolist()

    # a head that always prefers EOS (id 0 wins every tie): HF generate must stop after one token
    with torch.no_grad():
        for module in (hf.lm_head if hasattr(hf, "lm_head") else hf.model.lm_head,):
            module.weight.zero_()
    assert tokenizer.eos_id == 0 and hf.generation_config.eos_token_id == 0
    stopped = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    start = 1 if model.config.kind == "encoder_decoder" else prompt.shape[1]
    assert stopped[0, start:].tolist() == [0]


def test_export_cli_from_checkpoint_and_bad_requests(tokenizer, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", 1, tiny("nexus-debug", tokenizer), tokenizer=tokenizer)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert "verified: max |Δlogit|" in capsys.readouterr().out
    assert main(["export", str(ckpt), "--out", str(out)]) == 2
    assert "not empty; pass --force" in one_error_line(capsys)
    assert main(["export", str(ckpt), "--out", str(out), "--force", "--dtype", "fp8"]) == 2
    assert "unknown dtype 'fp8'" in one_error_line(capsys)
    assert main(["export", str(ckpt), "--out", str(out), "--force", "--quant", "q8_0"]) == 2
    assert "only for --format gguf" in one_error_line(capsys)
    encoder = save_checkpoint(tmp_path / "enc", 1, tiny("neobert-debug", tokenizer), tokenizer=tokenizer)
    assert main(["export", str(encoder), "--out", str(tmp_path / "g"), "--format", "gguf"]) == 2
    assert "Llama-shaped decoders" in one_error_line(capsys)
    seq2seq = save_checkpoint(tmp_path / "s2s", 1, tiny("nima-transformer-debug", tokenizer))
    assert main(["export", str(seq2seq), "--out", str(tmp_path / "t"), "--format", "torch-export"]) == 2
    assert "encoder-decoder" in one_error_line(capsys)
    assert not (tmp_path / "g").exists() and not (tmp_path / "t").exists()  # refused before writing
    with pytest.raises(ExportError, match="unknown format"):
        export(ckpt, tmp_path / "x", "safetensors")


def test_verification_catches_a_wrong_export(tokenizer, tmp_path, monkeypatch):
    from neoformer.export import hf_folder

    real = hf_folder._state_dict

    def tampered(model):
        sd = real(model)
        weight = sd["model.decoder.blocks.0.attn.o_proj.weight"]
        weight += 0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
        return sd

    monkeypatch.setattr(hf_folder, "_state_dict", tampered)
    with pytest.raises(ExportError, match="verification failed"):
        export(tiny("neoformer-x-debug", tokenizer), tmp_path / "hf", "hf")


# ---- import ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["nexus-debug", "neoformer-x-debug", "neobert-debug"])
def test_import_of_an_export_gives_bit_identical_weights(preset, tokenizer, tmp_path, capsys):
    model = tiny(preset, tokenizer)
    ckpt = save_checkpoint(tmp_path / "run", 1, model, tokenizer=tokenizer)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "verified against transformers" in capsys.readouterr().out
    back, back_tokenizer, _ = load_checkpoint(tmp_path / "back")
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert back_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


def _randomized(hf_model):
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in hf_model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return hf_model.eval()


HF_FAMILIES = {
    "qwen2": lambda kw: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)),
    "mixtral": lambda kw: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **kw, num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": lambda kw: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=kw["vocab_size"], n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_import_hf_families_logits_match(family, tmp_path):
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2)
    torch.manual_seed(0)
    hf = _randomized(HF_FAMILIES[family](kw))
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    ours, _, _ = load_checkpoint(tmp_path / "ck")
    ids = probe_ids(96, 8, seed=5)
    assert_steps_close(decoder_reference(ours, ids), hf_steps(hf, ids))


# ---- GGUF --------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", [None, "q8_0"])
def test_gguf_reads_back_with_tokenizer_metadata(quant, tokenizer, tmp_path):
    from neoformer.export.gguf_format import read_gguf

    model = tiny("lumi-debug", tokenizer, tie_embeddings=False)
    result = export(model, tmp_path / "g", "gguf", quant=quant, tokenizer=tokenizer)
    assert result.max_diff <= (1e-5 if quant is None else 0.1)
    fields, tensors = read_gguf(tmp_path / "g" / "model.gguf")
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id and "messages" in fields["tokenizer.chat_template"]
    assert tensors["blk.0.ffn_down.weight"][0] == ("Q8_0" if quant else "F32")
    # transformers reads llama.cpp metadata on its own: its tokenizer encodes like ours
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")
    assert fast(TEXT, add_special_tokens=False).input_ids == tokenizer.encode(TEXT)


def test_gguf_verification_catches_a_wrong_rope_permutation(tokenizer, tmp_path, monkeypatch):
    from neoformer.export import gguf_format

    monkeypatch.setattr(gguf_format, "_permute", lambda w, n_head: w)  # forget llama.cpp's Q/K layout
    monkeypatch.setattr(gguf_format, "_unpermute", lambda w, n_head: w)
    with pytest.raises(ExportError, match="GGUF loader differs"):
        export(tiny("lumi-debug", tokenizer), tmp_path / "g", "gguf", tokenizer=tokenizer)


# ---- ONNX, torch.export, TorchScript -------------------------------------------------------------
def test_onnx_decoder_with_kv_cache_and_generate_cli(tokenizer, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from neoformer.export.onnx_format import OnnxDecoder

    model = tiny("nexus-debug", tokenizer, n_layers=1)
    ckpt = save_checkpoint(tmp_path / "run", 1, model, tokenizer=tokenizer)
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    ids = probe_ids(tokenizer.vocab_size, 8, seed=7)
    session = OnnxDecoder(tmp_path / "onnx")
    session.reset(2)
    theirs = [session.step(ids[:, :5].numpy())] + [session.step(ids[:, t:t + 1].numpy()) for t in range(5, 8)]
    assert_steps_close(decoder_reference(model, ids), [torch.from_numpy(t) for t in theirs])
    capsys.readouterr()
    prompt = "the cat sat"
    assert main(["generate", "--onnx", str(tmp_path / "onnx"), "--prompt", prompt, "-n", "8", "--ignore-eos"]) == 0
    printed = capsys.readouterr().out.strip()
    ours = generate(model, torch.tensor([tokenizer.encode(prompt)]), 8, do_sample=False, eos_token_id=[])
    assert printed == prompt + tokenizer.decode(ours[0, len(tokenizer.encode(prompt)):].tolist())


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_onnx_export_of_every_family(preset, tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    result = export(tiny(preset, tokenizer), tmp_path / "onnx", "onnx", tokenizer=tokenizer)
    assert result.max_diff <= 1e-5


def test_torchscript_decoder_matches(tokenizer, tmp_path):
    model = tiny("neoformer-x-debug", tokenizer)
    result = export(model, tmp_path / "ts", "torchscript")
    assert result.max_diff <= 1e-5
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.ts"))
    ids = probe_ids(tokenizer.vocab_size, 7, seed=9)
    cfg = model.config
    empty = [torch.zeros(2, cfg.resolved_n_kv_heads, 0, cfg.resolved_head_dim) for _ in range(2 * cfg.n_layers)]
    logits, *_ = scripted(ids, torch.ones_like(ids), *empty, torch.zeros(2, cfg.d_model), torch.zeros(2))
    torch.testing.assert_close(logits, model(ids)[0], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["nexus-debug", "neoformer-x-debug", "neobert-debug"])
def test_torch_export_program(preset, tokenizer, tmp_path):
    result = export(tiny(preset, tokenizer), tmp_path / "pt2", "torch-export")
    assert result.max_diff <= 1e-5 and (tmp_path / "pt2" / "model.pt2").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_exports_verify(dtype, tokenizer, tmp_path):
    for fmt in ("hf", "gguf"):
        result = export(tiny("lumi-debug", tokenizer), tmp_path / fmt, fmt, dtype=dtype, tokenizer=tokenizer)
        assert result.max_diff is not None


@pytest.mark.parametrize("kind", ["sentencepiece", "char"])
def test_tokenizer_json_for_every_tokenizer_kind(kind, tmp_path):
    from neoformer.export.tokenizer_files import write_tokenizer
    from neoformer.tokenizer import CharTokenizer, train_sentencepiece

    texts = [TEXT, "hello world, a tiny corpus for a tiny vocabulary."] * 100
    ours = train_sentencepiece(texts, 300) if kind == "sentencepiece" else CharTokenizer.from_texts(texts)
    ids = write_tokenizer(tmp_path, ours, {})
    assert ids["eos_token_id"] == ours.eos_id
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)  # no sentencepiece/protobuf needed
    for text in (TEXT, "  two  spaces\n\nand lines", "sat on"):
        assert fast(text, add_special_tokens=False).input_ids == ours.encode(text)
