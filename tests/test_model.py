"""Model core: every option builds, backends agree with the eager reference, caches and masks are exact."""
import math

import pytest
import torch

from neoformer import ConfigError, ModelConfig, build_model
from neoformer.presets import PRESETS

torch.manual_seed(0)

TINY = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=64)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def build(cfg: ModelConfig, backend: str | None = None, dtype=torch.float64):
    torch.manual_seed(0)
    model = build_model(cfg if backend is None else cfg.replace(attn_backend=backend), dtype=dtype)
    return model.eval()


def ids(batch=2, length=12, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, tokens, **kwargs):
    kind = model.config.kind
    if kind == "decoder":
        return model(tokens, **kwargs)[0]
    if kind == "encoder":
        return model(tokens, **kwargs)
    return model(tokens, tokens[:, :7], **kwargs)[0]


OPTION_GRID = {
    "mha": {},
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "fused_qkv": dict(fused_qkv=True, n_kv_heads=2),
    "layernorm_bias_gelu": dict(norm="layernorm", bias=True, activation="gelu"),
    "post_norm_relu": dict(norm_position="post", activation="relu", norm="layernorm"),
    "glu": dict(activation="glu"),
    "geglu_untied": dict(activation="geglu", tie_embeddings=False),
    "sinusoidal": dict(position="sinusoidal", embed_scale=True),
    "learned": dict(position="learned"),
    "alibi": dict(position="alibi"),
    "relative": dict(position="relative", relative_buckets=8, relative_max_distance=16),
    "none": dict(position="none"),
    "rope_linear": dict(rope_scaling="linear", rope_scaling_factor=2.0),
    "rope_ntk": dict(rope_scaling="ntk", rope_scaling_factor=4.0, rope_base=500.0),
    "window": dict(sliding_window=4),
    "window_pattern": dict(sliding_window=3, sliding_window_pattern="LG"),
    "moe": dict(moe_experts=4, moe_top_k=2),
    "ngpt": dict(ngpt=True),
    "xavier_scaled": dict(init="xavier", scaled_residual_init=True),
    "memory_layer": dict(rmc=True, nsb=True, rmc_mem_size=8, nsb_rules=8, nsb_rule_dim=8),
}


@pytest.mark.parametrize("kind", ["decoder", "encoder", "encoder_decoder"])
@pytest.mark.parametrize("option", sorted(OPTION_GRID))
def test_sdpa_matches_eager_for_every_option(kind, option):
    changes = dict(OPTION_GRID[option])
    if kind != "decoder" and option == "memory_layer":
        pytest.skip("RMC/NSB are decoder-only (rejected by the config)")
    if kind == "encoder_decoder":
        changes["n_encoder_layers"] = 2
    cfg = tiny(kind=kind, **changes)
    tokens = ids()
    eager, sdpa = build(cfg, "eager"), build(cfg, "sdpa")
    torch.testing.assert_close(run(sdpa, tokens), run(eager, tokens), atol=1e-10, rtol=1e-10)
    # and the auto chain (flash is unavailable on CPU) falls back to the same numbers
    torch.testing.assert_close(run(build(cfg, "auto"), tokens), run(eager, tokens), atol=1e-10, rtol=1e-10)


def naive_causal_reference(model, tokens):
    """Recompute a pre-norm RoPE decoder by hand in float64, without the attention module."""
    cfg = model.config
    h = model.embed.tokens(tokens)
    L = tokens.shape[1]
    pos = torch.arange(L)
    inv = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.resolved_head_dim, 2).double() / cfg.resolved_head_dim)
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    for block in model.decoder.blocks:
        a = block.attn
        x = block.attn_norm(h)
        B = x.shape[0]
        q = a.q_proj(x).view(B, L, a.n_heads, -1).transpose(1, 2)
        k = a.k_proj(x).view(B, L, a.n_kv_heads, -1).transpose(1, 2)
        v = a.v_proj(x).view(B, L, a.n_kv_heads, -1).transpose(1, 2)
        q, k = rope(q), rope(k)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1)
        h = h + a.o_proj(out)
        f = block.ffn
        x = block.ffn_norm(h)
        h = h + f.down(torch.nn.functional.silu(f.gate(x)) * f.up(x))
    return model.lm_head(model.decoder.norm(h))


def test_decoder_matches_hand_written_float64_reference():
    model = build(tiny(n_kv_heads=2))
    tokens = ids()
    torch.testing.assert_close(model(tokens)[0], naive_causal_reference(model, tokens), atol=1e-10, rtol=1e-10)


