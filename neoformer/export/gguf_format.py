"""``format="gguf"``: one ``model.gguf`` for llama.cpp (the ``gguf`` package's writer), Llama-shaped decoders.

Tensors follow llama.cpp's ``llama`` architecture names. Q and K rows are permuted from the
half-split RoPE layout (neoformer, HF) to GGML's interleaved pairs, exactly as llama.cpp's
convert_hf_to_gguf.py does. Weights are F32/F16/BF16 (``--dtype``) or Q8_0/Q4_0 (``--quant``);
norms stay F32 and a matrix whose rows do not split into 32-value blocks falls back to F16/F32.
Tokenizer metadata: byte-level BPE as ``gpt2`` (pre-tokenizer ``gpt-2``), SentencePiece as
``llama`` (pre ``default``), with special ids and the chat template.

Verification reads the file back with gguf's reader, checks the metadata, dequantizes every
tensor, undoes the permutation, compares each with the original (within the format's
rounding), and runs neoformer with the read-back weights to report max |Δlogit|. Given llama.cpp's
binaries (``llama_cpp=DIR`` / ``--llama-cpp DIR`` / ``$NEOFORMER_LLAMA_CPP_DIR``), llama.cpp itself
runs the file greedily and must produce neoformer's text (:mod:`neoformer.export.llama_cpp`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..chat import chat_template_of
from .common import DECODE_STEPS, PREFILL, ExportError, Source, decoder_reference, max_abs_diff, optional_import, \
    probe_ids

# per element type: how far a dequantized value may stray, as a fraction of its block's (row's) max |w|
# (Q8_0: half a step of max/127 plus the fp16 block scale; Q4_0: up to one step of max/8 where +max clips)
ROUNDING = {"F32": 1e-7, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.005, "Q4_0": 0.13}


def check_supported(source: Source, dtype, quant) -> None:
    optional_import("gguf", "gguf")
    cfg = source.cfg
    from .hf_folder import stock_architecture

    if stock_architecture(cfg) != "LlamaForCausalLM" or cfg.bias or cfg.rope_scaling == "ntk":
        raise ExportError("gguf export supports Llama-shaped decoders (rope, rmsnorm, gated FFN, no bias, no "
                          "memory layer/MoE/sliding window); export this model with --format hf or onnx")
    if cfg.activation != "swiglu":
        raise ExportError(f"gguf: llama.cpp's llama architecture needs activation='swiglu' (got {cfg.activation!r})")
    if source.tokenizer is not None and source.tokenizer.kind not in ("bpe", "sentencepiece"):
        raise ExportError(f"gguf: llama.cpp reads BPE or SentencePiece vocabularies, not a {source.tokenizer.kind} "
                          "tokenizer")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Half-split RoPE rows -> GGML's interleaved pairs (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, tuple[str, torch.Tensor]]:
    """llama.cpp name -> (our name, tensor in llama.cpp layout)."""
    from ..hf.common import split_qkv

    cfg = model.config
    sd = split_qkv({k: v.detach().float() for k, v in model.state_dict().items()}, cfg)
    names = {"token_embd.weight": "embed.tokens.weight", "output_norm.weight": "decoder.norm.weight"}
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    per_layer = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
                 "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "ffn.gate", "ffn_up": "ffn.up",
                 "ffn_down": "ffn.down"}
    for i in range(cfg.n_layers):
        names.update({f"blk.{i}.{g}.weight": f"decoder.blocks.{i}.{o}.weight" for g, o in per_layer.items()})
    out = {}
    for g, o in names.items():
        t = sd[o]
        if g.endswith("attn_q.weight"):
            t = _permute(t, cfg.n_heads)
        elif g.endswith("attn_k.weight"):
            t = _permute(t, cfg.resolved_n_kv_heads)
        out[g] = (o, t)
    return out


def _element_type(gguf, name: str, t: torch.Tensor, dtype: torch.dtype, quant: str | None):
    Q = gguf.GGMLQuantizationType
    if t.ndim == 1:
        return Q.F32
    if quant is not None and t.shape[-1] % 32 == 0:
        return {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    return {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}[dtype]


def _add_tokenizer(writer, gguf, tokenizer, vocab_size: int, checkpoint_config: dict) -> None:
    T = gguf.TokenType
    if tokenizer.kind == "bpe":
        import json

        data = json.loads(tokenizer._tok.to_str())
        by_id = {i: tok for tok, i in tokenizer._tok.get_vocab(with_added_tokens=True).items()}
        special = set(tokenizer.special_ids)
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
        types = [T.CONTROL if i in special else T.NORMAL if i in by_id else T.UNUSED for i in range(vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's split regex (ByteLevel use_regex=True)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    else:
        sp = tokenizer._sp
        tokens, scores, types = [], [], []
        for i in range(vocab_size):
            if i >= sp.get_piece_size():
                tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(T.UNUSED)
                continue
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                         T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_id", None)
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(False)  # neoformer models are trained without a BOS
    writer.add_chat_template(chat_template_of(checkpoint_config or {}).template)


def write_gguf(source: Source, out: Path, dtype: torch.dtype, quant: str | None = None,
               llama_cpp: str | None = None) -> dict:
    gguf = optional_import("gguf", "gguf")
    from .llama_cpp import llama_cpp_binary

    llama_cpp_binary(llama_cpp)  # a wrong folder is refused before anything is written
    cfg = source.cfg
    writer = gguf.GGUFWriter(str(out / "model.gguf"), "llama")
    writer.add_name(cfg.name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.resolved_ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.resolved_n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_rope_dimension_count(cfg.resolved_head_dim)
    writer.add_key_length(cfg.resolved_head_dim)
    writer.add_value_length(cfg.resolved_head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
    file_type = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}.get(quant) or \
        {torch.float32: "ALL_F32", torch.float16: "MOSTLY_F16", torch.bfloat16: "MOSTLY_BF16"}[dtype]
    writer.add_file_type(gguf.LlamaFileType[file_type])
    if source.tokenizer is not None:
        _add_tokenizer(writer, gguf, source.tokenizer, cfg.vocab_size, source.config)
    else:  # llama.cpp refuses a file without tokenizer.ggml.model; "none" gives vocab_size dummy tokens
        writer.add_tokenizer_model("none")
    for name, (_, t) in gguf_tensors(source.model).items():
        kind = _element_type(gguf, name, t, dtype, quant)
        array = t.float().numpy()
        if kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        elif kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"quant": quant, "llama_cpp": llama_cpp}


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """(metadata fields, llama.cpp name -> (element type name, dequantized float32 array)) via gguf's reader."""
    gguf = optional_import("gguf", "gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        tensors[t.name] = (t.tensor_type.name, np.asarray(values, dtype=np.float32).reshape(shape))
    return fields, tensors


@torch.no_grad()
def verify_gguf(source: Source, out: Path, dtype: torch.dtype, facts: dict) -> tuple[float, str]:
    cfg = source.cfg
    fields, tensors = read_gguf(out / "model.gguf")
    expected = {"general.architecture": "llama", "llama.block_count": cfg.n_layers,
                "llama.embedding_length": cfg.d_model, "llama.attention.head_count_kv": cfg.resolved_n_kv_heads}
    if source.tokenizer is not None:
        expected["tokenizer.ggml.eos_token_id"] = source.tokenizer.eos_id
    for key, value in expected.items():
        if fields.get(key) != value:
            raise ExportError(f"gguf verification failed: {key} reads back as {fields.get(key)!r}, expected {value!r}")
    originals = gguf_tensors(source.model)
    if set(tensors) != set(originals):
        raise ExportError(f"gguf verification failed: tensors {sorted(set(originals) ^ set(tensors))[:3]} differ")
    sd = {}
    for name, (ours, original) in originals.items():
        kind, values = tensors[name]
        back = torch.from_numpy(values)
        if tuple(back.shape) != tuple(original.shape):
            raise ExportError(f"gguf verification failed: {name} has shape {tuple(back.shape)}, "
                              f"expected {tuple(original.shape)}")
        scale = original.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
        if bool(((back - original).abs() > ROUNDING[kind] * scale + 1e-7).any()):
            raise ExportError(f"gguf verification failed: {name} ({kind}) differs beyond {kind} rounding")
        if name.endswith("attn_q.weight"):
            back = _unpermute(back, cfg.n_heads)
        elif name.endswith("attn_k.weight"):
            back = _unpermute(back, cfg.resolved_n_kv_heads)
        sd[ours] = back
    reloaded = _with_weights(source.model, sd)
    ids = probe_ids(cfg.vocab_size, PREFILL + DECODE_STEPS)
    diff = max_abs_diff(decoder_reference(source.model.float(), ids), decoder_reference(reloaded, ids))
    what = (f"gguf reader: metadata, {len(tensors)} tensors within {facts.get('quant') or 'dtype'} rounding; "
            f"neoformer on the read-back weights vs the original, prefill {PREFILL} + {DECODE_STEPS} steps")
    return diff, what + _transformers_check(out, reloaded, ids) + _llama_cpp_check(source, out, reloaded, dtype, facts)


def _llama_cpp_check(source: Source, out: Path, reloaded, dtype: torch.dtype, facts: dict) -> str:
    from .llama_cpp import MARGIN, check_llama_cpp, llama_cpp_binary

    binary = llama_cpp_binary(facts.get("llama_cpp"))
    if binary is None:
        return ""
    weight_type = (facts.get("quant") or {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype])
    found = check_llama_cpp(binary, out / "model.gguf", reloaded, source.tokenizer, weight_type.upper())
    tail = "" if found["whole"] else f" (then a near tie: top-2 gap < {MARGIN[weight_type.upper()]})"
    return (f"; llama.cpp's greedy text equals neoformer's over {found['compared']} of {found['generated']} "
            f"tokens{tail}, prompt tokens equal")


def _transformers_check(out: Path, reloaded, ids) -> str:
    """transformers' own GGUF loader (llama.cpp's layout and tokenizer metadata, read independently of
    our reader) must reproduce the read-back model; skipped without transformers."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return ""
    theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    steps = [theirs(input_ids=ids[:, :PREFILL], use_cache=True)]
    for t in range(PREFILL, ids.shape[1]):
        steps.append(theirs(input_ids=ids[:, t:t + 1], past_key_values=steps[-1].past_key_values, use_cache=True))
    diff = max_abs_diff(decoder_reference(reloaded, ids), [s.logits for s in steps])
    if diff > 1e-4:
        raise ExportError(f"gguf verification failed: transformers' GGUF loader differs by {diff:.3g} "
                          "(tensor layout or metadata llama.cpp would misread)")
    return f"; transformers' GGUF loader (LlamaForCausalLM) agrees within {diff:.2g}"


def _with_weights(model, read_back: dict[str, torch.Tensor]):
    """A float32 copy of ``model`` with the GGUF's (dequantized) weights."""
    import copy

    reloaded = copy.deepcopy(model).float()
    state = reloaded.state_dict()
    for ours, value in read_back.items():
        if ours in state:
            state[ours] = value
    if reloaded.config.fused_qkv:
        raise ExportError("gguf verification of a fused-qkv model is not supported")
    reloaded.load_state_dict(state)
    return reloaded.eval()
