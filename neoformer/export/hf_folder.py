"""``format="hf"``: a transformers folder. Stock classes where one fits (Llama, Mistral, GPT-2,
Mixtral), else neoformer's own code as a trust_remote_code folder; tokenizer files and special ids
either way. Verification loads the folder with transformers' Auto classes."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import kinds
from .common import (
    DECODE_STEPS, PREFILL, Source, check_tolerance, max_abs_diff, optional_import, probe_ids,
    probe_padding_mask, seq2seq_reference, verify_steps, write_json,
)
from .remote_code import AUTO_CLASSES, write_remote_code
from .tokenizer_files import set_special_ids, write_tokenizer


def stock_architecture(cfg) -> str | None:
    """The transformers class a config maps onto exactly, or None (-> custom code)."""
    from ..hf import stock_export_family

    try:
        family = stock_export_family(cfg)
        return family.check_exportable(cfg)
    except ValueError:
        return None


def _state_dict(model) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied embeddings)
    return {f"model.{k}": v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def write_hf(source: Source, out: Path, dtype: torch.dtype, remote_code: bool | None = None,
             max_shard_size: str | int | None = None) -> dict:
    """Write the folder; return facts for verification (``{"remote_code": bool}``). ``max_shard_size``
    (``"2GB"``): safetensors shards plus ``model.safetensors.index.json`` past that size."""
    optional_import("transformers", "hf")
    cfg = source.cfg
    arch = None if remote_code else stock_architecture(cfg)
    model = source.model.to(dtype)
    if arch is not None:
        from ..hf import to_hf

        to_hf(model, out, max_shard_size=max_shard_size)
    else:
        from ..hf.shards import write_safetensors

        fields = write_remote_code(out, cfg)
        write_safetensors(_state_dict(model), out, max_shard_size)
        write_json(out / "config.json", {**fields, "dtype": str(dtype).removeprefix("torch."), "use_cache": True})
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": cfg.pad_token_id}
    if source.tokenizer is not None:
        ids = write_tokenizer(out, source.tokenizer, source.config)
    start = None
    if kinds.get(cfg).encoder_layers:  # neoformer's enc-dec starts targets with BOS, else EOS
        tok = source.tokenizer
        start = (tok.bos_id if tok.bos_id is not None else tok.eos_id) if tok is not None else 0
    set_special_ids(out, ids, decoder_start=start)
    _write_card(out, cfg, arch)
    return {"remote_code": arch is None, "architecture": arch or AUTO_CLASSES[cfg.kind][0]}


def _write_card(out: Path, cfg, arch: str | None) -> None:
    how = (f"the stock transformers class `{arch}`" if arch else
           "neoformer's own model code (`modeling_neoformer.py`); load with `trust_remote_code=True`")
    loader = AUTO_CLASSES[cfg.kind][1]
    remote = "" if arch else ", trust_remote_code=True"
    (out / "README.md").write_text(
        f"# {cfg.name}\n\nExported by `neoformer export` as {how}.\n\n"
        f"```python\nfrom transformers import AutoTokenizer, {loader}\n"
        f"model = {loader}.from_pretrained(PATH{remote})\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n\n"
        f"kind `{cfg.kind}`, d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"vocab {cfg.vocab_size}, position `{cfg.position}`.\n\n" + _planner_table(cfg))


def _planner_table(cfg) -> str:
    """Parameters by component and memory figures from neoformer's planner (exact counts)."""
    from ..planner import count_parameters, human_bytes, human_count, weight_bytes

    counts = count_parameters(cfg)
    rows = [f"| {name} | {n:,} |" for name, n in counts.by_component.items()]
    return ("| component | parameters |\n|---|---|\n" + "\n".join(rows) +
            f"\n| **total** | **{counts.total:,}** ({human_count(counts.total)}) |\n\n"
            f"Weights: {human_bytes(weight_bytes(cfg, 'fp32'))} in fp32, {human_bytes(weight_bytes(cfg, 'bf16'))} "
            f"in bf16 (neoformer planner).\n")


def load_hf(out: Path, kind_name: str, remote_code: bool):
    transformers = optional_import("transformers", "hf")
    auto = getattr(transformers, AUTO_CLASSES[kind_name][1])
    return auto.from_pretrained(str(out), trust_remote_code=remote_code, dtype="auto").eval()


def hf_cached_steps(theirs, ids: torch.Tensor) -> list[torch.Tensor]:
    """transformers' logits for a prefill of PREFILL tokens, then one token at a time with its own cache."""
    out = theirs(input_ids=ids[:, :PREFILL], use_cache=True)
    steps, past = [out.logits], out.past_key_values
    for t in range(PREFILL, ids.shape[1]):
        out = theirs(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
        steps.append(out.logits)
        past = out.past_key_values
    return steps


@torch.no_grad()
def verify_hf(source: Source, out: Path, dtype: torch.dtype, facts: dict) -> tuple[float, str]:
    theirs = load_hf(out, source.cfg.kind, facts["remote_code"])
    cfg = source.cfg
    kind = kinds.get(cfg)
    if not kind.causal:  # encoder: one padded batch
        ids = probe_ids(cfg.vocab_size, PREFILL + DECODE_STEPS)
        mask = probe_padding_mask(ids.shape[1])
        ours = source.model(ids, attention_mask=mask).float()
        diff = max_abs_diff([ours], [theirs(input_ids=ids, attention_mask=mask).logits], keep=mask)
        check_tolerance("hf", diff, dtype, float(ours.abs().max()) if dtype != torch.float32 else 1.0)
        return diff, f"{facts['architecture']}: masked-LM logits of a padded batch (real tokens)"
    if kind.encoder_layers:
        src = probe_ids(cfg.vocab_size, 6, seed=1)
        tgt = probe_ids(cfg.vocab_size, PREFILL + DECODE_STEPS)
        ours = seq2seq_reference(source.model, src, tgt)
        enc = theirs.get_encoder()(input_ids=src)
        out = theirs(encoder_outputs=enc, decoder_input_ids=tgt[:, :PREFILL], use_cache=True)
        steps, past = [out.logits], out.past_key_values
        for t in range(PREFILL, tgt.shape[1]):
            out = theirs(encoder_outputs=enc, decoder_input_ids=tgt[:, t:t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
        diff = max_abs_diff(ours, steps)
        check_tolerance("hf", diff, dtype, float(ours[0].abs().max()) if dtype != torch.float32 else 1.0)
        return diff, f"{facts['architecture']}: encoder + decoder prefill {PREFILL} + {DECODE_STEPS} cached steps"

    return verify_steps("hf", source, dtype, lambda ids: hf_cached_steps(theirs, ids),
                        f"{facts['architecture']}: prefill {PREFILL} + {DECODE_STEPS} steps with the HF cache")