def test_causality_future_tokens_do_not_change_past_logits():
    for option in ("mha", "alibi", "relative", "memory_layer", "window", "moe"):
        model = build(tiny(**OPTION_GRID[option]))
        a, b = ids(seed=1), ids(seed=2)
        mixed = torch.cat([a[:, :6], b[:, 6:]], dim=1)
        torch.testing.assert_close(model(mixed)[0][:, :6], model(a)[0][:, :6], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("option", ["mha", "gqa", "alibi", "relative", "learned", "sinusoidal", "window",
                                    "memory_layer", "ngpt", "moe"])
def test_kv_cache_decode_equals_full_recompute(option):
    model = build(tiny(**OPTION_GRID[option]))
    tokens = ids(length=14)
    full, _, _ = model(tokens)
    logits, past, _ = model(tokens[:, :5])
    steps = [logits]
    for t in range(5, 14):
        logits, past, _ = model(tokens[:, t:t + 1], past=past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=1e-10)
    assert isinstance(past, tuple) and len(past) == 2
    k, v = past[0]
    assert k.shape == (2, model.config.resolved_n_kv_heads, 14, model.config.resolved_head_dim) and v.shape == k.shape


def test_left_padding_with_attention_mask_matches_unpadded_rows():
    for option in ("mha", "alibi", "memory_layer"):
        model = build(tiny(**OPTION_GRID[option]))
        short, long_ = ids(1, 5, seed=3), ids(1, 9, seed=4)
        batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long_])
        mask = torch.ones_like(batch)
        mask[0, :4] = 0
        logits, _, _ = model(batch, attention_mask=mask)
        torch.testing.assert_close(logits[0, 4:], model(short)[0][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(logits[1], model(long_)[0][0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("option", ["mha", "learned", "relative", "alibi", "window", "fused_qkv"])
def test_encoder_ignores_padding_exactly(option):
    cfg = tiny(kind="encoder", pad_token_id=0, **OPTION_GRID[option])
    if option == "learned":
        cfg = cfg.replace(learned_pos_offset=1)  # NeoBERT: position 0 reserved for padding
    model = build(cfg)
    tokens = ids(1, 7).clamp(min=1)
    padded = torch.cat([tokens, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = (padded != 0).long()
    for backend in ("eager", "sdpa"):
        model = build(cfg, backend)
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, :7], model(tokens), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("option", ["mha", "gqa", "alibi", "relative", "window", "learned"])
def test_packed_varlen_equals_separate_documents(kind, option):
    model = build(tiny(kind=kind, **OPTION_GRID[option]))
    docs = [ids(1, n, seed=n) for n in (5, 9, 3)]
    packed = torch.cat(docs, dim=1)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    out = run(model, packed, cu_seqlens=cu)
    separate = torch.cat([run(model, d) for d in docs], dim=1)
    torch.testing.assert_close(out, separate, atol=1e-10, rtol=1e-10)


def test_packed_rejects_bad_cu_seqlens():
    model = build(tiny())
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids(1, 10), cu_seqlens=torch.tensor([0, 4, 8]))


def test_sliding_window_limits_what_a_token_sees():
    model = build(tiny(sliding_window=3, n_layers=1))
    a, b = ids(1, 10, seed=5), ids(1, 10, seed=6)
    mixed = a.clone()
    mixed[:, :6] = b[:, :6]  # change tokens outside the last position's window (positions 7..9)
    torch.testing.assert_close(model(mixed)[0][:, -1], model(a)[0][:, -1], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(model(mixed)[0][:, 6], model(a)[0][:, 6])


def test_window_pattern_assigns_local_and_global_layers():
    cfg = tiny(n_layers=4, sliding_window=8, sliding_window_pattern="LLG")
    assert [cfg.layer_window(i) for i in range(4)] == [8, 8, None, 8]
    model = build(cfg)
    assert [b.attn.window for b in model.decoder.blocks] == [8, 8, None, 8]


def test_alibi_slopes_match_the_paper():
    from neoformer.model.positions import alibi_slopes

    assert alibi_slopes(8) == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert len(alibi_slopes(12)) == 12 and alibi_slopes(12)[:8] == alibi_slopes(8)


def test_rope_not_added_to_embeddings_and_tables_are_lazy():
    model = build(tiny())
    assert not hasattr(model.embed, "positions")
    assert not model.decoder.rope._inv_freq
    model(ids())
    assert model.decoder.rope._inv_freq  # created on first use, on the input's device
    assert all(t.device.type == "cpu" for t in model.decoder.rope._inv_freq.values())
    assert not any("inv_freq" in name for name in model.state_dict())


def test_ntk_and_linear_scaling_change_positions_as_documented():
    from neoformer.model.positions import RotaryEmbedding

    pos = torch.arange(6)[None]
    base = RotaryEmbedding(8, 10000.0)
    linear = RotaryEmbedding(8, 10000.0, "linear", 2.0)
    torch.testing.assert_close(linear(pos * 2, torch.float64)[0], base(pos, torch.float64)[0])
    ntk = RotaryEmbedding(8, 10000.0, "ntk", 4.0)
    assert ntk.base == pytest.approx(10000.0 * 4.0 ** (8 / 6))


def test_rmc_api_update_apply_and_reset():
    model = build(tiny(rmc=True, nsb=True, rmc_mem_size=8), dtype=torch.float32)
    tokens = ids()
    logits, past, delta = model(tokens, update=True)
    assert delta.shape == (2, 8, 32)
    assert model(tokens)[2] is None  # update=False: no write
    before = model(tokens)[0]
    model.rmc.apply_update(delta.mean(0), lr=0.5)
    assert not torch.allclose(model(tokens)[0], before)
    model.rmc.reset()
    torch.testing.assert_close(model(tokens)[0], before)
    with pytest.raises(ValueError, match="delta.mean"):
        model.rmc.apply_update(delta, lr=0.1)


def test_ablations_switch_memory_layer_off():
    with_memory = build(tiny(rmc=True, nsb=True))
    without = build(tiny())
    assert with_memory.rmc is not None and with_memory.nsb is not None
    assert without.rmc is None and without.nsb is None
    assert with_memory.num_parameters() > without.num_parameters()


def test_moe_routes_top_k_and_reports_balancing_loss():
    model = build(tiny(moe_experts=4, moe_top_k=2), dtype=torch.float32).train()
    loss, stats = model.loss(ids(), ids(seed=9))
    assert stats["aux"] is not None and stats["aux"] >= 1.0 - 1e-5  # E * sum(f * P) >= 1, = 1 when balanced
    loss.backward()
    assert model.decoder.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_identical_gradients():
    grads = []
    for flag in (False, True):
        model = build(tiny(gradient_checkpointing=flag)).train()
        loss, _ = model.loss(ids(), ids(seed=3))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-12)


def test_tied_and_untied_embeddings():
    tied, untied = build(tiny()), build(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.tokens.weight
    assert untied.lm_head.weight is not untied.embed.tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32


def test_init_schemes():
    normal = build(tiny(n_layers=8), dtype=torch.float32)
    assert normal.decoder.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)
    scaled = build(tiny(n_layers=8, scaled_residual_init=True), dtype=torch.float32)
    assert scaled.decoder.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.15)
    xavier = build(tiny(init="xavier"), dtype=torch.float32)
    bound = math.sqrt(6 / (32 + 32))
    w = xavier.decoder.blocks[0].attn.q_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def test_ngpt_keeps_weights_and_hidden_states_on_the_unit_sphere():
    model = build(tiny(ngpt=True), dtype=torch.float32).train()
    w = model.decoder.blocks[0].attn.q_proj.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))
    loss, _ = model.loss(ids(), ids(seed=2))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.normalize_weights_()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))
    o = model.decoder.blocks[0].attn.o_proj.weight  # writes to D: columns of length D are normalized
    torch.testing.assert_close(o.norm(dim=0), torch.ones(o.shape[1]))


