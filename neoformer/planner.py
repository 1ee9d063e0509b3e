"""Exact parameter count and memory plan from a ModelConfig alone (`neoformer info`).

The module tree is read off the model itself, built on the meta device (no memory is allocated,
so a 93B-parameter preset plans in about a second): ``param_specs(cfg)`` lists every parameter
tensor of ``build_model(cfg).named_parameters()`` (a tied LM head appears once, as the token
embedding) with its component, whether it is an nn.Linear weight and its FSDP unit; the KV-cache
layers come from the model kind's cache layout (neoformer/kinds.py). Everything else is
arithmetic on that list, so an attention or FFN change needs no second edit here.
Assumptions: docs/planner.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig
from .kinds import get as model_kind
from .presets import PRESET_CLAIM_HINTS, PRESET_CLAIMS, PRESETS, get_preset

GiB, MiB = 2 ** 30, 2 ** 20
NF4_BLOCK = 64  # weights per fp32 absmax (bitsandbytes default, no double quantisation)
WEIGHT_FORMATS = ("fp32", "bf16", "int8", "nf4", "int4")
PRECISIONS = ("fp32", "bf16_mixed")
PARALLEL = ("ddp", "fsdp")

# component key -> label shown in the table (the order of the table)
COMPONENTS = {
    "token_embedding": "token embedding",
    "position_embedding": "position embedding (learned)",
    "embedding_norm": "embedding norm",
    "rmc": "RMC memory (memory, read_query, out)",
    "nsb": "NSB bridge (rules, to_rule, fuse)",
    "attention": "self-attention (q/k/v/o)",
    "cross_attention": "cross-attention",
    "ffn": "feed-forward",
    "moe_router": "MoE router",
    "moe_experts": "MoE experts",
    "norms": "block norms",
    "ngpt_alphas": "nGPT alphas",
    "relative_bias": "relative position bias",
    "final_norm": "final norm(s)",
    "mlm_transform": "MLM transform (dense + norm)",
    "lm_head": "LM head",
    "ngpt_logit_scale": "nGPT logit scale",
    "other": "other (not classified: see planner._component)",
}

ASSUMPTIONS = [
    "weights include buffers (the RMC episodic memory) at the weight dtype",
    "int8: 1 byte per nn.Linear weight + one fp32 scale per output row; other params bf16",
    "nf4: 4 bits per nn.Linear weight + one fp32 absmax per 64-weight block; other params bf16",
    "int4: 4 bits per nn.Linear weight + a bf16 scale and zero per 64-weight group; other params bf16",
    "a tied LM head is the token embedding and stays bf16 when quantising",
    "training: AdamW, 16 bytes/param (fp32: weights 4 + grads 4 + moments 8; "
    "bf16 mixed: weights 2 + grads 2 + fp32 master 4 + moments 8); activations not included",
    "KV cache: self-attention K and V of every decoder layer; windowed = sliding-window layers keep "
    "only their window; enc-dec cross-attention K/V (the same formula at the source length) are not included",
    "fsdp: FSDP2, one unit per block plus the root unit (embeddings, head, final norm, memory layer); "
    "state sharded along dim 0 with padding; root + the largest block gathered at the compute dtype; "
    "prefetch of the next block not included",
    "ddp: weights, grads and optimizer state replicated on every rank (gradient buckets not included)",
]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor of the model, as named by ``named_parameters()``."""

    name: str
    shape: tuple[int, ...]
    component: str  # a key of COMPONENTS
    linear: bool = False  # weight of an nn.Linear (what int8 / nf4 quantise)
    unit: str = "root"  # FSDP unit: "root" or the block prefix, e.g. "decoder.blocks.3"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---- the parameter list, read off a meta-device model ---------------------------------------
@dataclass(frozen=True)
class _Tree:
    """What the planner needs from the module tree (kept instead of the model itself)."""

    params: tuple[ParamSpec, ...]
    buffers: tuple[ParamSpec, ...]
    kv_layers: tuple[tuple[int, int | None], ...] | None  # per cached layer: (K/V width, window); None: no cache


def _tree(cfg: ModelConfig) -> _Tree:
    kind = model_kind(cfg.kind)
    return _tree_of(cfg.to_json(), kind)


