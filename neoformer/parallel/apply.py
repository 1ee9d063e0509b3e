"""Apply parallelism to a single-device model from outside, in torchtitan's order:

    activation checkpointing (per block) -> torch.compile (per block) -> data parallelism

Data parallelism is ``ddp`` (every rank holds all weights, gradients are all-reduced) or
``fsdp`` (FSDP2 ``fully_shard``: each block is one communication unit, then the root takes
the embeddings, memory layers and head; every rank holds 1/N of weights, gradients and
optimizer state). Both wrap *in place*: the model keeps its class behaviour, its attributes
(``model.config``, ``model.rmc``...) and its state-dict keys, so the training loop, the
checkpoint code and the model API need no ``.module`` unwrapping.

Create the optimizer *after* :func:`apply`: FSDP2 replaces parameters with sharded DTensors.

CUDA notes (not testable on this CPU-only machine): DDP binds to ``ctx.device``;
FSDP2 takes a :class:`MixedPrecisionPolicy` (bf16/fp16 compute, fp32 gradient reduction) when
``mixed_precision`` names a dtype and the device is CUDA; on CPU the policy is left out and
the training loop's autocast decides the compute precision.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..kinds import get as model_kind
from ..model.transformer import BlockStack
from .setup import ParallelContext

log = logging.getLogger(__name__)

PARALLEL_MODES = ("none", "ddp", "fsdp")
MIXED_PRECISION = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                   "float16": torch.float16}


def default_mode(ctx: ParallelContext) -> str:
    """``ddp`` when there is more than one rank, else ``none``."""
    return "ddp" if ctx.world_size > 1 else "none"


def block_stacks(model: nn.Module) -> list[BlockStack]:
    return [m for m in model.modules() if isinstance(m, BlockStack)]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (as they sit in their ModuleLists, wrappers included)."""
    return [block for stack in block_stacks(model) for block in stack.blocks]


