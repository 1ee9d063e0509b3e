"""``format="onnx"``: graphs for onnxruntime with the KV cache as inputs and outputs.

Decoder (``model.onnx``): ``input_ids`` (B, L), ``attention_mask`` (B, P+L, 1 = token) and per layer
``past_key_values.{i}.key/value`` (B, H_kv, P, Dh) -> ``logits`` (B, L, V) and ``present.{i}.key/value``
(B, H_kv, P+L, Dh); batch, sequence and past length are dynamic (the Optimum / onnxruntime-genai
naming). A NeoFormer-X memory layer adds ``past_memory.total`` (B, D) / ``past_memory.count`` (B,).
Encoder (``model.onnx``): ``input_ids``, ``attention_mask`` -> ``logits``. Encoder-decoder:
``encoder.onnx`` (source -> memory) and ``decoder.onnx`` (target step + memory + cache).

Every KV example input is a distinct random tensor: exporting with one shared example tensor lets
the tracer merge the inputs (pytorch #139646 / #144683). Attention runs through neoformer's eager
backend, the plain-matmul reference, which every opset expresses.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from .common import (
    DECODE_STEPS, PREFILL, ExportError, Source, check_tolerance, max_abs_diff, optional_import, probe_ids,
    probe_padding_mask, seq2seq_reference, verify_steps, write_json,
)
from .steps import DecoderStep, EncoderLogits, Seq2SeqDecoderStep, Seq2SeqEncoder, eager_copy, kv_names, random_kv

OPSET = 18


def _export(module, args, path: Path, input_names, output_names, dynamic: dict[str, dict[int, str]]) -> None:
    optional_import("onnxscript", "onnx")
    module.eval()  # the wrapper's own flag (its model is already in eval mode); silences the exporter's warning
    dims = {name: {axis: torch.export.Dim.AUTO for axis in axes} for name, axes in dynamic.items()}
    # dynamic_shapes follow forward's signature: the named args, then one tuple for the *flat tensors
    n_named = sum(p.kind != p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values())
    shapes = [dims.get(name) for name in input_names[:n_named]]
    if len(input_names) > n_named:
        shapes.append(tuple(dims.get(name) for name in input_names[n_named:]))
    try:
        program = torch.onnx.export(module, tuple(args), dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=tuple(shapes), verbose=False,
                                    optimize=True)
    except Exception as error:  # the exporter raises many types; keep it one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"ONNX export failed: {first}") from error  # the cause stays for API users
    program.save(str(path))


def check_supported(source: Source, dtype, quant) -> None:
    optional_import("onnx", "onnx")
    optional_import("onnxruntime", "onnx")


def write_onnx(source: Source, out: Path, dtype: torch.dtype) -> dict:
    cfg, kind = source.cfg, source.kind
    model = eager_copy(source.model)
    B, P, L, S = 2, 3, 2, 4
    ids = torch.randint(0, cfg.vocab_size, (B, L))
    with torch.no_grad():
        if not kind.causal:
            _export(EncoderLogits(model), (ids, torch.ones(B, L, dtype=torch.long)), out / "model.onnx",
                    ["input_ids", "attention_mask"], ["logits"], {"input_ids": {0: "B", 1: "L"},
                                                                  "attention_mask": {0: "B", 1: "L"}})
        elif kind.encoder_layers:
            src = torch.randint(0, cfg.vocab_size, (B, S))
            _export(Seq2SeqEncoder(model), (src, torch.ones(B, S, dtype=torch.long)), out / "encoder.onnx",
                    ["input_ids", "attention_mask"], ["memory"], {"input_ids": {0: "B", 1: "S"},
                                                                  "attention_mask": {0: "B", 1: "S"}})
            memory = torch.randn(B, S, cfg.d_model).to(dtype)
            past_names, present_names = kv_names(cfg.n_layers, "past_key_values"), kv_names(cfg.n_layers, "present")
            kv_axes = {name: {0: "B", 2: "P"} for name in past_names}
            _export(Seq2SeqDecoderStep(model), (ids, memory, torch.ones(B, S, dtype=torch.long),
                                                *random_kv(cfg, B, P, dtype, 1)), out / "decoder.onnx",
                    ["decoder_input_ids", "memory", "attention_mask", *past_names], ["logits", *present_names],
                    {"decoder_input_ids": {0: "B", 1: "L"}, "memory": {0: "B", 1: "S"},
                     "attention_mask": {0: "B", 1: "S"}, **kv_axes})
        else:
            past_names, present_names = kv_names(cfg.n_layers, "past_key_values"), kv_names(cfg.n_layers, "present")
            args = [ids, torch.ones(B, P + L, dtype=torch.long), *random_kv(cfg, B, P, dtype, 1)]
            axes = {"input_ids": {0: "B", 1: "L"}, "attention_mask": {0: "B", 1: "T"},
                    **{name: {0: "B", 2: "P"} for name in past_names}}
            if model.rmc is not None:
                past_names += ["past_memory.total", "past_memory.count"]
                present_names += ["present_memory.total", "present_memory.count"]
                args += [torch.randn(B, cfg.d_model).to(dtype), torch.full((B,), float(P)).to(dtype)]
                axes.update({"past_memory.total": {0: "B"}, "past_memory.count": {0: "B"}})
            _export(DecoderStep(model), args, out / "model.onnx", ["input_ids", "attention_mask", *past_names],
                    ["logits", *present_names], axes)
    write_json(out / "neoformer_onnx.json", {"kind": cfg.kind, "n_layers": cfg.n_layers,
                                             "n_kv_heads": cfg.resolved_n_kv_heads, "head_dim": cfg.resolved_head_dim,
                                             "d_model": cfg.d_model, "memory": model.rmc is not None if
                                             kind.causal and not kind.encoder_layers else False,
                                             "dtype": str(dtype).removeprefix("torch."), "opset": OPSET,
                                             "model": cfg.to_dict()})
    if source.tokenizer is not None:
        source.tokenizer.save(out / "tokenizer")
    return {}


# ---- running the exported graphs with onnxruntime ----------------------------------------------
class OnnxDecoder:
    """onnxruntime session of a decoder export with its cache kept between calls (what ``generate --onnx`` runs)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import json

        ort = optional_import("onnxruntime", "onnx")
        folder = Path(folder)
        self.meta = json.loads((folder / "neoformer_onnx.json").read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.np_dtype = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}[self.meta["dtype"]]
        self.reset(0)

    def reset(self, batch: int) -> None:
        import numpy as np

        m = self.meta
        empty = np.zeros((batch, m["n_kv_heads"], 0, m["head_dim"]), dtype=self.np_dtype)
        self.past = {name: empty for name in kv_names(m["n_layers"], "past_key_values")}
        if m["memory"]:
            self.past["past_memory.total"] = np.zeros((batch, m["d_model"]), dtype=self.np_dtype)
            self.past["past_memory.count"] = np.zeros((batch,), dtype=self.np_dtype)
        self.mask = np.zeros((batch, 0), dtype=np.int64)

    def step(self, ids):
        """ids (B, L) -> logits (B, L, V) as numpy; the cache grows by L."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        self.mask = np.concatenate([self.mask, np.ones(ids.shape, dtype=np.int64)], axis=1)
        outputs = self.session.run(None, {"input_ids": ids, "attention_mask": self.mask, **self.past})
        names = [o.name for o in self.session.get_outputs()]
        for name, value in zip(names[1:], outputs[1:]):
            self.past[name.replace("present", "past_key_values", 1) if name.startswith("present.")
                      else name.replace("present_memory", "past_memory")] = value
        return outputs[0]


@torch.no_grad()
def verify_onnx(source: Source, out: Path, dtype: torch.dtype, facts: dict) -> tuple[float, str]:
    import numpy as np

    ort = optional_import("onnxruntime", "onnx")
    cfg, kind = source.cfg, source.kind
    if not kind.causal:
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        ids = probe_ids(cfg.vocab_size, PREFILL + DECODE_STEPS)
        mask = probe_padding_mask(ids.shape[1])
        ours = source.model(ids, attention_mask=mask).float()
        theirs = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        diff = max_abs_diff([ours], [torch.from_numpy(theirs)], keep=mask)
        check_tolerance("onnx", diff, dtype)
        return diff, "onnxruntime: masked-LM logits of a padded batch"
    if kind.encoder_layers:
        return _verify_seq2seq(source, out, dtype, ort, np)

    def run(ids):
        decoder = OnnxDecoder(out)
        decoder.reset(ids.shape[0])
        steps = [decoder.step(ids[:, :PREFILL].numpy())]
        steps += [decoder.step(ids[:, t:t + 1].numpy()) for t in range(PREFILL, ids.shape[1])]
        return [torch.from_numpy(np.asarray(s, dtype=np.float32)) for s in steps]

    return verify_steps("onnx", source, dtype, run,
                        f"onnxruntime: prefill {PREFILL} + {DECODE_STEPS} steps, KV cache as inputs/outputs")


def _verify_seq2seq(source, out, dtype, ort, np):
    cfg = source.cfg
    encoder = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    src = probe_ids(cfg.vocab_size, 6, seed=1)
    tgt = probe_ids(cfg.vocab_size, PREFILL + DECODE_STEPS)
    ours = seq2seq_reference(source.model, src, tgt)
    src_mask = np.ones(src.shape, dtype=np.int64)
    memory = encoder.run(None, {"input_ids": src.numpy(), "attention_mask": src_mask})[0]
    empty = np.zeros((src.shape[0], cfg.resolved_n_kv_heads, 0, cfg.resolved_head_dim), dtype=memory.dtype)
    past = {name: empty for name in kv_names(cfg.n_layers, "past_key_values")}
    steps = []
    for chunk in [tgt[:, :PREFILL], *[tgt[:, t:t + 1] for t in range(PREFILL, tgt.shape[1])]]:
        outputs = decoder.run(None, {"decoder_input_ids": chunk.numpy(), "memory": memory,
                                     "attention_mask": src_mask, **past})
        steps.append(torch.from_numpy(np.asarray(outputs[0], dtype=np.float32)))
        past = dict(zip(kv_names(cfg.n_layers, "past_key_values"), outputs[1:]))
    diff = max_abs_diff(ours, steps)
    check_tolerance("onnx", diff, dtype)
    return diff, f"onnxruntime: encoder + decoder prefill {PREFILL} + {DECODE_STEPS} cached steps"


def onnx_greedy(folder: str | Path | OnnxDecoder, prompt_ids: list[int], max_new_tokens: int,
                eos_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation of one prompt by onnxruntime on a decoder export (``generate --onnx``)."""
    import numpy as np

    decoder = folder if isinstance(folder, OnnxDecoder) else OnnxDecoder(folder)
    if decoder.meta["kind"] != "decoder":
        raise ExportError(f"{folder} holds a {decoder.meta['kind']} ONNX export; --onnx generates with decoders")
    if not prompt_ids:
        raise ExportError("the prompt encodes to no tokens")
    decoder.reset(1)
    logits = decoder.step(np.asarray([prompt_ids]))
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in eos_ids:
            break
        logits = decoder.step(np.asarray([[token]]))
    return new
