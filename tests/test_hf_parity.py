"""Hugging Face parity: tiny random transformers models -> from_hf -> identical logits, and back.

Every test builds its reference from a tiny config (hidden 64, 2 layers, 4 heads, vocab 128);
nothing touches the network. Norm weights and biases are randomised too, so a swapped or
missing tensor cannot hide behind HF's ones/zeros init.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neoformer import build_model, from_hf  # noqa: E402
from neoformer.hf import to_hf  # noqa: E402

V, D, N_LAYERS, N_HEADS, T = 128, 64, 2, 4, 16
TOL = dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), shared (tied) tensors stay shared."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        is_norm = p.ndim == 1 and ("norm" in name or "ln_" in name)
        p.copy_(1.0 + 0.1 * noise if is_norm else 0.1 * noise)
    return model


def llama(**kw):
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=N_LAYERS,
                num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=64,
                attn_implementation="eager", bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **kw}))


def mistral(**kw):
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=N_LAYERS,
                num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=64,
                attn_implementation="eager", sliding_window=5, bos_token_id=1, eos_token_id=2)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**{**base, **kw}))


def gpt2(**kw):
    base = dict(vocab_size=V, n_embd=D, n_layer=N_LAYERS, n_head=N_HEADS, n_positions=64,
                attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**base, **kw}))


HF_CASES = {
    "llama-gqa-untied": lambda: llama(tie_word_embeddings=False),
    "llama-gqa-tied": lambda: llama(tie_word_embeddings=True),
    "llama-theta-linear-scaling": lambda: llama(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 500.0}),
    "llama-bias-head-dim": lambda: llama(attention_bias=True, mlp_bias=True, head_dim=32, num_key_value_heads=1),
    "mistral-window": lambda: mistral(),
    "gpt2": lambda: gpt2(),
    "gpt2-relu-untied": lambda: gpt2(activation_function="relu", n_inner=96, tie_word_embeddings=False),
}


def make_hf(name: str):
    torch.manual_seed(0)
    return randomize(HF_CASES[name]()).eval()


def inputs(batch: int = 2, pad: tuple[int, ...] = (0, 5), seed: int = 1):
    """Token ids (B, T) and a left-padding mask (row i has pad[i] padding tokens)."""
    ids = torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, T, dtype=torch.long)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return ids, mask


@torch.no_grad()
def hf_logits(hf, ids, mask=None):
    if mask is None:
        return hf(ids).logits
    # HF's forward counts positions from the row start; our (and HF generate's) convention counts
    # real tokens only, so hand HF the same position ids
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return hf(ids, attention_mask=mask, position_ids=positions).logits


@torch.no_grad()
def our_logits(model, ids, mask=None):
    return model(ids, attention_mask=mask)[0]


def assert_match(hf, ours, ids, mask=None):
    expected, got = hf_logits(hf, ids, mask), our_logits(ours, ids, mask)
    if mask is not None:  # padding rows are undefined in both
        keep = mask.bool()
        expected, got = expected[keep], got[keep]
    torch.testing.assert_close(got, expected, **TOL)


# ---- from_hf ------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["memory", "folder"])
@pytest.mark.parametrize("case", HF_CASES)
def test_from_hf_logits_match(case, source, tmp_path):
    hf = make_hf(case)
    if source == "folder":
        hf.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
        ours = from_hf(tmp_path)
    else:
        ours = from_hf(hf)
    assert not ours.training
    ids, mask = inputs()
    assert_match(hf, ours, ids)
    assert_match(hf, ours, ids, mask)  # left padding


@pytest.mark.parametrize("case", ["llama-gqa-tied", "mistral-window", "gpt2"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention_backends_match_hf(case, backend):
    hf = make_hf(case)
    ours = from_hf(hf, attn_backend=backend)
    assert ours.config.attn_backend == backend
    ids, mask = inputs(pad=(0, 3))
    assert_match(hf, ours, ids)
    assert_match(hf, ours, ids, mask)


def test_hf_sdpa_reference_agrees():
    """Our default backend against HF's own SDPA path (not only its eager one)."""
    hf = make_hf("llama-gqa-untied")
    hf_sdpa = llama(tie_word_embeddings=False, attn_implementation="sdpa").eval()
    hf_sdpa.load_state_dict(hf.state_dict())
    ids, _ = inputs()
    assert_match(hf_sdpa, from_hf(hf), ids)