def apply(model: nn.Module, ctx: ParallelContext, mode: str | None = None, *,
          activation_checkpointing: bool | None = None, compile: bool = False,
          mixed_precision: str | torch.dtype | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Return ``model`` (the same object) with AC, compile and DDP/FSDP2 applied, on ``ctx.device``.

    ``mode``: none | ddp | fsdp; None = :func:`default_mode`. Without a process group
    (single process) ``ddp``/``fsdp`` fall back to ``none``.
    ``activation_checkpointing``: None = the config's ``gradient_checkpointing``.
    """
    mode = default_mode(ctx) if mode is None else mode
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel ({mode!r}) must be one of: {', '.join(PARALLEL_MODES)}")
    if mode == "none" and ctx.world_size > 1:
        raise ValueError(f"parallel 'none' with {ctx.world_size} processes would train {ctx.world_size} unsynchronised "
                         "copies; use --parallel ddp or fsdp (or run one process)")
    if mode != "none" and not ctx.distributed:
        log.info("parallel %s asked for without a process group (not under torchrun): running unwrapped", mode)
        mode = "none"
    cfg = getattr(model, "config", None)
    if activation_checkpointing is None:
        activation_checkpointing = bool(getattr(cfg, "gradient_checkpointing", False))

    model.to(ctx.device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if mode == "ddp":
        apply_ddp(model, ctx)
    elif mode == "fsdp":
        apply_fsdp(model, ctx, mixed_precision, reshard_after_forward)
    model.parallel_mode = mode  # read by the checkpoint code: fsdp -> sharded saves
    return model


# ---- activation checkpointing --------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every block in a non-reentrant checkpoint wrapper (activations recomputed in backward).

    The wrapper's state-dict hooks strip its prefix, so ``state_dict()`` keys do not change.
    The model's own per-block checkpointing (``gradient_checkpointing`` in the config) is
    switched off on the stacks so blocks are not checkpointed twice; ``model.config`` is kept.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    for stack in block_stacks(model):
        if stack.cfg.gradient_checkpointing:
            stack.cfg = stack.cfg.replace(gradient_checkpointing=False)
        for i, block in enumerate(stack.blocks):
            if not isinstance(block, CheckpointWrapper):
                stack.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


# ---- torch.compile ---------------------------------------------------------------------------
def apply_compile(model: nn.Module, **compile_kwargs) -> None:
    """Compile each block's forward. Blocks repeat, so one compiled graph serves them all.

    The block's ``forward`` is compiled, not the module: parameter names keep no ``_orig_mod``
    prefix and the DDP/FSDP hooks, registered on the module afterwards, stay outside the
    compiled region. Under activation checkpointing the wrapped block's forward is compiled
    (checkpoint outside, compiled code inside): compiling the checkpoint wrapper itself makes
    dynamo fall back to eager here, because the attention context caches masks in a dict.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    for block in blocks(model):
        target = block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
        if not getattr(target, "_neoformer_compiled", False):
            target.forward = torch.compile(target.forward, **compile_kwargs)
            target._neoformer_compiled = True


# ---- DDP -------------------------------------------------------------------------------------
def apply_ddp(model: nn.Module, ctx: ParallelContext) -> None:
    """Composable DDP (``replicate``): the same bucketed all-reduce as DistributedDataParallel,
    attached in place with forward hooks. Parameters are broadcast from rank 0 on the first forward."""
    from torch.distributed._composable.replicate import replicate

    cfg = getattr(model, "config", None)
    # MoE experts that get no tokens have no gradient on some ranks
    find_unused = bool(getattr(cfg, "moe_experts", 0))
    device_id = ctx.device if ctx.device.type == "cuda" else None
    kwargs = {"device_id": device_id} if device_id is not None else {}
    replicate(model, find_unused_parameters=find_unused, **kwargs)
    for name in _forward_methods(model):
        _register_ddp_forward_method(model, name)


def _register_ddp_forward_method(model: nn.Module, name: str) -> None:
    """DDP's twin of FSDP2's ``register_fsdp_forward_method``: ``model.<name>(...)`` runs the
    replicate forward hooks (gradient-sync setup) around the method."""
    from torch.distributed._composable.replicate import replicate

    state = replicate.state(model)
    method = getattr(model, name)

    @functools.wraps(method)
    def routed(*args, **kwargs):
        args, kwargs = state.forward_pre_hook(model, args, kwargs)
        return state.forward_post_hook(model, args, method(*args, **kwargs))

    setattr(model, name, routed)


# ---- FSDP2 -----------------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, ctx: ParallelContext, mixed_precision: str | torch.dtype | None = None,
               reshard_after_forward: bool = True) -> None:
    """FSDP2: ``fully_shard`` every block, then the root (embeddings, RMC/NSB, final norm, head).

    Every rank must start from the same weights; rank 0's are broadcast first to make sure.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # block outputs include the (unused in training) K/V views; FSDP2 warns about views once per block
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    _broadcast_from_rank0(model)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    kwargs = {"mesh": mesh}
    dtype = MIXED_PRECISION.get(mixed_precision, mixed_precision) if isinstance(mixed_precision, str) else mixed_precision
    if isinstance(mixed_precision, str) and mixed_precision not in MIXED_PRECISION and mixed_precision not in ("fp32", "float32"):
        raise ValueError(f"mixed_precision ({mixed_precision!r}) must be one of: bf16, fp16, fp32")
    if isinstance(dtype, torch.dtype) and dtype != torch.float32 and ctx.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    _use_all_params(model)
    all_blocks = blocks(model)
    for i, block in enumerate(all_blocks):
        # the last block is gathered again right away by backward: keep it unsharded
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(all_blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    for name in _forward_methods(model):
        register_fsdp_forward_method(model, name)


def _broadcast_from_rank0(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def _use_all_params(model: nn.Module) -> None:
    """Make MoE experts that receive no token still take part in the graph (with a zero
    gradient): FSDP2 reduce-scatters the gradients of a block in one collective, which needs the
    same set of gradients on every rank. Unlike a single process, such an expert then gets a
    zero gradient rather than none (AdamW still decays it)."""
    from ..model.ffn import MixtureOfExperts

    def touch(module, inputs, output):
        out, aux = output
        zero = sum(p.reshape(-1)[0] for p in module.parameters()) * 0.0
        return out, (aux + zero.to(aux.dtype)) if aux is not None else aux

    for module in model.modules():
        if isinstance(module, MixtureOfExperts):
            module.register_forward_hook(touch)


# ---- helpers -----------------------------------------------------------------------------------
def _forward_methods(model: nn.Module) -> tuple[str, ...]:
    """Methods that run a training forward without going through ``__call__`` (so without the
    DDP/FSDP forward hooks), routed through the hooks explicitly: the model kind's
    ``forward_methods`` (DecoderLM.loss; EncoderMLM.loss and EncoderDecoderLM.loss call ``self(...)``)."""
    config = getattr(model, "config", None)
    return model_kind(config).forward_methods if config is not None else ()


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_grad_sync(model: nn.Module, sync: bool) -> None:
    """Turn gradient communication off for all but the last micro-batch of an accumulation step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """``with no_sync(model): loss.backward()`` accumulates gradients locally (any mode)."""
    set_grad_sync(model, False)
    try:
        yield
    finally:
        set_grad_sync(model, True)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also returns a plain tensor for sharded (DTensor) grads."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
