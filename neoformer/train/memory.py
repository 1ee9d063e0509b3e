"""Peak training memory of ``fit()``, predicted before the first step (the planner's training half).

peak = weights + grads + optimizer state + saved activations + the transient of the loss chunk.

Weights, grads and optimizer state are arithmetic on the parameter count (fit() keeps fp32 weights
under autocast, so the state does not depend on the precision). The activations are *read off the
model*: a probe runs the objective's forward once at batch 1 and once at batch 2, at the training
sequence length and precision, under ``saved_tensors_hooks`` and adds up the distinct storages
autograd keeps for backward (parameters excluded). The difference is the cost of one row, the rest
is the per-forward constant (RoPE tables, the head gradient of the chunked loss), so
``activations(batch) = constant + batch * per_row``. Reading them off the model keeps the prediction
right for every attention path (the CPU flash kernel, the chunked attention attention dropout
takes on CPU), MoE, RMC/NSB and autocast without a formula per layer type; the chunked
attention's backward transient is added from its own formula (model/chunked_attention.py). With gradient checkpointing the
probe sees only the block inputs; one block's activations are recomputed at a time in backward
(the difference divided by the number of blocks), after the loss chunk is gone: the larger of the
two is added once.
Assumptions and the measured error: docs/planner.md.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import kernels_available
from ..model import head_loss
from ..model.chunked_attention import backward_peak_bytes
from ..model.head_loss import chunk_rows_for

OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "lion": 4}  # fp32 moments; fit() keeps fp32 weights and grads


@dataclass(frozen=True)
class MemoryPrediction:
    weights: int
    grads: int
    optimizer: int
    activations: int  # saved for backward at the end of the forward
    loss_chunk: int  # one chunk of logits, their softmax and gradient (at the end of the forward)
    recompute: int = 0  # gradient checkpointing: one block's activations, rebuilt in backward
    attention: int = 0  # chunked attention with dropout (CPU): one chunk's backward transient

    @property
    def total(self) -> int:
        # the loss chunk lives at the end of the forward, a recomputed block and an attention chunk's
        # backward later (the chunk inside the recomputed block's backward): never the loss chunk with them
        return self.weights + self.grads + self.optimizer + self.activations + \
            max(self.loss_chunk, self.recompute + self.attention)

    def describe(self) -> str:
        from ..planner import human_bytes

        return (f"{human_bytes(self.total)} (weights {human_bytes(self.weights)}, grads {human_bytes(self.grads)}, "
                f"optimizer {human_bytes(self.optimizer)}, activations {human_bytes(self.activations)}, "
                f"loss chunk {human_bytes(self.loss_chunk)}"
                + (f", recomputed block {human_bytes(self.recompute)}" if self.recompute else "")
                + (f", attention chunk {human_bytes(self.attention)})" if self.attention else ")"))


def _probe_batch(model: nn.Module, rows: int, seq: int, device) -> dict:
    """One batch every built-in objective reads (each takes the fields it names)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, seq), device=device)
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "targets": ids, "labels": ids, "attention_mask": None,
            "src_ids": ids, "src_mask": mask, "tgt_in": ids, "tgt_out": ids}


def saved_activation_bytes(model: nn.Module, objective, rows: int, seq: int,
                           amp_dtype: torch.dtype | None = None) -> int:
    """Peak bytes of the distinct non-parameter storages autograd holds for backward during one training
    forward. A storage counts from the first saved tensor on it until autograd lets its last one go, so
    tensors a nested graph saves and frees inside the forward (the chunked loss, checkpointed blocks) count
    while they live; keying storages by address alone would merge a freed storage with a later one the
    allocator puts at the same address (measured: 1.2-2.5 GiB for the same bf16 model, run to run)."""
    device = next(model.parameters()).device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live: dict[int, list[int]] = {}  # storage address -> [bytes, saved tensors alive on it]
    total, peak = [0], [0]

    def release(address: int) -> None:
        entry = live[address]
        entry[1] -= 1
        if entry[1] == 0:
            total[0] -= entry[0]
            del live[address]

    def pack(t: torch.Tensor):
        # a detached alias, not t: a saved output returned as itself holds its own grad_fn, a cycle through
        # C++ that Python's collector cannot break (measured: the probe's whole 0.7 GiB graph outlived it)
        alias = t.detach()
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address not in params and t.device.type != "meta":
            if address not in live:
                live[address] = [storage.nbytes(), 0]
                total[0] += storage.nbytes()
                peak[0] = max(peak[0], total[0])
            live[address][1] += 1
            weakref.finalize(alias, release, address)  # only the graph holds the alias: freed with it
        return alias

    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss, _ = objective(model, _probe_batch(model, rows, seq, device))
        del loss
    finally:
        model.train(was_training)
    return peak[0]


def _blocks(model: nn.Module) -> int:
    from ..model.block import Block

    return max(1, sum(isinstance(m, Block) for m in model.modules()))


