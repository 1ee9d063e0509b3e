"""The three model kinds: decoder-only LM, encoder (MLM) and encoder-decoder (seq2seq).

They share embeddings, block stacks and the per-forward attention context; only the wiring
differs. Shapes: B batch, L new tokens, P cached tokens, D d_model, V vocab.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import IGNORE_INDEX, ModelConfig
from .attention import AttnContext, PackedInfo, keep_mask
from .block import Block
from .dropout import Dropout
from .ffn import ACTIVATION_FNS
from .head_loss import at_least_fp32, capped_loss, chunked_head_loss, soft_cap, token_cross_entropy_sum
from .memory import NeuralSymbolicBridge, RecursiveMemoryCore
from .norms import make_norm, unit_norm
from .positions import RotaryEmbedding, make_bias_module, sinusoidal_encoding
from .state import Past, TupleCache
from .weights import init_weights, normalize_weights_


class CrossKV:
    """Cross-attention (K, V) of every decoder layer, each (B, H_kv, S, Dh), computed once from
    the encoder output. Passed as ``memory`` to ``EncoderDecoderLM.decode``; rows can be selected
    like a tensor's (beam search, rows leaving a batch)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers

    def __len__(self) -> int:  # batch size, as for the (B, S, D) memory tensor it replaces
        return self.layers[0][0].shape[0]

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer]

    def index_select(self, dim: int, index: torch.Tensor) -> "CrossKV":
        return CrossKV([(k.index_select(dim, index), v.index_select(dim, index)) for k, v in self.layers])


@dataclass
class StackOutput:
    hidden: torch.Tensor  # (B, L, D) after the final norm
    past: Past | None
    delta: torch.Tensor | None  # RMC write (B, mem, D)
    aux_loss: torch.Tensor | None  # MoE load balancing


