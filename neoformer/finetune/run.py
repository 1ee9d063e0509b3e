"""One fine-tuning run: base checkpoint + data file -> adapter (or full) checkpoints, through fit().

    from neoformer.finetune import finetune, LoraConfig
    result = finetune("runs/base", "chat.jsonl", "runs/sft", lora=LoraConfig(r=8),
                      train=TrainConfig(max_steps=200, lr=1e-3, batch_size=8))

``lora=None`` fine-tunes every weight (a normal ``full`` checkpoint); ``qlora="nf4"`` quantizes the
frozen base first. ``resume=True`` continues the run in ``out_dir`` bit-exactly (fit()).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

from ..chat import chat_template_of
from ..checkpoint import load_checkpoint
from ..checkpoint.rundir import RunLock, prepare_run_folder
from ..train.fit import FitResult, fit, seed_everything
from ..train.run_config import TrainConfig
from .adapter import AdapterModel, adapter_settings, trainable_share
from .data import SFTBatches, load_examples, sft_objective, split_examples
from .lora import LoraConfig, add_lora
from .qlora import SKIP_EMBEDDING, SKIP_HEAD_AND_EMBEDDING, quantization_settings, quantize_base

DEFAULT_SEQ_LEN = 512


def _prepare_model(model, lora: LoraConfig | None, qlora: str | None, qlora_group_size: int | None,
                   qlora_float_head: bool):
    if lora is None:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if qlora:
        model = quantize_base(model, qlora, qlora_group_size,
                              SKIP_HEAD_AND_EMBEDDING if qlora_float_head else SKIP_EMBEDDING)
    add_lora(model, lora)
    return AdapterModel(model, lora)


def finetune(base: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike | None, *,
             lora: LoraConfig | None = None, train: TrainConfig | None = None, seq_len: int | None = None,
             train_on: str = "assistant", pack: bool = True, qlora: str | None = None,
             qlora_group_size: int | None = None, qlora_float_head: bool = False, val_fraction: float = 0.05, resume: bool = False,
             log: Callable[[str], None] = print, callbacks=()) -> FitResult:
    """Fine-tune the decoder checkpoint ``base`` on ``data`` (see neoformer.finetune.data for formats)."""
    if qlora and lora is None:
        raise ValueError("--qlora trains an adapter on a quantized base; it cannot be combined with --full")
    if qlora_group_size is not None and not qlora:
        raise ValueError("--qlora-group-size applies to --qlora nf4 only")
    if qlora_float_head and not qlora:
        raise ValueError("--qlora-float-head applies to --qlora only")
    train = train or TrainConfig()
    model, tokenizer, base_config = load_checkpoint(base, device="cpu", kinds=("decoder",), contents=("full",),
                                                    command="neoformer finetune")
    if tokenizer is None:
        raise ValueError(f"{base} holds no tokenizer; fine-tuning data must be tokenized the way the base was")
    seq_len = seq_len or train.seq_len or min(model.config.max_seq_len, DEFAULT_SEQ_LEN)
    template = chat_template_of(base_config)
    examples, report = load_examples(data, tokenizer, template, seq_len, train_on)
    train_examples, val_examples = split_examples(examples, val_fraction, train.seed)
    log(report.describe() + (f"; {len(val_examples)} held out for validation" if val_examples else ""))

    seed_everything(train.seed)  # the adapter's init (A) and dropout: the same run gives the same adapter
    model = _prepare_model(model, lora, qlora, qlora_group_size, qlora_float_head)
    trainable, total = trainable_share(model)
    log(f"{('QLoRA (' + qlora + ' base)') if qlora else 'LoRA' if lora else 'full fine-tuning'}: {trainable:,} of {total:,} parameters trainable "
        f"({trainable / total:.2%})")
    # the NeoFormer-X memory reads a running summary across the whole row: no packing there
    packed = pack and getattr(model, "rmc", None) is None
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batches = SFTBatches(train_examples, train.batch_size, seq_len, packed=packed, pad_id=pad_id, seed=train.seed)
    val = (lambda: SFTBatches(val_examples, train.batch_size, seq_len, packed=packed, pad_id=pad_id,
                              shuffle=False)) if val_examples else None
    run_config = {"chat_template": template.to_dict(),
                  "finetune": {"data": str(Path(data).expanduser().resolve()), "format": report.format,
                               "train_on": train_on, "seq_len": seq_len, "packed": packed}}
    if lora is not None:
        run_config.update(adapter_settings(base, lora, template.to_dict(), quantization_settings(model.base_model)
                                           if qlora else None))
    with contextlib.ExitStack() as stack:
        if out_dir is not None:
            stack.callback(RunLock(out_dir).acquire().release)
            prepare_run_folder(out_dir, resume=resume)
        return fit(model, sft_objective, batches, train, val_batches=val, out_dir=out_dir,
                   tokenizer=None if lora is not None else tokenizer, run_config=run_config,
                   resume=resume or None, log=log, callbacks=callbacks)


__all__ = ["finetune", "DEFAULT_SEQ_LEN"]