def _activations(model, objective, batch: int, seq: int, amp_dtype) -> int:
    """Saved bytes at ``batch`` rows, extrapolated from probes at 2 and 3 rows (linear in rows from 2 on;
    a 1-row batch saves less per row, its size-1 dimensions make some reshapes views instead of copies)."""
    if batch <= 3:
        return saved_activation_bytes(model, objective, batch, seq, amp_dtype)
    two = saved_activation_bytes(model, objective, 2, seq, amp_dtype)
    three = saved_activation_bytes(model, objective, 3, seq, amp_dtype)
    per_row = max(0, three - two)
    return max(0, two - 2 * per_row) + batch * per_row


def _loss_chunk(model, tokens: int, amp_dtype) -> int:
    """The chunked loss's transient (model/head_loss.py): the head cast once to the matmul's dtype and transposed,
    bf16's (V, D) product and widening buffers, and one chunk: on CPU with the fused cross-entropy kernel the
    logits only (their gradient overwrites them), else the logits, their fp32 copy/softmax and their gradient."""
    vocab, width = model.config.vocab_size, model.config.d_model
    rows = min(tokens, model.loss_chunk_rows or chunk_rows_for(vocab))
    matmul_bytes = 2 if amp_dtype in (torch.bfloat16, torch.float16) else 4
    head = vocab * width * (matmul_bytes + (matmul_bytes + 2 + 4 if matmul_bytes == 2 else 0))
    device = next(model.parameters()).device
    if head_loss.CROSS_ENTROPY_KERNELS and device.type == "cpu" and amp_dtype in (None, torch.bfloat16):
        return head + rows * vocab * matmul_bytes
    return head + 3 * rows * vocab * 4


def predict_training_memory(model: nn.Module, objective, batch: int, seq: int, *, amp_dtype=None,
                            gradient_checkpointing: bool = False, optimizer: str = "adamw") -> MemoryPrediction:
    """Predicted peak bytes of a ``fit()`` step with micro-batches of ``batch`` x ``seq`` tokens."""
    if next(model.parameters()).device.type == "cpu":
        kernels_available()  # as fit() does: the probe and the loss chunk then see the fused cross-entropy
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_weights = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    checkpointing = getattr(model.config, "gradient_checkpointing", False)
    set_checkpointing = getattr(model, "set_gradient_checkpointing", None)
    try:
        if set_checkpointing is not None:
            set_checkpointing(False)
        activations = _activations(model, objective, batch, seq, amp_dtype)
        recompute = 0
        if gradient_checkpointing and set_checkpointing is not None:
            set_checkpointing(True)
            full, activations = activations, _activations(model, objective, batch, seq, amp_dtype)
            recompute = max(0, full - activations) // _blocks(model)
    finally:
        if set_checkpointing is not None:
            set_checkpointing(checkpointing)
    return MemoryPrediction(weights=n_weights, grads=4 * n_params,
                            optimizer=OPTIMIZER_BYTES_PER_PARAM.get(optimizer, 8) * n_params,
                            activations=activations, loss_chunk=_loss_chunk(model, batch * seq, amp_dtype),
                            recompute=recompute,
                            attention=_attention_transient(model, batch, seq))


def _attention_transient(model: nn.Module, batch: int, seq: int) -> int:
    """Backward transient of the chunked attention (model/chunked_attention.py): CPU training with
    attention dropout only; the SDPA kernels of the other cases keep theirs small and blockwise."""
    cfg = model.config
    if next(model.parameters()).device.type != "cpu" or not cfg.attn_dropout:
        return 0
    return backward_peak_bytes(batch * cfg.n_heads, seq, seq, cfg.resolved_head_dim)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process now: MemAvailable on CPU (Linux), free device memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None





def memory_report(model: nn.Module, objective, batch: int, seq: int, device: torch.device, *, amp_dtype=None,
                  gradient_checkpointing: bool = False, optimizer: str = "adamw") -> list[str]:
    """The train header's lines: the predicted peak, and a warning with the flags to change when it
    exceeds the memory available now (the prediction with gradient checkpointing, if that fits)."""
    pred = predict_training_memory(model, objective, batch, seq, amp_dtype=amp_dtype,
                                   gradient_checkpointing=gradient_checkpointing, optimizer=optimizer)
    lines = [f"memory: predicted peak {pred.describe()}"]
    free = available_memory(device)
    if free is None or pred.total <= free:
        return lines
    from ..planner import human_bytes

    advice = []
    if not gradient_checkpointing:
        ckpt = predict_training_memory(model, objective, batch, seq, amp_dtype=amp_dtype,
                                       gradient_checkpointing=True, optimizer=optimizer)
        advice.append(f"--gradient-checkpointing (predicted {human_bytes(ckpt.total)})")
    advice.append(f"a smaller --batch with --grad-accum (activations are ~{human_bytes(pred.activations // batch)} "
                  "per row)")
    lines.append(f"warning: the predicted peak {human_bytes(pred.total)} exceeds the {human_bytes(free)} available on "
                 f"{device.type}; use " + " or ".join(advice))
    return lines


__all__ = ["MemoryPrediction", "predict_training_memory", "saved_activation_bytes", "available_memory", "memory_report"]