class Embeddings(nn.Module):
    """Token embedding plus an absolute position encoding when the config asks for one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        if cfg.position == "learned":
            self.positions = nn.Embedding(cfg.max_seq_len + cfg.learned_pos_offset, cfg.d_model)
        self.scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
        self.norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = Dropout(cfg.embed_dropout)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """ids (B, L), positions (B|1, L), keep (B, L) or None -> (B, L, D)."""
        h = self.tokens(ids) * self.scale
        if self.cfg.position == "learned":
            offset = self.cfg.learned_pos_offset
            pos = positions + offset
            if offset and keep is not None:  # NeoBERT: padding tokens take the reserved position 0
                pos = torch.where(keep, pos, torch.zeros_like(pos))
            h = h + self.positions(pos)
        elif self.cfg.position == "sinusoidal":
            h = h + sinusoidal_encoding(positions, self.cfg.d_model, h.dtype)
        if self.norm is not None:
            h = self.norm(h)
        if self.cfg.ngpt:
            h = unit_norm(h)
        return self.drop(h)


class BlockStack(nn.Module):
    """n blocks plus the position machinery they share (RoPE tables, ALiBi/T5 bias)."""

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross_attention: bool = False,
                 first_layer: int = 0):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.blocks = nn.ModuleList(Block(cfg, first_layer + i, cross_attention) for i in range(n_layers))
        self.bias = make_bias_module(cfg, bidirectional=not causal)
        self.rope = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_base, cfg.rope_scaling, cfg.rope_scaling_factor) \
            if cfg.position == "rope" else None
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()

    def context(self, q_pos, k_pos, key_keep, packed: PackedInfo | None, dtype) -> AttnContext:
        ctx = AttnContext(q_pos=q_pos, k_pos=k_pos, causal=self.causal, key_keep=key_keep, packed=packed,
                          segments=packed.segments if packed is not None else None)
        if self.rope is not None:
            ctx.rope = self.rope(q_pos, dtype)
        if self.bias is not None:
            ctx.bias = self.bias(q_pos, k_pos, dtype)
            ctx.alibi_slopes = getattr(self.bias, "slopes", None)
        return ctx

    def forward(self, h, ctx: AttnContext, cache=None, memory=None, memory_ctx=None):
        """h (B, L, D) -> (normed h, summed aux loss or None). ``cache`` (model/state.py) keeps K, V."""
        aux_total = None
        for i, block in enumerate(self.blocks):
            layer_memory = memory[i] if isinstance(memory, CrossKV) else memory
            if self.cfg.gradient_checkpointing and self.training:
                h, aux = checkpoint(block, h, ctx, cache, layer_memory, memory_ctx, use_reentrant=False)
            else:
                h, aux = block(h, ctx, cache, layer_memory, memory_ctx)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(h), aux_total


def _positions(L: int, past_len: int, device, attention_mask=None, positions=None):
    """Query positions (B|1, L), key positions (B|1, P+L) and key padding (B, P+L) or None."""
    if attention_mask is not None:  # HF convention: covers cached and new tokens; left padding allowed
        keep = keep_mask(attention_mask)
        all_pos = (keep.long().cumsum(-1) - 1).clamp(min=0)
        q_pos = all_pos[:, -L:] if positions is None else positions
        return q_pos, all_pos, keep
    if positions is None:
        k_pos = torch.arange(past_len + L, device=device)[None]
        return k_pos[:, past_len:], k_pos, None
    # explicit positions (e.g. after cache trimming): cached keys sit right before the first query
    start = positions[:, :1] - past_len
    return positions, start + torch.arange(past_len + L, device=device)[None], None


class NeoFormerModel(nn.Module):
    """Shared pieces: config, weight init, parameter count, and the hooks that generation and
    fit() call instead of knowing what is inside a model."""

    config: ModelConfig
    supports_speculative_decoding = False  # may serve as draft or target of speculative decoding

    def init_weights(self) -> None:
        init_weights(self, self.config)
        self.normalize_weights_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (less memory). Configs are frozen and may be
        shared (``PRESETS``, other models), so this model gets changed copies instead of an edit."""
        self.config = self.config.replace(gradient_checkpointing=enabled)
        for module in self.modules():
            if isinstance(module, BlockStack):
                module.cfg = module.cfg.replace(gradient_checkpointing=enabled)

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """nGPT: keep every matrix unit-norm along the embedding dimension (no-op otherwise)."""
        if self.config.ngpt:
            normalize_weights_(self)

    @torch.no_grad()
    def after_optimizer_step(self, delta: torch.Tensor | None = None, memory_lr: float = 0.01) -> None:
        """fit() calls this once after every optimizer step. ``delta``: the mean over the step's
        rows (and ranks) of the objective's ``stats["delta"]`` (an RMC memory write), or None."""
        self.normalize_weights_()

    # ---- the cache/state protocol (model/state.py) ---------------------------------------------
    @property
    def cache_layers(self) -> range:
        """Layer indices (``Attention.layer_idx``) that keep a self-attention K/V cache."""
        return range(0)

    def advance_state(self, state: Any, ids: torch.Tensor, positions: torch.Tensor) -> Any:
        """Model-owned cache state after also reading ids (B, L) at positions, without a forward
        (speculative decoding keeps the accepted tokens). Models without such state return it as is."""
        return state

    def _open_cache(self, past, kv_cache, use_cache: bool, k_pos, key_keep):
        """The cache this forward reads and extends: the engine's, the seed tuple ``past`` through
        its adapter (keys described by this forward's own arguments), or None."""
        if kv_cache is not None:
            if past:
                raise ValueError("pass either past (the tuple cache) or kv_cache, not both")
            return kv_cache
        if past or use_cache:
            return TupleCache(past, self.cache_layers.start, k_pos, key_keep)
        return None

    def _check_length(self, total: int) -> None:
        if self.config.position == "learned" and total > self.config.max_seq_len:
            raise ValueError(f"sequence length {total} exceeds max_seq_len ({self.config.max_seq_len}) of this "
                             "learned-position model; shorten the input or trim the cache")

    def _tie_or_make_head(self, embeddings: Embeddings) -> nn.Linear:
        head = nn.Linear(self.config.d_model, self.config.vocab_size, bias=self.config.head_bias)
        if self.config.tie_embeddings:
            head.weight = embeddings.tokens.weight
        if self.config.ngpt:  # nGPT s_z: learned per-token logit scale
            self.logit_scale = nn.Parameter(torch.ones(self.config.vocab_size))
        return head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._project(self._head_input(hidden))

    def _head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        transform = self._modules.get("mlm_transform")  # BERT's dense + activation + norm (encoders)
        return hidden if transform is None else transform(hidden)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        logits = logits * self.logit_scale if self.config.ngpt else logits
        return soft_cap(logits, self.config.logit_softcap)

    # rows per chunk of the training loss (None: 32 MiB of fp32 logits, model/head_loss.py); 0: plain path
    loss_chunk_rows: int | None = None

    def head_loss_sum(self, hidden: torch.Tensor, row_inputs: tuple[torch.Tensor, ...],
                      loss_fn=token_cross_entropy_sum) -> torch.Tensor:
        """Sum over positions of ``loss_fn(logits, *row_inputs)`` without materialising the (B, L, V)
        logits: the head (tied or not, with nGPT's logit scale) and the loss run over row chunks.
        hidden (B, L, D); row_inputs: tensors (B, L, ...) such as targets or teacher logits. A head
        that is not a plain bias-free nn.Linear (quantised, adapted) takes the plain path."""
        head = self.lm_head
        hidden = self._head_input(hidden)
        if self.config.logit_softcap:
            loss_fn = functools.partial(capped_loss, loss_fn, self.config.logit_softcap)
        if self.loss_chunk_rows == 0 or type(head) is not nn.Linear or head.bias is not None:
            logits = at_least_fp32(self.lm_head(hidden))
            logits = logits * self.logit_scale if self.config.ngpt else logits
            return loss_fn(logits.reshape(-1, logits.shape[-1]),
                           *(x.reshape(logits.shape[0] * logits.shape[1], *x.shape[2:]) for x in row_inputs))
        scale = self.logit_scale if self.config.ngpt else None
        return chunked_head_loss(hidden, head.weight, row_inputs, loss_fn, scale, self.loss_chunk_rows)

    def lm_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy over targets != -100: ``cross_entropy(self.logits(hidden), targets)``
        computed in chunks (model/head_loss.py)."""
        return self.head_loss_sum(hidden, (targets,)) / (targets != IGNORE_INDEX).sum()


def _new_past(cache, use_cache: bool) -> Past | None:
    return cache.as_past() if use_cache and isinstance(cache, TupleCache) else None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain loss of full logits (B, L, V): the reference ``NeoFormerModel.lm_loss`` equals."""
    return F.cross_entropy(at_least_fp32(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def _with_aux(cfg: ModelConfig, ce: torch.Tensor, aux: torch.Tensor | None):
    """Total loss = cross-entropy + moe_aux_weight * load-balancing loss; stats for logging."""
    loss = ce if aux is None else ce + cfg.moe_aux_weight * aux
    return loss, {"ce": ce.detach(), "aux": None if aux is None else aux.detach(), "delta": None}


class DecoderLM(NeoFormerModel):
    """Decoder-only causal LM (GPT, Llama, Lumi, Nexus, NeoFormer-X with RMC + NSB)."""

    supports_speculative_decoding = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.rmc = RecursiveMemoryCore(cfg) if cfg.rmc else None
        self.nsb = NeuralSymbolicBridge(cfg) if cfg.nsb else None
        self.decoder = BlockStack(cfg, cfg.n_layers, causal=True)
        self.lm_head = self._tie_or_make_head(self.embed)
        self.init_weights()

    @property
    def cache_layers(self) -> range:
        return range(self.config.n_layers)

    def advance_state(self, state, ids, positions):
        """The RMC sums its input, the embeddings: add those of ids (B, L) (all real tokens)."""
        if self.rmc is None:
            return state
        return self.rmc.advance(state, self.embed(ids, positions, None))

    @torch.no_grad()
    def after_optimizer_step(self, delta=None, memory_lr=0.01) -> None:
        if delta is not None and self.rmc is not None:
            self.rmc.apply_update(delta, lr=memory_lr)
        super().after_optimizer_step(delta, memory_lr)

    def forward_hidden(self, input_ids, past=None, update=False, *, attention_mask=None, positions=None,
                       cu_seqlens=None, use_cache=None, kv_cache=None) -> StackOutput:
        B, L = input_ids.shape
        use_cache = (not self.training) if use_cache is None else use_cache
        packed = None
        if cu_seqlens is not None:
            if B != 1 or past or kv_cache is not None:
                raise ValueError("packed input (cu_seqlens) takes one row of concatenated documents and no cache")
            packed = PackedInfo.from_cu_seqlens(cu_seqlens, L)
            q_pos = k_pos = packed.positions
            key_keep = None
        else:
            past_len = past[0][0].shape[2] if past else 0
            q_pos, k_pos, key_keep = _positions(L, past_len, input_ids.device, attention_mask, positions)
        new_keep = key_keep[:, -L:] if key_keep is not None else None
        cache = self._open_cache(past, kv_cache, use_cache, k_pos, key_keep)
        if cache is not None:
            k_pos, key_keep = cache.prepare(q_pos, new_keep)
        self._check_length(k_pos.shape[-1] if packed is None else packed.max_seqlen)

        h = self.embed(input_ids, q_pos, new_keep)  # (B, L, D)
        delta = None
        if self.rmc is not None:  # the running summary is model-owned cache state
            state = cache.model_state if cache is not None else None
            h, state, delta = self.rmc(h, state, new_keep, update)
            if cache is not None:
                cache.model_state = state
        if self.nsb is not None:
            h = self.nsb(h)
        ctx = self.decoder.context(q_pos, k_pos, key_keep, packed, h.dtype)
        h, aux = self.decoder(h, ctx, cache)
        return StackOutput(h, _new_past(cache, use_cache), delta, aux)

    def forward(self, input_ids, past=None, update=False, **kwargs):
        """Seed API: (B, L) token ids -> (logits (B, L, V), new_past, delta)."""
        out = self.forward_hidden(input_ids, past, update, **kwargs)
        return self.logits(out.hidden), out.past, out.delta

    def generate(self, input_ids, max_new_tokens=None, **options):
        """Seed API ``generate(x, max_new=64, temp=0.8, top_k=50)``; every option: neoformer.generate."""
        from ..generate import generate

        return generate(self, input_ids, max_new_tokens, **options)

    def loss(self, input_ids, targets, update=False, **kwargs):
        """Next-token cross-entropy (+ MoE balancing). Returns (loss, stats with ce, aux, delta)."""
        out = self.forward_hidden(input_ids, None, update, use_cache=False, **kwargs)
        loss, stats = _with_aux(self.config, self.lm_loss(out.hidden, targets), out.aux_loss)
        stats["delta"] = out.delta
        return loss, stats


class MLMTransform(nn.Module):
    """BERT's masked-LM transform: norm(act(dense(h))) before the output layer (Devlin et al. 2019)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = ACTIVATION_FNS[cfg.activation]
        self.norm = make_norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class EncoderMLM(NeoFormerModel):
    """Bidirectional encoder with a masked-LM head (BERT, NeoBERT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.encoder = BlockStack(cfg, cfg.n_layers, causal=False)
        if cfg.mlm_transform:
            self.mlm_transform = MLMTransform(cfg)
        self.lm_head = self._tie_or_make_head(self.embed)
        self.init_weights()

    def encode_hidden(self, input_ids, attention_mask=None, cu_seqlens=None) -> StackOutput:
        """(B, L) -> hidden (B, L, D) and the MoE balancing loss. attention_mask (B, L): any form
        ``keep_mask`` reads (1/True = token, 0/False = padding, or additive 0 / -inf)."""
        B, L = input_ids.shape
        packed = None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError("packed input (cu_seqlens) takes one row of concatenated documents")
            packed = PackedInfo.from_cu_seqlens(cu_seqlens, L)
            q_pos, keep = packed.positions, None
        else:
            q_pos, _, keep = _positions(L, 0, input_ids.device, attention_mask)
        self._check_length(L if packed is None else packed.max_seqlen)
        h = self.embed(input_ids, q_pos, keep)
        ctx = self.encoder.context(q_pos, q_pos, keep, packed, h.dtype)
        h, aux = self.encoder(h, ctx)
        return StackOutput(h, None, None, aux)

    def encode(self, input_ids, attention_mask=None, cu_seqlens=None) -> torch.Tensor:
        """(B, L) -> hidden (B, L, D)."""
        return self.encode_hidden(input_ids, attention_mask, cu_seqlens).hidden

    def forward(self, input_ids, attention_mask=None, cu_seqlens=None) -> torch.Tensor:
        return self.logits(self.encode(input_ids, attention_mask, cu_seqlens))

    def loss(self, input_ids, labels, attention_mask=None, cu_seqlens=None):
        """Masked-LM cross-entropy over positions whose label is not -100."""
        out = self.encode_hidden(input_ids, attention_mask, cu_seqlens)
        return _with_aux(self.config, self.lm_loss(out.hidden, labels), out.aux_loss)


class EncoderDecoderLM(NeoFormerModel):
    """Encoder-decoder Transformer (Vaswani et al. 2017) with shared, tied embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.encoder = BlockStack(cfg, cfg.n_encoder_layers, causal=False)
        self.decoder = BlockStack(cfg, cfg.n_layers, causal=True, cross_attention=True,
                                  first_layer=cfg.n_encoder_layers)
        self.lm_head = self._tie_or_make_head(self.embed)
        self.init_weights()

    @property
    def cache_layers(self) -> range:
        return range(self.config.n_encoder_layers, self.config.n_encoder_layers + self.config.n_layers)

    def encode_hidden(self, src_ids, src_mask=None) -> StackOutput:
        """(B, S) -> memory (B, S, D) and the encoder's MoE balancing loss."""
        B, S = src_ids.shape
        self._check_length(S)
        q_pos, _, keep = _positions(S, 0, src_ids.device, src_mask)
        h = self.embed(src_ids, q_pos, keep)
        h, aux = self.encoder(h, self.encoder.context(q_pos, q_pos, keep, None, h.dtype))
        return StackOutput(h, None, None, aux)

    def encode(self, src_ids, src_mask=None) -> torch.Tensor:
        """(B, S) -> memory (B, S, D)."""
        return self.encode_hidden(src_ids, src_mask).hidden

    def cross_kv(self, memory: torch.Tensor) -> CrossKV:
        """Encoder output (B, S, D) -> per-layer cross-attention K/V, reusable by every decode step."""
        return CrossKV([block.cross_attn.memory_kv(memory) for block in self.decoder.blocks])

    def decode_hidden(self, tgt_ids, memory, src_mask=None, past=None, *, positions=None, use_cache=None,
                      kv_cache=None) -> StackOutput:
        """(B, L) target ids + memory (B, S, D) or its ``cross_kv`` -> hidden, new past, MoE loss."""
        B, L = tgt_ids.shape
        use_cache = (not self.training) if use_cache is None else use_cache
        past_len = past[0][0].shape[2] if past else 0
        q_pos, k_pos, tgt_keep = _positions(L, past_len, tgt_ids.device, None, positions)
        cache = self._open_cache(past, kv_cache, use_cache, k_pos, tgt_keep)
        if cache is not None:
            k_pos, tgt_keep = cache.prepare(q_pos, None)
        self._check_length(k_pos.shape[-1])
        h = self.embed(tgt_ids, q_pos, None)
        ctx = self.decoder.context(q_pos, k_pos, tgt_keep, None, h.dtype)
        src_keep = keep_mask(src_mask) if src_mask is not None else None
        zeros = torch.zeros(1, 1, dtype=torch.long, device=h.device)
        memory_ctx = AttnContext(q_pos=zeros, k_pos=zeros, causal=False, key_keep=src_keep)
        h, aux = self.decoder(h, ctx, cache, memory=memory, memory_ctx=memory_ctx)
        return StackOutput(h, _new_past(cache, use_cache), None, aux)

    def decode(self, tgt_ids, memory, src_mask=None, past=None, **kwargs):
        """(B, L) target ids + memory (B, S, D) or its ``cross_kv`` -> (logits (B, L, V), new_past)."""
        out = self.decode_hidden(tgt_ids, memory, src_mask, past, **kwargs)
        return self.logits(out.hidden), out.past

    def forward(self, src_ids, tgt_ids, src_mask=None, past=None, **kwargs):
        return self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask, past, **kwargs)

    def generate(self, src_ids, max_new_tokens=None, **options):
        """Decode targets for src_ids (decoder starts from decoder_start_token_id); see neoformer.generate."""
        from ..generate import generate

        return generate(self, src_ids, max_new_tokens, **options)

    def loss(self, src_ids, tgt_in, tgt_out, src_mask=None):
        encoded = self.encode_hidden(src_ids, src_mask)
        decoded = self.decode_hidden(tgt_in, encoded.hidden, src_mask, use_cache=False)
        aux = [a for a in (encoded.aux_loss, decoded.aux_loss) if a is not None]
        return _with_aux(self.config, self.lm_loss(decoded.hidden, tgt_out), sum(aux) if aux else None)
