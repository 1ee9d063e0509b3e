"""Samples printed at the end of `neoformer train` (``train.samples``): text continuations for
decoders, greedy predictions for encoder-decoders, masked-token accuracy for encoders.

Each model kind names its printer in neoformer/kinds.py; :func:`print_samples` looks it up.
Generation goes through :func:`neoformer.generate.generate` (one sampling loop in the package).
"""
from __future__ import annotations

import torch

from ..generate import generate
from ..kinds import get as model_kind
from ..config import IGNORE_INDEX

# no trailing space: a byte-level BPE encodes it as its own token, and the model, which has mostly seen
# " name" tokens after "def", then prints "def  main"
STDLIB_PROMPTS = ("def", "class", "import", "    if", "for")


def sample_tokens(model, ids: list[int], max_new: int, temperature: float = 0.8, top_k: int | None = 50,
                  seed: int = 0, eos_id: int | None = None) -> list[int]:
    """New token ids after ``ids`` (decoder models)."""
    out = generate(model, [ids], max_new, temperature=temperature, top_k=top_k, seed=seed, eos_token_id=eos_id,
                   return_dict=True)
    return list(out.new_tokens[0])


def print_samples(model, task, run) -> None:
    """What the model kind prints after training (its ``sample_printer``)."""
    model_kind(run.model).load("sample_printer")(model, task, run)


def print_continuations(model, task, run) -> None:
    """kind=decoder: ``train.samples`` continuations of short prompts."""
    n, max_new, tok = run.train.samples, run.train.sample_tokens, task.tokenizer
    prompts = STDLIB_PROMPTS if run.data.source == "stdlib" else ("\n",)
    print(f"samples (temperature 0.8, top-k 50, {max_new} new tokens):")
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        new = sample_tokens(model, tok.encode(prompt), max_new, seed=i, eos_id=tok.eos_id)
        print(f"--- sample {i + 1} ---\n{prompt}{tok.decode(new)}")


@torch.no_grad()
def print_translations(model, task, run) -> None:
    """kind=encoder_decoder: greedy predictions for validation sources, beside their targets."""
    if task.val is None:
        return
    n, max_new, tok = run.train.samples, run.train.sample_tokens, task.tokenizer
    batch = next(iter(task.val()))
    print("samples (greedy):")
    for i in range(min(n, batch.src_ids.shape[0])):
        src = batch.src_ids[i][batch.src_mask[i]].tolist()
        out = generate(model, [src], max_new, tokenizer=tok, eos_token_id=tok.eos_id, return_dict=True)
        target = [t for t in batch.tgt_out[i].tolist() if t >= 0]
        print(f"  source:     {tok.decode(src)!r}\n  prediction: {tok.decode(out.new_tokens[0])!r}\n"
              f"  target:     {tok.decode(target)!r}")


@torch.no_grad()
def print_mlm_accuracy(model, task, run) -> None:
    """kind=encoder: masked-token accuracy on one validation batch."""
    if task.val is None:
        return
    batch = next(iter(task.val()))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(batch["input_ids"].to(device))
    finally:
        model.train(was_training)
    labels = batch["labels"].to(device)
    chosen = labels != IGNORE_INDEX
    accuracy = (logits.argmax(-1)[chosen] == labels[chosen]).float().mean().item()
    print(f"masked-token accuracy on a validation batch: {accuracy:.1%} ({int(chosen.sum())} masked tokens)")


__all__ = ["sample_tokens", "print_samples", "print_continuations", "print_translations", "print_mlm_accuracy"]
