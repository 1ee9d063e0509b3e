"""Worker for tests/test_parallel.py: a tiny hand-written training loop run in 1 or N processes.

Every run trains the same model on the same *global* batches (a pure function of the step),
each rank taking its rows with ``shard_batch``; results are written as plain tensors for the
test to compare. Imported by the test (world size 1) or launched by torchrun (world size N).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from neoformer import parallel
from neoformer.model import build_model

PRESET = "neoformer-x-debug"
GLOBAL_BATCH, SEQ = 4, 16


def global_batch(step: int, vocab: int, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids; ``masked``: most targets of the first rows ignored (-100), so ranks hold
    different numbers of targets, as with MLM masking or padding."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    if masked:
        keep = torch.rand(y.shape, generator=g) < torch.linspace(0.1, 0.9, GLOBAL_BATCH)[:, None]
        y[~keep] = -100
    return x, y


def make(ctx, mode: str, **apply_kwargs):
    torch.manual_seed(0)
    model = build_model(PRESET, dtype=torch.float64)
    model = parallel.apply(model, ctx, mode, **apply_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def train(model, opt, ctx, start: int, stop: int, micro: int = 1, masked: bool = False) -> list[float]:
    """Steps [start, stop); ``micro`` > 1 splits this rank's rows into gradient-accumulation micro-batches."""
    losses = []
    for step in range(start, stop):
        x, y = parallel.shard_batch(global_batch(step, model.config.vocab_size, masked), ctx)
        opt.zero_grad(set_to_none=True)
        xs, ys = x.chunk(micro), y.chunk(micro)
        for i in range(micro):
            parallel.set_grad_sync(model, i == micro - 1)
            loss, _ = model.loss(xs[i].to(ctx.device), ys[i].to(ctx.device))
            loss = loss * ctx.token_share((ys[i] != -100).sum())  # as fit() does
            (loss / micro).backward()
        parallel.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(ctx.mean(loss.detach()))
    return losses


def full_weights(model) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the weights (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone().cpu() for k, v in sd.items()}


def run_distributed(out: Path) -> None:
    """World size N: DDP and FSDP runs, a sharded save mid-run and a resume."""
    ctx = parallel.setup()
    results: dict = {"world_size": ctx.world_size}
    try:
        # agreement: one rank's NaN / signal / time budget stops every rank
        results["any"] = [ctx.any(ctx.rank == 1), ctx.any(False)]
        results["agree"] = ctx.agree("time_budget" if ctx.rank == 1 else None, ("max_steps", "time_budget", "interrupted"))
        results["gathered"] = ctx.gather_objects({"rank": ctx.rank})
        model, opt = make(ctx, "ddp")
        results["ddp_losses"] = train(model, opt, ctx, 0, 4)
        results["ddp"] = full_weights(model)
        model, opt = make(ctx, "ddp")
        results["ddp_masked_losses"] = train(model, opt, ctx, 0, 4, masked=True)
        results["ddp_masked"] = full_weights(model)
        model, opt = make(ctx, "ddp")
        results["ddp_accum_losses"] = train(model, opt, ctx, 0, 4, micro=2)
        results["ddp_accum"] = full_weights(model)

        model, opt = make(ctx, "fsdp", activation_checkpointing=True)
        results["fsdp_losses"] = train(model, opt, ctx, 0, 2)
        parallel.save_sharded(out / "ckpt", model, opt, ctx, extra={"step": 2}, rank_state={"rank": ctx.rank})
        results["fsdp_losses"] += train(model, opt, ctx, 2, 4)
        results["fsdp"] = full_weights(model)

        model, opt = make(ctx, "fsdp")  # fresh weights, then resume
        info = parallel.load_sharded(out / "ckpt", model, opt, ctx)
        assert info["rank_state"] == {"rank": ctx.rank}, info
        step = info["extra"]["step"]
        results["resumed_losses"] = train(model, opt, ctx, step, 4)
        results["resumed"] = full_weights(model)
        if ctx.is_main:
            torch.save(results, out / "results.pt")
        ctx.barrier()
    finally:
        parallel.teardown(ctx)


def run_compiled(out: Path) -> None:
    """FSDP with activation checkpointing and per-block torch.compile (slow: cold compiles)."""
    ctx = parallel.setup()
    try:
        model, opt = make(ctx, "fsdp", activation_checkpointing=True, compile=True)
        losses = train(model, opt, ctx, 0, 4)
        weights = full_weights(model)
        if ctx.is_main:
            torch.save({"losses": losses, "weights": weights}, out / "compiled.pt")
    finally:
        parallel.teardown(ctx)


if __name__ == "__main__":  # torchrun --nproc_per_node=2 tests/_parallel_worker.py OUT [compiled]
    (run_compiled if sys.argv[2:] == ["compiled"] else run_distributed)(Path(sys.argv[1]))
