"""One fine-tuning run: base checkpoint (decoder, encoder or encoder-decoder) + data file -> adapter
(or full) checkpoints, through fit().

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

from ..checkpoint import load_checkpoint
from ..checkpoint.rundir import RunLock, prepare_run_folder
from ..train.fit import FitResult, fit, seed_everything
from ..train.run_config import TrainConfig
from .adapter import AdapterModel, adapter_settings, trainable_share
from .lora import LoraConfig, add_lora
from .qlora import SKIP_EMBEDDING, SKIP_HEAD_AND_EMBEDDING, quantization_settings, quantize_base
from .tasks import TASKS, build_task

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
             qlora_group_size: int | None = None, qlora_float_head: bool = False, mask_prob: float = 0.15,
             val_fraction: float = 0.05, resume: bool = False, log: Callable[[str], None] = print,
             callbacks=()) -> FitResult:
    """Fine-tune the checkpoint ``base`` on ``data``: a decoder on text / Alpaca / chat data, an
    encoder with masked-LM on text (``mask_prob``), an encoder-decoder on source/target pairs
    (neoformer.finetune.tasks)."""
    if qlora and lora is None:
        raise ValueError("--qlora trains an adapter on a quantized base; it cannot be combined with --full")
    if qlora_group_size is not None and not qlora:
        raise ValueError("--qlora-group-size applies to --qlora nf4 only")
    if qlora_float_head and not qlora:
        raise ValueError("--qlora-float-head applies to --qlora only")
    train = train or TrainConfig()
    model, tokenizer, base_config = load_checkpoint(base, device="cpu", kinds=tuple(TASKS), contents=("full",),
                                                    command="neoformer finetune")
    if tokenizer is None:
        raise ValueError(f"{base} holds no tokenizer; fine-tuning data must be tokenized the way the base was")
    seq_len = seq_len or train.seq_len or min(model.config.max_seq_len, DEFAULT_SEQ_LEN)
    task = build_task(model.config.kind, data, model, tokenizer, base_config, seq_len=seq_len, train_on=train_on,
                      pack=pack, val_fraction=val_fraction, batch_size=train.batch_size, seed=train.seed,
                      mask_prob=mask_prob)
    log(task.report.describe() + (f"; {task.held_out} held out for validation" if task.held_out else ""))

    seed_everything(train.seed)  # the adapter's init (A) and dropout: the same run gives the same adapter
    model = _prepare_model(model, lora, qlora, qlora_group_size, qlora_float_head)
    trainable, total = trainable_share(model)
    log(f"{('QLoRA (' + qlora + ' base)') if qlora else 'LoRA' if lora else 'full fine-tuning'}: {trainable:,} of {total:,} parameters trainable "
        f"({trainable / total:.2%})")
    run_config = {"chat_template": task.chat_template,
                  "finetune": {"data": str(Path(data).expanduser().resolve()), **task.settings}}
    if lora is not None:
        run_config.update(adapter_settings(base, lora, task.chat_template, quantization_settings(model.base_model)
                                           if qlora else None))
    with contextlib.ExitStack() as stack:
        if out_dir is not None:
            stack.callback(RunLock(out_dir).acquire().release)
            prepare_run_folder(out_dir, resume=resume)
        return fit(model, task.objective, task.train, train, val_batches=task.val, out_dir=out_dir,
                   tokenizer=None if lora is not None else tokenizer, run_config=run_config,
                   resume=resume or None, log=log, callbacks=callbacks)


__all__ = ["finetune", "DEFAULT_SEQ_LEN"]
