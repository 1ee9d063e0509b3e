"""The model's cache/state protocol and hooks (issue 8 item 4), mask forms and tied init (issue 16 items 14-15)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from neoformer import ModelConfig, build_model
from neoformer.generate import generate
from neoformer.generate.cache import StaticKVCache
from neoformer.generate.engine import as_prompts, prefill
from neoformer.model.attention import keep_mask
from neoformer.model.state import Past, TupleCache
from neoformer.model.weights import init_weights, mark_like, residual_projection, writes_residual
from neoformer.train import TrainConfig, causal_lm, fit

TINY = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=64)
MEMORY = dict(rmc=True, nsb=True, rmc_mem_size=8, nsb_rules=8, nsb_rule_dim=8)


def build(dtype=torch.float64, **changes):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **changes}), dtype=dtype).eval()


def ids(batch=2, length=10, seed=1):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- one cache protocol ------------------------------------------------------------------------
def test_tuple_past_goes_through_the_cache_adapter():
    model = build(**MEMORY)
    tokens = ids()
    _, past, _ = model(tokens[:, :6])
    assert isinstance(past, Past) and past.memory_state is not None
    adapter = TupleCache(past)
    assert adapter.length == 6 and adapter.model_state is past.memory_state
    # the engine's cache and the tuple adapter are interchangeable for the model
    cache = StaticKVCache.for_model(model, 2, 16)
    with torch.no_grad():
        prefill(model, cache, tokens[:, :6], torch.arange(6)[None])
        engine = model.forward_hidden(tokens[:, 6:], kv_cache=cache, positions=torch.arange(6, 10)[None])
        seed_api = model.forward_hidden(tokens[:, 6:], past)
    torch.testing.assert_close(engine.hidden, seed_api.hidden, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cache.model_state.total, seed_api.past.memory_state.total)
    with pytest.raises(ValueError, match="either past"):
        model(tokens[:, 6:], past, kv_cache=cache)


def test_model_state_hooks_select_copy_and_advance():
    model = build(**MEMORY)
    tokens = ids(3, 8)
    with torch.no_grad():
        _, past, _ = model(tokens)
        state = past.memory_state
        # advance_state gives what a forward leaves, without running the blocks
        _, head, _ = model(tokens[:, :5])
        advanced = model.advance_state(head.memory_state, tokens[:, 5:], torch.arange(5, 8)[None])
    torch.testing.assert_close(advanced.total, state.total)
    torch.testing.assert_close(advanced.count, state.count)
    picked = state.select(torch.tensor([2, 0]))
    torch.testing.assert_close(picked.total, state.total[[2, 0]])
    other = state.select(torch.tensor([1, 1, 1]))
    state.copy_row_(0, other, 2)
    torch.testing.assert_close(state.total[0], other.total[2])
    # a model without own state hands the state back untouched
    plain = build()
    assert plain.advance_state(None, tokens, torch.arange(8)[None]) is None


def test_models_say_which_layers_cache_and_who_can_speculate():
    decoder, encoder = build(), build(kind="encoder")
    enc_dec = build(kind="encoder_decoder", n_encoder_layers=3)
    assert decoder.cache_layers == range(2) and enc_dec.cache_layers == range(3, 5)
    assert len(encoder.cache_layers) == 0
    assert decoder.supports_speculative_decoding and not enc_dec.supports_speculative_decoding
    cache = StaticKVCache.for_model(enc_dec, 1, 8)
    assert len(cache.k) == 2 and cache.layer_offset == 3
    with pytest.raises(ValueError, match="no self-attention cache"):
        StaticKVCache.for_model(encoder, 1, 8)


def test_generate_has_no_model_specific_branches():
    root = Path(__file__).resolve().parents[1] / "neoformer" / "generate"
    banned = re.compile(r"\.rmc\b|memory_state|MemoryState|config\.kind|\.kind\s*[!=]=")
    for name in ("engine.py", "cache.py", "speculative.py", "beam.py", "sampling.py"):
        hits = [line for line in (root / name).read_text().splitlines() if banned.search(line)]
        assert not hits, f"{name}: {hits}"


def test_rmc_model_speculates_against_itself_like_plain_greedy():
    """The RMC state goes through advance_state on rejected drafts (no RMC code in generate/)."""
    target = build(dtype=torch.float32, **MEMORY)
    draft = build(dtype=torch.float32, **{**MEMORY, "n_layers": 1})
    prompt = ids(1, 6)[0].tolist()
    plain = generate(target, prompt, max_new_tokens=12, return_dict=True).new_tokens[0]
    spec = generate(target, prompt, max_new_tokens=12, draft_model=draft, num_draft_tokens=3,
                    return_dict=True).new_tokens[0]
    assert spec == plain


# ---- MoE aux loss returned, not stored -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["decoder", "encoder", "encoder_decoder"])
def test_moe_aux_loss_is_returned_not_stored(kind):
    extra = dict(n_encoder_layers=2) if kind == "encoder_decoder" else {}
    model = build(dtype=torch.float32, kind=kind, moe_experts=4, moe_top_k=2, **extra).train()
    before = set(vars(model))
    tokens = ids()
    if kind == "encoder_decoder":
        loss, stats = model.loss(tokens, tokens[:, :-1], tokens[:, 1:])
    else:
        loss, stats = model.loss(tokens, tokens)
    assert set(vars(model)) == before, "loss() stored something on the model"
    assert not [k for k, v in vars(model).items() if isinstance(v, torch.Tensor)]
    assert stats["aux"] is not None and stats["aux"] >= 1.0 - 1e-5
    ce_only = stats["ce"] + model.config.moe_aux_weight * stats["aux"]
    torch.testing.assert_close(loss.detach(), ce_only)


# ---- after_optimizer_step ------------------------------------------------------------------------
def test_after_optimizer_step_applies_rmc_write_and_ngpt_renorm():
    model = build(dtype=torch.float32, ngpt=True, rmc=True, rmc_mem_size=8)
    w = model.decoder.blocks[0].attn.q_proj.weight
    with torch.no_grad():
        w.mul_(3.0)
    delta = torch.ones_like(model.rmc.memory)
    model.after_optimizer_step(delta, memory_lr=0.5)
    torch.testing.assert_close(model.rmc.episodic, 0.5 * delta)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))


def test_fit_calls_after_optimizer_step_once_per_step():
    torch.manual_seed(0)
    model = build_model("neoformer-x-debug", vocab_size=32, max_seq_len=32)
    calls = []
    original = model.after_optimizer_step
    model.after_optimizer_step = lambda delta=None, memory_lr=0.01: (calls.append(delta), original(delta, memory_lr))

    def batches():
        while True:
            x = torch.randint(4, 32, (2, 9))
            yield x[:, :-1], x[:, 1:]

    cfg = TrainConfig(max_steps=3, lr=1e-3, warmup_steps=0, progress=False, plot=False, log_every=1,
                      eval_every=0, save_every=0)
    fit(model, causal_lm, batches(), cfg, log=lambda _m: None)
    assert len(calls) == 3 and all(d is not None and d.shape == model.rmc.memory.shape for d in calls)


# ---- residual projections marked where built ------------------------------------------------------
class Wrapped(nn.Module):
    """A LoRA-style wrapper: the original Linear becomes ``base_layer`` (as in peft)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class QuantLinear(nn.Linear):
    """A replacement with another class and no knowledge of names."""