@functools.lru_cache(maxsize=64)
def _tree_of(cfg_json: str, kind) -> _Tree:
    """Build the model of ``kind`` on the meta device (no memory; 93B parameters in ~1 s) and list
    its parameters, persistent buffers and cached attention layers."""
    import json

    import torch

    from .model.block import Block

    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    with torch.device("meta"):
        model = kind.build(cfg)
    modules = dict(model.named_modules())

    def spec(name: str, shape, is_param: bool) -> ParamSpec:
        prefixes = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        chain = [modules[prefix] for prefix in prefixes]  # the modules holding it, outermost first
        unit = next((u for u, m in zip(reversed(prefixes), reversed(chain)) if isinstance(m, Block)), "root")
        attribute = name.rpartition(".")[2]
        linear = is_param and bool(chain) and isinstance(chain[-1], torch.nn.Linear) and attribute == "weight"
        return ParamSpec(name, tuple(shape), _component(model, chain, attribute, unit != "root"), linear, unit)

    params = tuple(spec(name, p.shape, True) for name, p in model.named_parameters())  # tied weights: once
    persistent = set(model.state_dict())
    buffers = tuple(spec(name, b.shape, False) for name, b in model.named_buffers() if name in persistent)
    kv_layers = None
    if kind.cache.self_attention is not None:
        stack = getattr(model, kind.cache.self_attention)
        kv_layers = tuple((block.attn.n_kv_heads * block.attn.head_dim, block.attn.window) for block in stack.blocks)
    return _Tree(params, buffers, kv_layers)


def _component(model, chain: list, attribute: str, in_block: bool) -> str:
    """The COMPONENTS key of a parameter, from the modules that hold it (outermost first)."""
    from torch import nn

    from .model.attention import Attention
    from .model.ffn import FeedForward, MixtureOfExperts
    from .model.memory import NeuralSymbolicBridge, RecursiveMemoryCore
    from .model.norms import RMSNorm
    from .model.positions import RelativePositionBias
    from .model.transformer import Embeddings, MLMTransform

    for i, m in enumerate(chain):
        if isinstance(m, RecursiveMemoryCore):
            return "rmc"
        if isinstance(m, MixtureOfExperts):
            return "moe_experts" if any(isinstance(x, FeedForward) for x in chain[i + 1:]) else "moe_router"
        if isinstance(m, FeedForward):
            return "ffn"
        if isinstance(m, Attention):
            return "cross_attention" if m.cross else "attention"
        if isinstance(m, NeuralSymbolicBridge):
            return "nsb"
        if isinstance(m, RelativePositionBias):
            return "relative_bias"
        if isinstance(m, Embeddings):
            return {id(m.tokens): "token_embedding", id(m.norm): "embedding_norm"}.get(id(chain[i + 1]),
                                                                                     "position_embedding")
        if isinstance(m, MLMTransform):
            return "mlm_transform"
    owner = chain[-1] if chain else model
    if isinstance(owner, (RMSNorm, nn.LayerNorm)):
        return "norms" if in_block else "final_norm"
    if in_block:
        return "ngpt_alphas" if attribute.endswith("_alpha") else "other"  # a block's own parameters
    if owner is getattr(model, "lm_head", None):
        return "lm_head"
    return "ngpt_logit_scale" if owner is model and attribute == "logit_scale" else "other"


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter of ``build_model(cfg)``: name, shape, component, Linear or not, FSDP unit."""
    return list(_tree(cfg).params)


def buffer_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Persistent buffers (in the state dict, not trained): the RMC episodic memory."""
    return list(_tree(cfg).buffers)


# ---- counts ----------------------------------------------------------------------------------
@dataclass
class ParamCount:
    total: int
    by_component: dict[str, int]  # COMPONENTS key -> count (only those present)
    blocks_per_component: dict[str, int]  # how many blocks hold each per-block component
    per_block: dict[str, int | None]  # its count in each of those blocks (None when blocks differ)
    active_per_token: int  # total minus the experts a token is not routed to
    linear_weights: int  # elements in nn.Linear weights (quantisable)
    buffers: int
    largest_block: int  # parameters of the largest transformer block
    root: int  # parameters outside the blocks (embeddings, head, final norm, memory layer)