def test_mapped_config_and_tying():
    ours = from_hf(make_hf("llama-theta-linear-scaling"))
    cfg = ours.config
    assert (cfg.n_kv_heads, cfg.rope_base, cfg.rope_scaling, cfg.rope_scaling_factor) == (2, 500.0, "linear", 2.0)
    assert ours.lm_head.weight is not ours.embed.tokens.weight
    tied = from_hf(make_hf("llama-gqa-tied"))
    assert tied.lm_head.weight is tied.embed.tokens.weight
    assert from_hf(make_hf("mistral-window")).config.sliding_window == 5
    g = from_hf(make_hf("gpt2")).config
    assert (g.norm, g.activation, g.position, g.bias, g.tie_embeddings) == ("layernorm", "gelu_tanh", "learned",
                                                                            True, True)


def test_sliding_window_matters():
    """The Mistral case is only a test of the window if the window changes the logits."""
    hf = make_hf("mistral-window")
    ids, _ = inputs()
    windowed = our_logits(from_hf(hf), ids)
    global_ = our_logits(from_hf(hf, sliding_window=None), ids)
    assert not torch.allclose(windowed, global_, atol=1e-3)


def test_weights_are_copied_not_shared():
    hf = make_hf("llama-gqa-untied")
    ours = from_hf(hf)
    before = hf.model.embed_tokens.weight.clone()
    with torch.no_grad():
        ours.embed.tokens.weight.zero_()
    torch.testing.assert_close(hf.model.embed_tokens.weight, before)