def swap_projections(model):
    attn = model.decoder.blocks[0].attn
    attn.o_proj = Wrapped(attn.o_proj)
    ffn = model.decoder.blocks[0].ffn
    new = QuantLinear(ffn.down.in_features, ffn.down.out_features, bias=False)
    ffn.down = mark_like(new, ffn.down)
    return attn.o_proj.base_layer, ffn.down


def test_scaled_init_finds_wrapped_and_replaced_residual_projections():
    model = build(dtype=torch.float32, n_layers=8, scaled_residual_init=True, d_model=64, ffn_hidden=256)
    wrapped, replaced = swap_projections(model)
    assert writes_residual(wrapped) and writes_residual(replaced)
    init_weights(model, model.config)
    for w in (wrapped.weight, replaced.weight):
        assert w.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert model.decoder.blocks[0].attn.o_proj.lora_A.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_ngpt_normalises_columns_of_wrapped_residual_projections():
    model = build(dtype=torch.float32, ngpt=True)
    wrapped, replaced = swap_projections(model)
    with torch.no_grad():
        wrapped.weight.mul_(2.0)
        replaced.weight.normal_()
    model.normalize_weights_()
    for w in (wrapped.weight, replaced.weight):
        torch.testing.assert_close(w.norm(dim=0), torch.ones(w.shape[1]))


