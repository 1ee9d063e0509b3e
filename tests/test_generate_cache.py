"""Generation engine: static-cache decoding equals full recomputation, ragged batches equal
one-by-one decoding, rows join and leave, trimming, RMC and encoder-decoder models."""
import pytest
import torch

from neoformer import ModelConfig, build_model
from neoformer.generate import StaticKVCache, decode_one, generate, prefill
from neoformer.generate.engine import trim_cache



TINY = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64,
            init_std=0.25)


def tiny(dtype=torch.float32, **changes):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **changes}), dtype=dtype).eval()


def rand_ids(n, seed=0, vocab=97):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model, seq):
    return model(torch.tensor([seq]), use_cache=False)[0][0]  # (T, V)


def cached_logits(model, prompt, continuation, **cache_kw):
    """Logits after the prompt and after each continuation token, via prefill + decode_one."""
    cache = StaticKVCache.for_model(model, 1, len(prompt) + len(continuation), **cache_kw)
    with torch.inference_mode():
        out = [prefill(model, cache, torch.tensor([prompt]), torch.arange(len(prompt))[None])]
        for tok in continuation:
            cache.sync()
            out.append(decode_one(model, cache, torch.tensor([tok])))
    return torch.cat(out)


VARIANTS = {
    "gqa_rope": {},
    "mqa_layernorm_gelu": dict(n_kv_heads=1, norm="layernorm", activation="gelu", bias=True),
    "sinusoidal": dict(position="sinusoidal"),
    "learned": dict(position="learned"),
    "alibi": dict(position="alibi"),
    "relative": dict(position="relative", relative_buckets=8, relative_max_distance=16),
    "sliding_window": dict(sliding_window=4, sliding_window_pattern="LG"),
    "rmc_nsb": dict(rmc=True, nsb=True, rmc_mem_size=8, nsb_rules=8, nsb_rule_dim=16, norm="layernorm"),
    "ngpt": dict(ngpt=True),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decode_equals_full_recompute(name):
    model = tiny(**VARIANTS[name])
    prompt, cont = rand_ids(7, 1), rand_ids(9, 2)
    ref = full_logits(model, prompt + cont)[len(prompt) - 1:]
    got = cached_logits(model, prompt, cont)
    assert (got - ref).abs().max() < 1e-5


def test_static_shape_cache_equals_full_recompute():
    model = tiny(rmc=True, rmc_mem_size=8)
    prompt, cont = rand_ids(5, 3), rand_ids(6, 4)
    ref = full_logits(model, prompt + cont)[len(prompt) - 1:]
    got = cached_logits(model, prompt, cont, static=True)
    assert (got - ref).abs().max() < 1e-5


def test_greedy_generate_equals_naive_loop():
    model = tiny()
    seq = rand_ids(6, 5)
    out = generate(model, seq, max_new_tokens=12)
    for _ in range(12):
        seq = seq + [int(full_logits(model, seq)[-1].argmax())]
    assert out[0].tolist() == seq


@pytest.mark.parametrize("name", ["gqa_rope", "learned", "rmc_nsb", "alibi"])
def test_ragged_batch_equals_one_by_one(name):
    model = tiny(**VARIANTS[name])
    prompts = [rand_ids(n, 10 + n) for n in (3, 9, 1, 6)]
    batch = generate(model, prompts, max_new_tokens=10, return_dict=True)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt, max_new_tokens=10, return_dict=True)
        assert batch.new_tokens[row] == alone.new_tokens[0]
    # the logits agree too, not only the argmax
    cache = StaticKVCache.for_model(model, len(prompts), 20)
    from neoformer.generate.engine import left_pad
    pb = left_pad(prompts, 0)
    with torch.inference_mode():
        logits = prefill(model, cache, pb.ids, pb.positions, pb.keep)
    for row, prompt in enumerate(prompts):
        assert (logits[row] - full_logits(model, prompt)[-1]).abs().max() < 1e-5


def test_rows_join_and_leave():
    """Continuous batching: a row retires, a new prompt (prefilled alone) joins in its place."""
    model = tiny()
    a, b, c = rand_ids(4, 20), rand_ids(6, 21), rand_ids(9, 22)
    from neoformer.generate.engine import left_pad
    pb = left_pad([a, b], 0)
    cache = StaticKVCache.for_model(model, 2, 40)
    with torch.inference_mode():
        tok = prefill(model, cache, pb.ids, pb.positions, pb.keep).argmax(-1)
        got_a = [int(tok[0])]
        for _ in range(2):
            tok = decode_one(model, cache, tok).argmax(-1)
            got_a.append(int(tok[0]))
        cache.free_row(1)  # b leaves; c (longer than the cache so far) joins in row 1
        single = StaticKVCache.for_model(model, 1, 20)
        c_tok = prefill(model, single, torch.tensor([c]), torch.arange(len(c))[None]).argmax(-1)
        cache.insert_row(1, single)
        tok = torch.stack((tok[0], c_tok[0]))
        got_c = [int(c_tok[0])]
        for _ in range(5):
            tok = decode_one(model, cache, tok).argmax(-1)
            got_a.append(int(tok[0]))
            got_c.append(int(tok[1]))
    assert got_a == generate(model, a, max_new_tokens=8, return_dict=True).new_tokens[0]
    assert got_c == generate(model, c, max_new_tokens=6, return_dict=True).new_tokens[0]


