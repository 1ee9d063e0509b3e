"""Width: the FFN hidden size and the model width (d_model).

* FFN neurons (Minitron, Muralidharan et al. 2024): importance of neuron i = mean |input_i of the
  down projection| over calibration tokens; the student keeps the top ``ffn_dim`` in every layer.
* ``channels`` (Minitron): importance of residual channel j = mean |output_j| of every norm layer;
  the student keeps the top ``d_model`` channels everywhere (embedding, norms, every linear). An
  RMSNorm over fewer channels divides by a different RMS, so each norm's gain is rescaled by the
  expected ratio measured on the calibration data (sqrt(D/k) * ||x_kept|| / ||x||).
* ``pca`` (Ashkboos et al. 2024, "SliceGPT"): fold every RMSNorm gain into the linears that read
  it, so each norm is x -> x / rms(x), which commutes with any orthogonal Q (rms(xQ) = rms(x)).
  Rotate the whole residual stream by the principal directions of the calibration activations and
  keep the first ``d_model``. SliceGPT uses one Q per layer plus extra matrices on the residual
  path; one Q for the whole stream keeps the student an ordinary model (no new modules). The norm
  over k channels divides by sqrt(sum/k) instead of sqrt(sum/D): the constant sqrt(D/k) becomes
  the norm's gain (and eps scales by D/k). At full width the rotation is exact (logits equal to
  float precision), and so is any width that spans the activations.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .calibrate import Batch, blocks, hooks, norm_modules, require_plain_decoder, run
from .plan import CompressError
from .surgery import READS_RESIDUAL, WRITES_RESIDUAL, block_items, config_with, rebuild, state_of

NORM_KEYS = ("attn_norm.weight", "ffn_norm.weight")


def _require_rmsnorm(cfg, what: str) -> None:
    require_plain_decoder(cfg, what)
    if cfg.norm != "rmsnorm":
        raise CompressError(f"{what} needs an RMSNorm teacher (this one uses {cfg.norm})")
    if cfg.position == "sinusoidal" or cfg.embed_scale:
        raise CompressError(f"{what} cannot rotate fixed sinusoidal positions or a scaled embedding")


# ---- FFN neurons ------------------------------------------------------------------------------
def neuron_importance(model: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    """Mean |activation| of each FFN hidden neuron, per layer."""
    sums = [None] * len(blocks(model))
    counts = [0] * len(sums)

    def record(name, args, _):
        i, x = int(name), args[0].detach().float().abs()
        flat = x.reshape(-1, x.shape[-1])
        sums[i] = flat.sum(0) if sums[i] is None else sums[i] + flat.sum(0)
        counts[i] += flat.shape[0]

    with hooks({str(i): b.ffn.down for i, b in enumerate(blocks(model))}, record, pre=True):
        run(model, batches)
    return [s / c for s, c in zip(sums, counts)]


def prune_ffn(model: nn.Module, ffn_dim: int, batches: list[Batch], uniform: bool = False) -> nn.Module:
    cfg = model.config
    require_plain_decoder(cfg, "FFN pruning")
    if ffn_dim > cfg.resolved_ffn_hidden:
        raise CompressError(f"--ffn-dim {ffn_dim} is larger than the teacher's FFN ({cfg.resolved_ffn_hidden})")
    if uniform:
        kept = [torch.arange(ffn_dim)] * cfg.n_layers
    else:
        kept = [scores.topk(ffn_dim).indices.sort().values for scores in neuron_importance(model, batches)]
    state = state_of(model)
    for layer, name, key, tensor in list(block_items(state)):
        if name.startswith(("ffn.gate.", "ffn.up.")):
            state[key] = tensor[kept[layer]]
        elif name == "ffn.down.weight":
            state[key] = tensor[:, kept[layer]]
    return rebuild(config_with(cfg, ffn_hidden=ffn_dim), state)


# ---- d_model: shared helpers --------------------------------------------------------------------
def _map_residual(state: dict, cfg, into: torch.Tensor, out_of: torch.Tensor) -> dict:
    """Every tensor along d_model: reads x -> x @ into (D, k); writes y -> out_of (k, D) @ y.
    ``into`` / ``out_of`` are a rotation (PCA) or a column selection (channels)."""
    new = dict(state)
    reads = ["embed.tokens.weight", "embed.positions.weight", "lm_head.weight"]
    for key in reads:
        if key in new:
            new[key] = new[key] @ into  # (V, D) -> (V, k)
    for layer, name, key, tensor in block_items(state):
        module, _, param = name.rpartition(".")
        if module in READS_RESIDUAL and param == "weight":
            new[key] = tensor @ into  # (out, D) -> (out, k)
        elif module in WRITES_RESIDUAL:
            new[key] = out_of @ tensor  # weight (D, in) -> (k, in); bias (D,) -> (k,)
    return new


def _with_norm_gains(state: dict, gains: dict[str, torch.Tensor]) -> dict:
    new = dict(state)
    for name, gain in gains.items():
        new["decoder.norm.weight" if name == "final" else f"decoder.blocks.{name}.weight"] = gain
    return new


def _student_config(cfg, d_model: int, untie: bool):
    # rms over k channels = sqrt(sum/k + eps'): with eps' = eps * D / k and the gain sqrt(D/k) this is
    # exactly the teacher's sqrt(sum/D + eps) whenever the removed channels were empty
    changes = {"d_model": d_model, "norm_eps": cfg.norm_eps * cfg.d_model / d_model}
    if untie and cfg.tie_embeddings:
        changes["tie_embeddings"] = False  # the final norm's gain is folded into the head only
    return config_with(cfg, **changes)


# ---- channels (Minitron) ----------------------------------------------------------------------
def channel_statistics(model: nn.Module, batches: list[Batch]):
    """(mean |norm output| per channel summed over norms, per-norm mean x^2 per channel of the input)."""
    importance = torch.zeros(model.config.d_model)
    energy: dict[str, torch.Tensor] = {}

    def record(name, args, out):
        nonlocal importance
        x, y = args[0].detach().float(), out.detach().float()
        importance += y.abs().reshape(-1, y.shape[-1]).mean(0)
        energy[name] = energy.get(name, 0) + x.pow(2).reshape(-1, x.shape[-1]).mean(0)

    with hooks(norm_modules(model), record):
        run(model, batches)
    return importance, energy


def slice_channels(model: nn.Module, d_model: int, batches: list[Batch], uniform: bool = False) -> nn.Module:
    cfg = model.config
    _require_rmsnorm(cfg, "channel slicing")
    D = cfg.d_model
    importance, energy = channel_statistics(model, batches)
    kept = torch.arange(d_model) if uniform else importance.topk(d_model).indices.sort().values
    select = torch.eye(D)[:, kept]  # (D, k): x @ select keeps the chosen channels
    state = _map_residual(state_of(model), cfg, select, select.T)
    gains = {}
    for name, module in norm_modules(model).items():
        kept_share = float(energy[name][kept].sum() / energy[name].sum().clamp_min(1e-12))
        gains[name] = module.weight.detach().float()[kept] * math.sqrt(D / d_model * kept_share)
    return rebuild(_student_config(cfg, d_model, untie=False), _with_norm_gains(state, gains))


# ---- PCA rotation (SliceGPT) --------------------------------------------------------------------
def fold_norm_gains(model: nn.Module) -> dict[str, torch.Tensor]:
    """Teacher weights with every RMSNorm gain multiplied into the linears reading it (gains -> 1)."""
    state = state_of(model)
    for i, block in enumerate(blocks(model)):
        for norm_name, readers in (("attn_norm", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
                                   ("ffn_norm", ("ffn.gate", "ffn.up"))):
            gain = getattr(block, norm_name).weight.detach().float()
            for reader in readers:
                key = f"decoder.blocks.{i}.{reader}.weight"
                if key in state:
                    state[key] = state[key] * gain
            state[f"decoder.blocks.{i}.{norm_name}.weight"] = torch.ones_like(gain)
    final = model.decoder.norm.weight.detach().float()
    state["lm_head.weight"] = state["lm_head.weight"] * final  # a copy: a tied embedding stays unscaled
    state["decoder.norm.weight"] = torch.ones_like(final)
    return state


def residual_covariance(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """Sum over norm inputs of their (trace-normalised) covariance X^T X, float64 (D, D)."""
    D = model.config.d_model
    per_norm: dict[str, torch.Tensor] = {}

    def record(name, args, _):
        x = args[0].detach().double().reshape(-1, D)
        per_norm[name] = per_norm.get(name, 0) + x.T @ x

    with hooks(norm_modules(model), record):
        run(model, batches)
    # each point counts equally: the residual stream grows with depth and would drown the early layers
    return sum(c / c.trace().clamp_min(1e-12) for c in per_norm.values())


def pca_rotation(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """Orthogonal (D, D), columns = principal directions, largest variance first."""
    values, vectors = torch.linalg.eigh(residual_covariance(model, batches))
    order = values.argsort(descending=True)
    return vectors[:, order].float()


def rotate_width(model: nn.Module, d_model: int, batches: list[Batch],
                 rotation: torch.Tensor | None = None) -> nn.Module:
    """SliceGPT-style student of width ``d_model`` (an ordinary RMSNorm model)."""
    cfg = model.config
    _require_rmsnorm(cfg, "PCA width reduction")
    Q = pca_rotation(model, batches) if rotation is None else rotation
    Qk = Q[:, :d_model]
    state = _map_residual(fold_norm_gains(model), cfg, Qk, Qk.T)
    gain = torch.full((d_model,), math.sqrt(cfg.d_model / d_model))
    gains = {name: gain.clone() for name in norm_modules(model)}
    return rebuild(_student_config(cfg, d_model, untie=True), _with_norm_gains(state, gains))


def reduce_width(model: nn.Module, d_model: int, method: str, batches: list[Batch], uniform: bool = False):
    if method == "pca":
        return rotate_width(model, d_model, batches)
    return slice_channels(model, d_model, batches, uniform)


__all__ = ["neuron_importance", "prune_ffn", "slice_channels", "fold_norm_gains", "pca_rotation", "rotate_width",
           "reduce_width", "residual_covariance", "channel_statistics"]