def test_dtype_and_fused_qkv_overrides():
    hf = make_hf("gpt2")
    ours = from_hf(hf, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    fused = from_hf(hf, fused_qkv=True)
    assert "decoder.blocks.0.attn.qkv.weight" in fused.state_dict()
    ids, _ = inputs()
    assert_match(hf, fused, ids)


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    hf = make_hf("llama-gqa-untied")
    ids, _ = inputs()
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert_match(hf, from_hf(sharded), ids)
    legacy = tmp_path / "bin"
    hf.config.save_pretrained(legacy)
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin")
    assert_match(hf, from_hf(legacy), ids)


# ---- errors -------------------------------------------------------------------------------
def write_config(folder, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


LLAMA_JSON = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V, hidden_size=D,
                  intermediate_size=2 * D, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS)


def test_unsupported_architecture_error(tmp_path):
    folder = write_config(tmp_path / "t5", architectures=["T5ForConditionalGeneration"], model_type="t5")
    with pytest.raises(ValueError, match=r"'T5ForConditionalGeneration' is not supported.*supported: "
                                         r"LlamaForCausalLM, MistralForCausalLM, GPT2LMHeadModel"):
        from_hf(folder)
    headless = transformers.GPT2Model(transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=N_HEADS))
    with pytest.raises(ValueError, match="'GPT2Model' is not supported"):
        from_hf(headless)


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling type 'llama3' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic' is not supported"),
    (dict(attention_bias=True, mlp_bias=False), r"attention_bias \(True\) != mlp_bias \(False\)"),
    (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act 'gelu_pytorch_tanh' is not supported"),
])
def test_unsupported_llama_config_errors(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        from_hf(write_config(tmp_path, **LLAMA_JSON, **change))  # fails before looking for weights


def test_missing_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_hf(write_config(tmp_path / "empty", **LLAMA_JSON))


def test_incomplete_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    hf = make_hf("llama-gqa-untied")
    hf.config.save_pretrained(tmp_path)
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        from_hf(tmp_path)


# ---- to_hf --------------------------------------------------------------------------------
EXPORT_CASES = {
    "llama-gqa-untied": ("nexus-debug", {}, "LlamaForCausalLM"),
    "llama-tied-bias-fused-linear": ("nexus-debug", dict(tie_embeddings=True, bias=True, fused_qkv=True,
                                                         rope_base=2000.0, rope_scaling="linear",
                                                         rope_scaling_factor=4.0), "LlamaForCausalLM"),
    "llama-ntk-geglu-headdim": ("lumi-debug", dict(rope_scaling="ntk", rope_scaling_factor=2.0, activation="geglu",
                                                   head_dim=8, n_kv_heads=1), "LlamaForCausalLM"),
    "mistral-window": ("nexus-debug", dict(sliding_window=6), "MistralForCausalLM"),
    "gpt2": ("nima-debug", dict(position="learned", activation="gelu_tanh"), "GPT2LMHeadModel"),
    "gpt2-fused-untied-relu": ("nima-debug", dict(position="learned", fused_qkv=True, tie_embeddings=False),
                               "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_to_hf_round_trip(case, tmp_path):
    preset, overrides, arch = EXPORT_CASES[case]
    torch.manual_seed(0)
    ours = randomize(build_model(preset, **overrides)).eval()
    to_hf(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == arch
    ids, mask = inputs()
    assert_match(hf, ours, ids)
    assert_match(hf, ours, ids, mask)
    back = from_hf(tmp_path, fused_qkv=ours.config.fused_qkv)  # and back again: the same tensors
    torch.testing.assert_close(back.state_dict(), ours.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize("preset, overrides, feature", [
    ("neoformer-x-debug", {}, "rmc/nsb"),
    ("nexus-debug", dict(position="alibi"), "ALiBi"),
    ("nima-transformer-debug", dict(position="relative"), "only decoder-only models and BERT-shaped encoders"),
    ("nexus-debug", dict(position="relative"), "T5 relative position bias"),
    ("nexus-debug", dict(ngpt=True), "nGPT"),
    ("nexus-debug", dict(norm_position="post"), "post-norm"),
    ("neobert-debug", {}, "an encoder exports as BERT, which needs"),
    ("nexus-debug", dict(sliding_window=4, sliding_window_pattern="LG"), "sliding-window pattern"),
    ("nexus-debug", dict(norm="layernorm"), "norm='rmsnorm'"),
    ("nima-debug", dict(position="learned", norm="rmsnorm"), "norm='layernorm'"),
    ("nima-debug", dict(position="learned", n_kv_heads=2), "n_kv_heads == n_heads"),
    ("nima-debug", {}, "position='sinusoidal'"),
])
def test_to_hf_unsupported_features(preset, overrides, feature, tmp_path):
    model = build_model(preset, device="meta", **overrides)
    with pytest.raises(ValueError, match=feature.replace("(", r"\(").replace(")", r"\)")):
        to_hf(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_to_hf_copies_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    vocab = {f"w{i}": i for i in range(V - 1)} | {"[UNK]": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tok_dir / "tokenizer.json"))
    out = to_hf(build_model("nexus-debug"), tmp_path / "out", tokenizer_dir=tok_dir)
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded("w3 w7")["input_ids"] == [3, 7]
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        to_hf(build_model("nexus-debug"), tmp_path / "out2", tokenizer_dir=tmp_path / "nothing-here")


@pytest.mark.parametrize("case", ["llama-gqa-tied", "gpt2"])
def test_cached_decode_matches_hf(case):
    """Prefill then one cached step (HF convention: the mask covers cached + new tokens)."""
    hf = make_hf(case)
    ours = from_hf(hf)
    ids, mask = inputs(pad=(0, 4))
    with torch.no_grad():
        _, past, _ = ours(ids[:, :-1], attention_mask=mask[:, :-1])
        step, _, _ = ours(ids[:, -1:], past, attention_mask=mask)
    torch.testing.assert_close(step[:, -1], hf_logits(hf, ids, mask)[:, -1], **TOL)


def test_folder_loading_needs_no_transformers(tmp_path, monkeypatch):
    hf = make_hf("gpt2")
    hf.save_pretrained(tmp_path)
    ids, _ = inputs()
    expected = hf_logits(hf, ids)
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now fails
    torch.testing.assert_close(our_logits(from_hf(tmp_path), ids), expected, **TOL)


def test_export_command_writes_a_folder_transformers_loads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from neoformer import build_model
    from neoformer.cli import main
    from neoformer.tokenizer import CharTokenizer
    from neoformer.checkpoint import save_checkpoint

    torch.manual_seed(0)
    tokenizer = CharTokenizer.from_texts(["hello world"])
    model = build_model("nexus-debug", vocab_size=tokenizer.vocab_size).eval()
    ckpt = save_checkpoint(tmp_path / "run", 1, model, tokenizer=tokenizer)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-5, rtol=1e-5)

    # the NeoFormer-X memory layer has no transformers class: it exports as neoformer's own code
    memory_model = build_model("neoformer-x-debug").eval()
    ckpt = save_checkpoint(tmp_path / "x", 1, memory_model)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x_hf")]) == 0
    config = json.loads((tmp_path / "x_hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_neoformer.NeoFormerForCausalLM"
    assert "verified: max |Δlogit|" in capsys.readouterr().out