def test_dropout_active_only_in_training():
    model = build(tiny(attn_dropout=0.3, hidden_dropout=0.3, embed_dropout=0.3), dtype=torch.float32)
    tokens = ids()
    torch.testing.assert_close(model(tokens)[0], model(tokens)[0])
    model.train()
    assert not torch.allclose(model(tokens, use_cache=False)[0], model(tokens, use_cache=False)[0])


def test_every_preset_builds_and_large_ones_on_meta_without_memory():
    for name, cfg in PRESETS.items():
        device = "cpu" if name.endswith("debug") else "meta"
        model = build_model(name, device=device)
        assert model.num_parameters() > 0
        if device == "meta":
            assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in PRESETS if n.endswith("debug")])
def test_debug_presets_train_one_step(name):
    model = build_model(name).train()
    tokens = ids(2, 12, vocab=model.config.vocab_size)
    if model.config.kind == "encoder_decoder":
        loss, _ = model.loss(tokens, tokens[:, :-1], tokens[:, 1:])
    else:
        loss, _ = model.loss(tokens, tokens)
    loss.backward()
    assert torch.isfinite(loss)


def test_encoder_decoder_cached_decode_equals_full():
    model = build(tiny(kind="encoder_decoder", n_encoder_layers=2, position="sinusoidal"))
    src, tgt = ids(2, 9, seed=1), ids(2, 6, seed=2)
    src_mask = torch.ones_like(src)
    src_mask[0, 6:] = 0
    full, _ = model(src, tgt, src_mask)
    memory = model.encode(src, src_mask)
    logits, past = model.decode(tgt[:, :2], memory, src_mask)
    steps = [logits]
    for t in range(2, 6):
        logits, past = model.decode(tgt[:, t:t + 1], memory, src_mask, past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=1e-10)


