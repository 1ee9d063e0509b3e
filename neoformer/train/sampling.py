"""Samples printed at the end of `neoformer train` (``train.samples``): text continuations for
decoders, greedy predictions for encoder-decoders, masked-token accuracy for encoders.

Text comes from :func:`neoformer.generate.generate` (one sampling loop, one stop/EOS rule).
"""
from __future__ import annotations

import torch

from ..config import IGNORE_INDEX

STDLIB_PROMPTS = ("def ", "class ", "import ", "    if ", "for ")


@torch.no_grad()
def sample_tokens(model, ids: list[int], max_new: int, temperature: float = 0.8, top_k: int | None = 50,
                  seed: int = 0, eos_id: int | None = None) -> list[int]:
    """New token ids after ``ids`` (decoder models), from :func:`neoformer.generate.generate`."""
    from ..generate import generate

    out = generate(model, [ids], max_new, temperature=temperature, top_k=top_k, seed=seed,
                   eos_token_id=eos_id, return_dict=True)
    return list(out.new_tokens[0])


def print_samples(model, task, run) -> None:
    kind = run.model.kind
    n, max_new, tok = run.train.samples, run.train.sample_tokens, task.tokenizer
    if kind == "decoder":
        prompts = STDLIB_PROMPTS if run.data.source == "stdlib" else ("\n",)
        print(f"samples (temperature 0.8, top-k 50, {max_new} new tokens):")
        for i in range(n):
            prompt = prompts[i % len(prompts)]
            new = sample_tokens(model, tok.encode(prompt), max_new, seed=i, eos_id=tok.eos_id)
            print(f"--- sample {i + 1} ---\n{prompt}{tok.decode(new)}")
    elif kind == "encoder_decoder":
        _seq2seq_samples(model, task, n, max_new)
    elif task.val is not None:
        _mlm_accuracy(model, task)


@torch.no_grad()
def _seq2seq_samples(model, task, n: int, max_new: int) -> None:
    if task.val is None:
        return
    from ..generate import generate

    tok = task.tokenizer
    batch = next(iter(task.val()))
    print("samples (greedy):")
    for i in range(min(n, batch.src_ids.shape[0])):
        src = batch.src_ids[i][batch.src_mask[i]].tolist()
        out = generate(model, [src], max_new, tokenizer=tok, eos_token_id=tok.eos_id, return_dict=True)
        target = [t for t in batch.tgt_out[i].tolist() if t >= 0]
        print(f"  source:     {tok.decode(src)!r}\n  prediction: {tok.decode(out.new_tokens[0])!r}\n"
              f"  target:     {tok.decode(target)!r}")


@torch.no_grad()
def _mlm_accuracy(model, task) -> None:
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


__all__ = ["sample_tokens", "print_samples"]