def test_residual_mark_is_set_where_modules_are_built():
    model = build(**MEMORY)
    marked = sorted(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if writes_residual(m))
    assert set(marked) == {"o_proj", "down", "fuse_out"}
    assert writes_residual(residual_projection(nn.Linear(2, 2)))


# ---- attention masks: every form, one reading ------------------------------------------------------
def mask_forms(keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "bool": keep,
        "int64": keep.long(),
        "int32": keep.int(),
        "float01": keep.float(),
        "additive_inf": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")),
        "additive_large": torch.zeros(keep.shape).masked_fill(~keep, -1e9),
        "additive_finfo": torch.zeros(keep.shape, dtype=torch.float16).masked_fill(~keep, torch.finfo(torch.float16).min),
    }


KEEP = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("form", list(mask_forms(KEEP)))
def test_every_mask_form_reads_the_same(form):
    torch.testing.assert_close(keep_mask(mask_forms(KEEP)[form]), KEEP)


@pytest.mark.parametrize("form", list(mask_forms(KEEP)))
def test_encoder_logits_equal_for_every_mask_form(form):
    model = build(kind="encoder", pad_token_id=0, position="learned", learned_pos_offset=1)
    tokens = ids().masked_fill(~KEEP, 0)
    expected = model(tokens, attention_mask=KEEP)
    torch.testing.assert_close(model(tokens, attention_mask=mask_forms(KEEP)[form]), expected, atol=0, rtol=0)
    torch.testing.assert_close(expected[0, :7], model(tokens[:1, :7])[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("form", ["int64", "float01", "additive_inf", "additive_large"])
def test_decoder_and_encoder_decoder_read_every_mask_form(form):
    left = KEEP.flip(-1)  # left padding for the decoder
    decoder = build(**MEMORY)
    tokens = ids()
    expected, _, _ = decoder(tokens, attention_mask=left)
    got, _, _ = decoder(tokens, attention_mask=mask_forms(left)[form])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    enc_dec = build(kind="encoder_decoder", n_encoder_layers=2)
    expected, _ = enc_dec(tokens, tokens[:, :4], src_mask=KEEP)
    got, _ = enc_dec(tokens, tokens[:, :4], src_mask=mask_forms(KEEP)[form])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert as_prompts(tokens, mask_forms(KEEP)[form]) == as_prompts(tokens, KEEP)


@pytest.mark.parametrize("bad,message", [
    (torch.tensor([[1, 2]]), "only 0 .padding. and 1"),
    (torch.tensor([[1.0, float("-inf")]]), "mixes 1s with negative"),
    (torch.tensor([[0.5, 1.0]]), "0/1 .* or additive"),
    (torch.tensor([[0.0, float("nan")]]), "NaN"),
])
def test_unreadable_masks_fail_with_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        keep_mask(bad)
    assert "\n" not in str(info.value)


# ---- tied embeddings keep their init -------------------------------------------------------------
@pytest.mark.parametrize("preset", ["nima-debug", "nima-transformer-debug"])
def test_tied_xavier_preset_keeps_the_embedding_init(preset):
    torch.manual_seed(0)
    model = build_model(preset)
    assert model.config.tie_embeddings and model.config.init == "xavier"
    assert model.lm_head.weight is model.embed.tokens.weight
    assert model.embed.tokens.weight.std().item() == pytest.approx(model.config.init_std, rel=0.05)
    untied = build_model(preset, tie_embeddings=False)  # an untied head still gets Xavier
    bound = (6 / sum(untied.lm_head.weight.shape)) ** 0.5
    assert untied.lm_head.weight.abs().max() > 0.8 * bound