def count_parameters(cfg: ModelConfig) -> ParamCount:
    specs = param_specs(cfg)
    by_component = {key: 0 for key in COMPONENTS}
    units: dict[str, int] = {}
    holders: dict[str, dict[str, int]] = {}  # component -> block -> count
    for p in specs:
        by_component[p.component] += p.numel
        units[p.unit] = units.get(p.unit, 0) + p.numel
        if p.unit != "root":
            per_unit = holders.setdefault(p.component, {})
            per_unit[p.unit] = per_unit.get(p.unit, 0) + p.numel
    total = sum(by_component.values())
    inactive = 0
    if cfg.moe_experts:  # every expert has the same size; a token uses top_k of them per layer
        inactive = by_component["moe_experts"] * (cfg.moe_experts - cfg.moe_top_k) // cfg.moe_experts
    return ParamCount(
        total=total,
        by_component={k: v for k, v in by_component.items() if v},
        blocks_per_component={k: len(v) for k, v in holders.items()},
        per_block={k: v.popitem()[1] if len(set(v.values())) == 1 else None for k, v in holders.items()},
        active_per_token=total - inactive,
        linear_weights=sum(p.numel for p in specs if p.linear),
        buffers=sum(b.numel for b in buffer_specs(cfg)),
        largest_block=max((n for u, n in units.items() if u != "root"), default=0),
        root=units.get("root", 0),
    )


def num_parameters(cfg: ModelConfig) -> int:
    """Exact ``sum(p.numel() for p in build_model(cfg).parameters())`` without building it."""
    return sum(p.numel for p in param_specs(cfg))


# ---- memory ----------------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig, fmt: str = "bf16", *, group_size: int = NF4_BLOCK, skip: tuple[str, ...] = (),
                 float_bytes: int = 2, embeddings: bool = False) -> int:
    """Bytes of the weights (parameters + buffers) stored as fp32 | bf16 | int8 | nf4 | int4.

    For the quantized formats (neoformer.quantize's layouts) ``group_size`` is the nf4/int4 group,
    ``skip`` leaves Linears whose name contains one of its words unquantized (as
    ``neoformer.quantize.skipped`` does) and ``float_bytes`` is the size of everything left in float;
    so a quantized checkpoint's tensor bytes are ``weight_bytes(cfg, scheme, group_size=..., skip=...,
    float_bytes=4)`` for one quantized from fp32 (tests/test_quantize.py checks it). ``embeddings``: the
    token embedding is quantized too (row-wise as a Linear weight; neoformer.quantize does so when no
    ``skip`` word names it), and a head tied to it with it."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r} must be one of: {', '.join(WEIGHT_FORMATS)}")
    specs = param_specs(cfg) + buffer_specs(cfg)
    if fmt in ("fp32", "bf16"):
        return sum(p.numel for p in specs) * (4 if fmt == "fp32" else 2)
    total = 0
    for p in specs:
        module = p.name.rpartition(".")[0]
        packed = p.linear or (embeddings and p.component == "token_embedding")
        if not packed or any(word and word in module for word in skip):
            total += float_bytes * p.numel
        elif fmt == "int8":
            total += p.numel + 4 * p.shape[0]  # int8 values + fp32 scale per output row
        else:  # 4-bit values + per group: an fp32 absmax (nf4) or a bf16 scale and zero (int4)
            total += (p.numel + 1) // 2 + 4 * math.ceil(p.numel / group_size)
    return total


def _state_bytes(n_params: int, n_buffers: int, precision: str) -> dict[str, int]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of: {', '.join(PRECISIONS)}")
    w = 4 if precision == "fp32" else 2
    state = {"weights": w * (n_params + n_buffers), "grads": w * n_params,
             "master": 4 * n_params if precision == "bf16_mixed" else 0, "moments": 8 * n_params}
    state["total"] = sum(state.values())
    return state


def training_bytes(cfg: ModelConfig, precision: str = "fp32") -> dict[str, int]:
    """AdamW state on one device: weights, grads, fp32 master copy (bf16_mixed only), 2 moments."""
    return _state_bytes(num_parameters(cfg), sum(b.numel for b in buffer_specs(cfg)), precision)


def kv_cache_bytes(cfg: ModelConfig, batch: int = 1, seq: int | None = None, dtype_bytes: int = 2,
                   windowed: bool = False) -> int | None:
    """K and V of every cached self-attention layer (the model kind's cache layout) for ``batch`` x
    ``seq`` tokens (default max_seq_len): 2 * kv_heads * head_dim * tokens * batch * bytes per layer.
    ``windowed``: a sliding-window layer keeps only min(window, seq) tokens. None for a kind
    without a cache (an encoder)."""
    layers = _tree(cfg).kv_layers
    if layers is None:
        return None
    seq = cfg.max_seq_len if seq is None else seq
    return sum(2 * width * (min(window, seq) if windowed and window else seq) for width, window in layers) \
        * batch * dtype_bytes


def per_rank_bytes(cfg: ModelConfig, world_size: int = 1, parallel: str = "ddp",
                   precision: str = "fp32") -> dict[str, int]:
    """Training memory on one rank (the largest shard, rank 0), activations excluded.

    ddp: everything replicated. fsdp: weights, grads, master and moments sharded 1/N along dim 0
    (padded, as FSDP2 does), plus the unsharded root unit and largest block at the compute dtype."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel ({parallel!r}) must be one of: {', '.join(PARALLEL)}")
    if world_size < 1:
        raise ValueError(f"world size ({world_size}) must be >= 1")
    n_buffers = sum(b.numel for b in buffer_specs(cfg))
    if parallel == "ddp":
        out = _state_bytes(num_parameters(cfg), n_buffers, precision)
        out.update(gathered_root=0, gathered_block=0)
        return out
    specs = param_specs(cfg)
    shard = sum(math.ceil(p.shape[0] / world_size) * math.prod(p.shape[1:]) for p in specs)
    out = _state_bytes(shard, 0, precision)
    compute = 4 if precision == "fp32" else 2
    out["weights"] += compute * n_buffers  # buffers are not sharded
    counts = count_parameters(cfg)
    out["gathered_root"] = compute * counts.root if world_size > 1 else 0
    out["gathered_block"] = compute * counts.largest_block if world_size > 1 else 0
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