def test_learned_positions_reject_too_long_input():
    model = build(tiny(position="learned", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(1, 9))


def test_config_round_trips_through_json(tmp_path):
    cfg = tiny(n_kv_heads=2, sliding_window=4, sliding_window_pattern="LG", moe_experts=2, moe_top_k=1)
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg


BAD_CONFIGS = [
    (dict(d_model=48, n_heads=12, n_kv_heads=5), r"n_heads \(12\) must be divisible by n_kv_heads \(5\)"),
    (dict(d_model=30, n_heads=4), r"d_model \(30\) must be divisible by n_heads \(4\)"),
    (dict(head_dim=7), r"head_dim \(7\) must be even for rope"),
    (dict(kind="seq2seq"), r"kind \('seq2seq'\) must be one of"),
    (dict(norm="batchnorm"), r"norm \('batchnorm'\)"),
    (dict(activation="tanh"), r"activation \('tanh'\)"),
    (dict(position="xpos"), r"position \('xpos'\)"),
    (dict(attn_backend="triton"), r"attn_backend"),
    (dict(vocab_size=0), r"vocab_size \(0\) must be a positive integer"),
    (dict(n_layers=-1), r"n_layers"),
    (dict(attn_dropout=1.0), r"attn_dropout \(1.0\) must be in \[0, 1\)"),
    (dict(rope_scaling="yarn"), r"rope_scaling"),
    (dict(position="alibi", rope_scaling="linear", rope_scaling_factor=2.0), r"rope_scaling .* needs position='rope'"),
    (dict(rope_scaling="linear", rope_scaling_factor=0.5), r"rope_scaling_factor"),
    (dict(learned_pos_offset=1), r"learned_pos_offset \(1\) needs position='learned'"),
    (dict(pad_token_id=97), r"pad_token_id \(97\) must be in"),
    (dict(kind="encoder_decoder"), r"n_encoder_layers \(0\) must be a positive integer"),
    (dict(n_encoder_layers=2), r"n_encoder_layers \(2\) is only for kind='encoder_decoder'"),
    (dict(sliding_window_pattern="LG"), r"sliding_window_pattern needs sliding_window"),
    (dict(sliding_window=4, sliding_window_pattern="LX"), r"sliding_window_pattern \('LX'\)"),
    (dict(sliding_window=0), r"sliding_window \(0\)"),
    (dict(moe_experts=2, moe_top_k=3), r"moe_top_k \(3\) must be <= moe_experts \(2\)"),
    (dict(moe_experts=-1), r"moe_experts"),
    (dict(kind="encoder", rmc=True), r"rmc/nsb .* need kind='decoder'"),
    (dict(ngpt=True, norm_position="post"), r"ngpt=True"),
    (dict(ngpt=True, bias=True), r"ngpt=True needs bias=False"),
    (dict(position="sinusoidal", d_model=33, n_heads=3, head_dim=10), r"d_model \(33\) must be even"),
    (dict(norm_eps=0.0), r"norm_eps"),
    (dict(rmc=True, rmc_mem_size=0), r"rmc_mem_size"),
]


@pytest.mark.parametrize("changes,message", BAD_CONFIGS)
def test_invalid_configs_fail_at_build_time_with_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        tiny(**changes)
    assert "\n" not in str(info.value)


def test_unknown_field_and_preset_get_suggestions():
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        ModelConfig.from_dict({"n_layer": 3})
    with pytest.raises(ConfigError, match="did you mean 'lumi-tiny'"):
        build_model("lumi-tiy")


def test_precomputed_cross_kv_equals_encoder_memory_and_selects_rows():
    model = build(tiny(kind="encoder_decoder", n_encoder_layers=2, n_kv_heads=2))
    src, tgt = ids(3, 9, seed=1), ids(3, 5, seed=2)
    src_mask = torch.ones_like(src)
    src_mask[1, 5:] = 0
    memory = model.encode(src, src_mask)
    cross = model.cross_kv(memory)
    assert len(cross) == 3 and cross[0][0].shape == (3, 2, 9, 8)
    expected, _ = model.decode(tgt, memory, src_mask)
    torch.testing.assert_close(model.decode(tgt, cross, src_mask)[0], expected, atol=1e-12, rtol=1e-12)
    rows = torch.tensor([2, 1])
    picked, _ = model.decode(tgt[rows], cross.index_select(0, rows), src_mask[rows])
    torch.testing.assert_close(picked, expected[rows], atol=1e-12, rtol=1e-12)
