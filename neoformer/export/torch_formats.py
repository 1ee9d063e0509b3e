"""``format="torch-export"`` (an ExportedProgram, ``model.pt2``) and ``format="torchscript"`` (``model.ts``).

Both capture the same one-step modules as the ONNX export (``steps.py``): a decoder's cached step
with the KV cache as flat inputs/outputs (dynamic batch, length and past), or an encoder's logits.
Encoder-decoders are refused with one line (export them as onnx or hf). TorchScript is traced,
best effort: a graph that does not reproduce neoformer at other shapes fails verification.

Loading a .pt2 or TorchScript file runs PyTorch's own deserializer on it: only load files you wrote
or trust (the same caution as any pickle-based format; neoformer itself never loads them except
to verify the file it just wrote).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .common import (
    DECODE_STEPS, PREFILL, ExportError, Source, check_tolerance, max_abs_diff, probe_ids, probe_padding_mask,
    verify_steps, write_json,
)
from .steps import DecoderStep, EncoderLogits, eager_copy, kv_names, random_kv


def check_supported(source: Source, dtype, quant) -> None:
    if source.kind.encoder_layers:
        raise ExportError("torch-export/torchscript support decoders and encoders; export an encoder-decoder "
                          "with --format onnx or --format hf")


def _module_and_examples(source: Source, dtype: torch.dtype):
    """(module, example args, input names, dynamic axes per input)."""
    cfg = source.cfg
    model = eager_copy(source.model)
    B, P, L = 2, 3, 2
    ids = torch.randint(0, cfg.vocab_size, (B, L))
    if not source.kind.causal:
        return EncoderLogits(model), (ids, torch.ones(B, L, dtype=torch.long)), ["input_ids", "attention_mask"], \
            {"input_ids": (0, 1), "attention_mask": (0, 1)}
    names = kv_names(cfg.n_layers, "past_key_values")
    args = [ids, torch.ones(B, P + L, dtype=torch.long), *random_kv(cfg, B, P, dtype, 1)]
    axes = {"input_ids": (0, 1), "attention_mask": (0, 1), **{n: (0, 2) for n in names}}
    if model.rmc is not None:
        names += ["past_memory.total", "past_memory.count"]
        args += [torch.randn(B, cfg.d_model).to(dtype), torch.full((B,), float(P)).to(dtype)]
        axes.update({"past_memory.total": (0,), "past_memory.count": (0,)})
    return DecoderStep(model), tuple(args), ["input_ids", "attention_mask", *names], axes


def write_meta(source: Source, out: Path, fmt: str, names: list[str], dtype) -> None:
    write_json(out / "neoformer_export.json", {"format": fmt, "inputs": names, "kind": source.cfg.kind,
                                               "dtype": str(dtype).removeprefix("torch."),
                                               "model": source.cfg.to_dict()})
    if source.tokenizer is not None:
        source.tokenizer.save(out / "tokenizer")


def exported_program(source: Source, dtype: torch.dtype):
    """(ExportedProgram of the one-step module with dynamic batch / sequence / past, input names)."""
    module, args, names, axes = _module_and_examples(source, dtype)
    Dim, limit = torch.export.Dim, source.cfg.max_seq_len
    batch, seq, past = Dim("batch", max=4096), Dim("seq", max=limit), Dim("past", max=limit)
    size = {0: batch, 1: seq, 2: past}  # input axis -> its dim; the mask spans past + new tokens
    # the mask's length is past + seq, which torch.export infers (a Dim may derive from one other only)
    shapes = [{0: batch, 1: seq}, {0: batch, 1: seq if not source.kind.causal else Dim.AUTO}]
    if len(names) > 2:
        shapes.append(tuple({a: size[a] for a in axes[n]} for n in names[2:]))
    try:
        program = torch.export.export(module, args, dynamic_shapes=tuple(shapes))
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"torch.export failed: {first}") from error
    return program, names


def write_exported_program(source: Source, out: Path, dtype: torch.dtype) -> dict:
    program, names = exported_program(source, dtype)
    torch.export.save(program, str(out / "model.pt2"))
    write_meta(source, out, "torch-export", names, dtype)
    return {}


def write_torchscript(source: Source, out: Path, dtype: torch.dtype) -> dict:
    module, args, names, _ = _module_and_examples(source, dtype)
    try:
        traced = torch.jit.trace(module, args, check_trace=False, strict=False)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"TorchScript tracing failed ({first}); use --format torch-export or onnx") from error
    torch.jit.save(traced, str(out / "model.ts"))
    write_meta(source, out, "torchscript", names, dtype)
    return {}


def verify_one_step(source: Source, dtype, call, what: str) -> tuple[float, str]:
    cfg = source.cfg
    if not source.kind.causal:
        ids = probe_ids(cfg.vocab_size, PREFILL + DECODE_STEPS)
        mask = probe_padding_mask(ids.shape[1])
        diff = max_abs_diff([source.model(ids, attention_mask=mask).float()], [call(ids, mask)], keep=mask)
        check_tolerance(what, diff, dtype)
        return diff, f"{what}: masked-LM logits of a padded batch"

    def run(ids):
        B = ids.shape[0]
        past = [torch.zeros(B, cfg.resolved_n_kv_heads, 0, cfg.resolved_head_dim, dtype=dtype)
                for _ in range(2 * cfg.n_layers)]
        if source.model.rmc is not None:
            past += [torch.zeros(B, cfg.d_model, dtype=dtype), torch.zeros(B, dtype=dtype)]
        mask = torch.zeros(B, 0, dtype=torch.long)
        steps = []
        for chunk in [ids[:, :PREFILL], *[ids[:, t:t + 1] for t in range(PREFILL, ids.shape[1])]]:
            mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
            logits, *past = call(chunk, mask, *past)
            steps.append(logits)
        return steps

    return verify_steps(what, source, dtype, run, f"{what}: prefill {PREFILL} + {DECODE_STEPS} cached steps")


@torch.no_grad()
def verify_exported_program(source: Source, out: Path, dtype: torch.dtype, facts: dict) -> tuple[float, str]:
    # torch.export derives one guard from a stride check while tracing with a non-empty past
    # (mask length != new tokens) that a prefill (empty past) breaks; the graph itself is right at
    # every length, which this verification shows, so the guards are not checked
    module = torch.export.load(str(out / "model.pt2")).module(check_guards=False)
    return verify_one_step(source, dtype, module, "torch-export")


@torch.no_grad()
def verify_torchscript(source: Source, out: Path, dtype: torch.dtype, facts: dict) -> tuple[float, str]:
    module = torch.jit.load(str(out / "model.ts"))
    return verify_one_step(source, dtype, module, "torchscript")