# ---- the seed's stated figures ---------------------------------------------------------------
def claim(name: str, true_total: int) -> dict[str, Any] | None:
    """The seed's stated parameter count for a preset next to the truth, or None."""
    stated = PRESET_CLAIMS.get(name)
    if stated is None:
        return None
    ratio = true_total / stated
    note = ""
    if not 0.8 <= ratio <= 1.25:
        cfg = PRESETS[name]
        layers = f"{cfg.n_encoder_layers} + {cfg.n_layers}" if cfg.n_encoder_layers else str(cfg.n_layers)
        note = (f"{layers} layers x {cfg.d_model} wide is ~{_approx(true_total)} parameters, "
                f"not {human_count(stated)}")
        if name in PRESET_CLAIM_HINTS:
            note += f" ({PRESET_CLAIM_HINTS[name]})"
    return {"stated": int(stated), "true": true_total, "ratio": ratio, "note": note}


def _approx(n: float) -> str:
    """93098352640 -> '93B', 2352416768 -> '2.4B' (two significant figures)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}"
    return str(int(n))


# ---- the plan (JSON-ready) and its table -------------------------------------------------------
def plan(cfg: ModelConfig, batch: int = 1, seq: int | None = None, world_size: int = 1,
         parallel: str = "ddp", source: str | None = None) -> dict[str, Any]:
    """Everything `neoformer info` shows, as plain values (bytes and counts are ints)."""
    for name, value in (("batch", batch), ("world size", world_size)) + ((("seq", seq),) if seq is not None else ()):
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")
    counts = count_parameters(cfg)
    seq = cfg.max_seq_len if seq is None else seq
    kv = None
    if kv_cache_bytes(cfg, batch, seq) is not None:
        kv = {"batch": batch, "seq": seq,
              "full": {"fp32": kv_cache_bytes(cfg, batch, seq, 4), "bf16": kv_cache_bytes(cfg, batch, seq, 2)},
              "windowed": None}
        if cfg.sliding_window:
            kv["windowed"] = {"fp32": kv_cache_bytes(cfg, batch, seq, 4, windowed=True),
                              "bf16": kv_cache_bytes(cfg, batch, seq, 2, windowed=True)}
    return {
        "name": cfg.name, "source": source or cfg.name, "kind": cfg.kind,
        "config": {"n_layers": cfg.n_layers, "n_encoder_layers": cfg.n_encoder_layers, "d_model": cfg.d_model,
                   "n_heads": cfg.n_heads, "n_kv_heads": cfg.resolved_n_kv_heads, "head_dim": cfg.resolved_head_dim,
                   "ffn_hidden": cfg.resolved_ffn_hidden, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
                   "moe_experts": cfg.moe_experts, "moe_top_k": cfg.moe_top_k if cfg.moe_experts else 0,
                   "tie_embeddings": cfg.tie_embeddings, "sliding_window": cfg.sliding_window},
        "parameters": {"total": counts.total, "active_per_token": counts.active_per_token,
                       "by_component": counts.by_component, "blocks_per_component": counts.blocks_per_component,
                       "per_block": counts.per_block,
                       "linear_weights": counts.linear_weights, "buffers": counts.buffers,
                       "largest_block": counts.largest_block, "root": counts.root},
        "claim": claim(cfg.name, counts.total),
        "weights_bytes": {fmt: weight_bytes(cfg, fmt) for fmt in WEIGHT_FORMATS},
        "training_bytes": {p: training_bytes(cfg, p) for p in PRECISIONS},
        "kv_cache_bytes": kv,
        "per_rank_bytes": {"world_size": world_size, "parallel": parallel,
                           **{p: per_rank_bytes(cfg, world_size, parallel, p) for p in PRECISIONS}},
        "assumptions": ASSUMPTIONS,
    }


def human_count(n: float) -> str:
    """93098352640 -> '93.1B', 105408 -> '105.4K'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    if n == 0:
        return "-"
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / MiB:,.2f} MiB"


