"""Data parallelism applied from outside the model: process-group setup, DDP / FSDP2 (with
activation checkpointing and torch.compile per block), and sharded checkpoints that resume at
any world size. ``neoformer.model`` never imports this package.

Typical use (works unchanged in one process and under ``torchrun --nproc_per_node=N``)::

    ctx = parallel.setup()                       # rank, world_size, device; gloo/nccl
    model = parallel.apply(build_model(cfg), ctx, "fsdp")
    optimizer = torch.optim.AdamW(model.parameters())   # after apply
    x, y = parallel.shard_batch((x, y), ctx)     # this rank's rows of the global batch
    ...
    parallel.save_sharded(path, model, optimizer, ctx, extra={"step": step})
    parallel.teardown()
"""
from .apply import (PARALLEL_MODES, apply, apply_activation_checkpointing, apply_compile, clip_grad_norm_,
                    default_mode, is_fsdp, no_sync, set_grad_sync)
from ..checkpoint.sharded import (consolidate, is_sharded_checkpoint, load_full_state, load_sharded, load_train_checkpoint,
                         read_full_state, read_trainer_state, save_sharded, save_train_checkpoint)
from .setup import (ParallelContext, ShardedBatches, env_world_size, main_process_output, rank0_first, setup, shard_batch,
                    shard_range, teardown, torchrun_env_present)

__all__ = [
    "PARALLEL_MODES", "ParallelContext", "ShardedBatches", "apply", "apply_activation_checkpointing", "apply_compile",
    "clip_grad_norm_", "consolidate", "default_mode", "env_world_size", "is_fsdp", "is_sharded_checkpoint",
    "load_full_state", "load_sharded", "load_train_checkpoint", "main_process_output", "rank0_first", "no_sync", "read_full_state", "read_trainer_state", "save_sharded", "save_train_checkpoint", "set_grad_sync",
    "setup", "shard_batch", "shard_range", "teardown", "torchrun_env_present",
]