def seed_style_trimmed_generate(model, prompt, n_new, window, keep):
    """Reference: the seed's loop with the tuple cache, k[:, :, -keep:, :] and explicit positions."""
    seq = list(prompt)
    logits, past, _ = model(torch.tensor([seq]))
    pos = len(seq)
    for _ in range(n_new):
        tok = int(logits[0, -1].argmax())
        seq.append(tok)
        if past[0][0].shape[2] + 1 > window:
            from neoformer.model import Past
            past = Past.of([(k[:, :, -keep:], v[:, :, -keep:]) for k, v in past], past.memory_state)
        logits, past, _ = model(torch.tensor([[tok]]), past, positions=torch.tensor([[pos]]))
        pos += 1
    return seq[len(prompt):]


@pytest.mark.parametrize("name", ["gqa_rope", "rmc_nsb", "alibi"])
def test_trimming_keeps_generating_like_the_seed(name):
    model = tiny(**VARIANTS[name])
    prompt = rand_ids(10, 30)
    out = generate(model, prompt, max_new_tokens=40, context_window=16, trim_keep=8, return_dict=True)
    assert len(out.new_tokens[0]) == 40 and out.stats["trims"] > 0
    assert out.new_tokens[0] == seed_style_trimmed_generate(model, prompt, 40, 16, 8)


def test_trimmed_cache_equals_fresh_prefill_of_the_window():
    model = tiny()
    seq = rand_ids(20, 31)
    keep = 8
    with torch.inference_mode():
        for mode in ("slice", "refill"):
            cache = StaticKVCache.for_model(model, 1, 20, track_tokens=True)
            prefill(model, cache, torch.tensor([seq]), torch.arange(20)[None])
            trim_cache(model, cache, keep, mode)
            fresh = StaticKVCache.for_model(model, 1, keep)
            prefill(model, fresh, torch.tensor([seq[-keep:]]), torch.arange(20 - keep, 20)[None])
            assert cache.end == keep and torch.equal(cache.pos[:, :keep], fresh.pos)
            assert int(cache.next_pos) == 20
            layers = range(len(cache.k)) if mode == "refill" else [0]  # deeper slices saw the dropped tokens
            for i in layers:
                assert (cache.k[i][:, :, :keep] - fresh.k[i]).abs().max() < 1e-5
                assert (cache.v[i][:, :, :keep] - fresh.v[i]).abs().max() < 1e-5
            # and decoding continues at position 20 as after the fresh prefill
            a = decode_one(model, cache, torch.tensor([5]))
            b = decode_one(model, fresh_with_room(model, seq, keep), torch.tensor([5]))
            if mode == "refill":
                assert (a - b).abs().max() < 1e-5


def fresh_with_room(model, seq, keep):
    cache = StaticKVCache.for_model(model, 1, keep + 1)
    prefill(model, cache, torch.tensor([seq[-keep:]]), torch.arange(len(seq) - keep, len(seq))[None])
    return cache


def test_learned_positions_trim_by_refill():
    model = tiny(position="learned", max_seq_len=16)
    out = generate(model, rand_ids(5, 32), max_new_tokens=30, return_dict=True)
    assert len(out.new_tokens[0]) == 30 and out.stats["trims"] > 0


def test_encoder_decoder_cached_greedy_equals_uncached():
    cfg = dict(kind="encoder_decoder", n_encoder_layers=2, position="sinusoidal", norm="layernorm",
               activation="relu", pad_token_id=0)
    model = tiny(**cfg)
    src = [rand_ids(7, 40), rand_ids(4, 41)]
    out = generate(model, src, max_new_tokens=10, decoder_start_token_id=1, return_dict=True)
    for row, s in enumerate(src):
        memory = model.encode(torch.tensor([s]))
        tgt = [1]
        for _ in range(10):
            logits, _ = model.decode(torch.tensor([tgt]), memory, use_cache=False)
            tgt.append(int(logits[0, -1].argmax()))
        assert out.new_tokens[row] == tgt[1:]
    beams = generate(model, src, max_new_tokens=6, num_beams=3, decoder_start_token_id=1)
    assert beams.shape == (2, 7) and bool((beams[:, 0] == 1).all())


def test_rmc_cached_generation_equals_full_recompute():
    model = tiny(rmc=True, nsb=True, rmc_mem_size=8, nsb_rules=8, nsb_rule_dim=16)
    seq = rand_ids(5, 50)
    out = generate(model, seq, max_new_tokens=10)
    for _ in range(10):
        seq = seq + [int(full_logits(model, seq)[-1].argmax())]
    assert out[0].tolist() == seq


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    """torch.compile of the one-token step (static-shape cache): ragged batch, trimming, RMC."""
    model = tiny(rmc=True, nsb=True, rmc_mem_size=8, nsb_rules=8, nsb_rule_dim=16)
    prompts = [rand_ids(3, 60), rand_ids(5, 61)]
    expected = generate(model, prompts, max_new_tokens=70)
    assert torch.equal(generate(model, prompts, max_new_tokens=70, compile=True), expected)