def _rows(rows: list[tuple[str, ...]], indent: str = "", left: tuple[int, ...] = (0,)) -> list[str]:
    """Align a table: columns in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def _header(p: dict[str, Any]) -> str:
    c = p["config"]
    layers = f"{c['n_encoder_layers']} encoder + {c['n_layers']} decoder layers" if c["n_encoder_layers"] \
        else f"{c['n_layers']} layers"
    moe = f", MoE {c['moe_top_k']} of {c['moe_experts']}" if c["moe_experts"] else ""
    return (f"{p['source']}: {p['kind']}, {layers}, d_model {c['d_model']}, {c['n_heads']} heads "
            f"({c['n_kv_heads']} K/V, head_dim {c['head_dim']}), ffn {c['ffn_hidden']}, vocab {c['vocab_size']}, "
            f"max_seq_len {c['max_seq_len']}{moe}")


def _parameter_lines(p: dict[str, Any]) -> list[str]:
    params, total = p["parameters"], p["parameters"]["total"]
    rows = [("Parameters", "", "count", "share")]
    for key, n in params["by_component"].items():
        blocks, each = params["blocks_per_component"].get(key), params["per_block"].get(key)
        detail = f"{blocks} x {human_count(each)}" if each else f"{blocks} blocks" if blocks else ""
        rows.append(("  " + COMPONENTS[key], detail, f"{n:,}", f"{100 * n / total:.1f}%"))
    if p["config"]["tie_embeddings"]:
        rows.append(("  LM head", "tied", "0", "0.0%"))
    rows.append(("  total", human_count(total), f"{total:,}", "100.0%"))
    if p["config"]["moe_experts"]:
        active = params["active_per_token"]
        rows.append(("  active per token", human_count(active), f"{active:,}", f"{100 * active / total:.1f}%"))
    lines = _rows(rows)
    if p["claim"]:
        cl = p["claim"]
        lines.append(f"seed states {human_count(cl['stated'])}, true {human_count(cl['true'])} "
                     f"({cl['ratio']:.2f}x)" + (f": {cl['note']}" if cl["note"] else ""))
    return lines


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable table of a ``plan()``."""
    lines = [_header(p), ""] + _parameter_lines(p)
    notes = {"int8": "Linear 1 B + fp32 scale/row, rest bf16", "nf4": "Linear 4 bit + fp32 absmax/64, rest bf16",
             "int4": "Linear 4 bit + bf16 scale and zero/64, rest bf16"}
    rows = [("Weights", "", "")] + [(f"  {fmt}", human_bytes(b), notes.get(fmt, ""))
                                    for fmt, b in p["weights_bytes"].items()]
    lines += [""] + _rows(rows, left=(0, 2))

    rows = [("Training state (AdamW, no activations)", "weights", "grads", "master", "moments", "total")]
    for prec, label in (("fp32", "  fp32"), ("bf16_mixed", "  bf16 mixed (fp32 master)")):
        t = p["training_bytes"][prec]
        rows.append((label, *(human_bytes(t[k]) for k in ("weights", "grads", "master", "moments", "total"))))
    lines += [""] + _rows(rows)

    kv = p["kv_cache_bytes"]
    lines.append("")
    if kv is None:
        lines.append("KV cache: none (encoder, no generation cache)")
    else:
        max_len = p["config"]["max_seq_len"]
        beyond = f", beyond max_seq_len {max_len:,}" if kv["seq"] > max_len else ""
        rows = [(f"KV cache (batch {kv['batch']}, {kv['seq']:,} tokens{beyond})", "fp32", "bf16")]
        rows.append(("  all layers at full length", human_bytes(kv["full"]["fp32"]), human_bytes(kv["full"]["bf16"])))
        if kv["windowed"]:
            rows.append(("  sliding-window layers keep their window", human_bytes(kv["windowed"]["fp32"]),
                         human_bytes(kv["windowed"]["bf16"])))
        lines += _rows(rows)

    pr = p["per_rank_bytes"]
    if pr["world_size"] > 1:
        rows = [(f"Per rank ({pr['parallel']}, world size {pr['world_size']}, no activations)",
                 "weights", "grads", "master", "moments", "gathered", "total")]
        for prec, label in (("fp32", "  fp32"), ("bf16_mixed", "  bf16 mixed")):
            t = pr[prec]
            rows.append((label, *(human_bytes(t[k]) for k in ("weights", "grads", "master", "moments")),
                         human_bytes(t["gathered_root"] + t["gathered_block"]), human_bytes(t["total"])))
        lines += [""] + _rows(rows)
    lines += ["", "Assumptions (docs/planner.md):"] + [f"  - {a}" for a in p["assumptions"]]
    return "\n".join(lines)


def list_presets() -> list[dict[str, Any]]:
    out = []
    for name, cfg in PRESETS.items():
        total = num_parameters(cfg)
        out.append({"name": name, "kind": cfg.kind, "n_layers": cfg.n_layers + cfg.n_encoder_layers,
                    "d_model": cfg.d_model, "parameters": total, "claim": claim(name, total)})
    return out


def format_presets(items: list[dict[str, Any]]) -> str:
    rows = [("preset", "kind", "layers", "d_model", "parameters", "exact", "seed states")]
    for it in items:
        cl = it["claim"]
        stated = f"{human_count(cl['stated'])} ({cl['ratio']:.2f}x)" if cl else ""
        rows.append((it["name"], it["kind"], str(it["n_layers"]), str(it["d_model"]), human_count(it["parameters"]),
                     f"{it['parameters']:,}", stated))
    return "\n".join(_rows(rows))


# ---- loading and the CLI ---------------------------------------------------------------------
def _config_file_of(directory: Path) -> Path:
    """config.json of a checkpoint directory, of a run's latest checkpoint, else the run's config.yaml."""
    from .checkpoint import CheckpointError, resolve_checkpoint

    if (directory / "config.json").is_file():
        return directory / "config.json"
    try:
        checkpoint = resolve_checkpoint(directory)
    except CheckpointError:
        checkpoint = None
    if checkpoint is not None and (checkpoint / "config.json").is_file():
        return checkpoint / "config.json"
    if (directory / "config.yaml").is_file():  # a run directory without checkpoints yet
        return directory / "config.yaml"
    raise FileNotFoundError(f"{directory} has no config.json or config.yaml "
                            "(expected a checkpoint or run directory)")


def load_config(target: str) -> ModelConfig:
    """A preset name, a checkpoint or run directory, or a config .json / .yaml file.
    The file holds a ModelConfig dict or {"model": {...}}."""
    path = Path(target)
    if path.is_dir():
        path = _config_file_of(path)
    elif not path.is_file():
        if target in PRESETS or not (target.endswith((".json", ".yaml", ".yml")) or "/" in target):
            return get_preset(target)
        raise FileNotFoundError(f"no such file or directory: {target}")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a UTF-8 text file; expected YAML") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of model config fields")
        return ModelConfig.from_dict(data.get("model", data))
    return ModelConfig.from_json(path)


__all__ = ["ParamSpec", "ParamCount", "param_specs", "buffer_specs", "count_parameters", "num_parameters",
           "weight_bytes", "training_bytes", "kv_cache_bytes", "per_rank_bytes", "claim", "plan",
           "format_plan", "list_presets", "load_config", "training_peak"]


def training_peak(model, objective, batch: int, seq: int, **options):
    """Predicted peak memory of a fit() step (weights, grads, optimizer, activations read off the model,
    the loss chunk; ``amp_dtype``, ``gradient_checkpointing``, ``optimizer``): neoformer.train.memory."""
    from .train.memory import predict_training_memory

    return predict_training_memory(model, objective, batch, seq, **options)
