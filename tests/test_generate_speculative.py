"""Speculative decoding: greedy output equals target-only greedy; sampled output is distributed
as the target's (total-variation distance on a tiny vocabulary, fixed seed)."""
import pytest
import torch

from neoformer import ModelConfig, build_model
from neoformer.generate import generate
from neoformer.generate.speculative import _accept



V = 8


def model(vocab=97, n_layers=2, seed=0, std=0.25, **changes):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      max_seq_len=64, init_std=std, **changes)
    return build_model(cfg).eval()


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_equals_target_greedy(gamma):
    target, draft = model(n_layers=3), model(n_layers=1, seed=1)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 9, 9, 9]]
    expected = generate(target, prompts, max_new_tokens=20)
    out = generate(target, prompts, max_new_tokens=20, draft_model=draft, num_draft_tokens=gamma, return_dict=True)
    assert torch.equal(out.sequences, expected)
    assert 0 <= out.stats["acceptance_rate"] <= 1 and out.stats["proposed"] > 0


def test_greedy_with_a_draft_equal_to_the_target_accepts_everything():
    target = model()
    out = generate(target, [3, 4], max_new_tokens=12, draft_model=target, num_draft_tokens=3, return_dict=True)
    assert out.stats["acceptance_rate"] == 1.0
    assert out.new_tokens[0] == generate(target, [3, 4], max_new_tokens=12, return_dict=True).new_tokens[0]


def test_rmc_target_and_trimming():
    kw = dict(rmc=True, nsb=True, rmc_mem_size=8, nsb_rules=8, nsb_rule_dim=16)
    target, draft = model(**kw), model(n_layers=1, seed=3, **kw)
    expected = generate(target, [1, 2, 3], max_new_tokens=15)
    assert torch.equal(generate(target, [1, 2, 3], max_new_tokens=15, draft_model=draft), expected)
    # past the window: the target is trimmed where plain decoding trims it, so greedy output still matches
    for mode in ("slice", "refill"):
        opts = dict(max_new_tokens=40, context_window=20, trim_keep=10, trim=mode)
        out = generate(target, [1, 2, 3], draft_model=draft, return_dict=True, **opts)
        assert out.new_tokens[0] == generate(target, [1, 2, 3], return_dict=True, **opts).new_tokens[0]


def tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_accept_step_reproduces_the_target_distribution():
    """The rejection step alone: the first emitted token ~ p_1 whatever q is."""
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(3, V, generator=g) * 2, torch.randn(2, V, generator=g) * 2
    q = torch.softmax(q_logits, -1)
    counts = torch.zeros(V)
    n = 6000
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(2)], dim=1)
    for d in drafts:
        n_ok, new = _accept(p_logits, q_logits, d, True, g)
        counts[int(d[0]) if n_ok >= 1 else new] += 1
    p1 = torch.softmax(p_logits[0], -1)
    assert tv(counts, p1) < 0.03
    assert tv(counts, q[0]) > 0.1  # the draft's own distribution is far away: the test has power


def test_sampled_tokens_follow_the_target_distribution():
    target, draft = model(vocab=V, std=0.3), model(vocab=V, n_layers=1, seed=6, std=0.3)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0][0, -1], -1)
        q1 = torch.softmax(draft(torch.tensor([prompt]))[0][0, -1], -1)
        # exact marginal of the second token: sum_a p(a) p(b | a)
        nxt = torch.softmax(target(torch.tensor([prompt + [a] for a in range(V)]))[0][:, -1], -1)
        p2 = (p1[:, None] * nxt).sum(0)
        # what the draft alone would give as the second token
        q2 = (p1[:, None] * torch.softmax(draft(torch.tensor([prompt + [a] for a in range(V)]))[0][:, -1], -1)).sum(0)
    n = 1500
    # the first token is read off the prompt; the second is the first of a speculative round
    out = generate(target, prompt, max_new_tokens=3, draft_model=draft, num_draft_tokens=3, temperature=1.0,
                   seed=0, num_return_sequences=n, return_dict=True)
    first = torch.bincount(out.sequences[:, 3], minlength=V).float()
    second = torch.bincount(out.sequences[:, 4], minlength=V).float()
    assert tv(first, p1) < 0.06 and tv(second, p2) < 0.06
    assert tv(first, q1) > 0.3 and tv(second, q2) > 0.15, tv(second, q2)  # the draft is far off: the test has power
    assert 0 < out.stats["acceptance_rate"] < 1


def test_sampling_is_reproducible_and_checks_vocabulary():
    target, draft = model(), model(n_layers=1, seed=2)
    a = generate(target, [4, 5], max_new_tokens=10, draft_model=draft, temperature=0.9, top_k=20, seed=3)
    b = generate(target, [4, 5], max_new_tokens=10, draft_model=draft, temperature=0.9, top_k=20, seed=3)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, [4, 5], max_new_tokens=3, draft_model=model(vocab=50))


@pytest.mark.slow
def test_compiled_speculative_greedy_equals_target_greedy():
    kw = dict(rmc=True, rmc_mem_size=8)
    target, draft = model(n_layers=3, **kw), model(n_layers=1, seed=1, **kw)
    expected = generate(target, [1, 2, 3], max_new_tokens=70)
    assert torch.equal(generate(target, [1, 2, 3], max_new_tokens=70, draft_model=draft, compile=True), expected)
    # prompt lookup with a compiled target: short proposals padded to the compiled length
    assert torch.equal(generate(target, [1, 2, 3], max_new_tokens=70, prompt_lookup_num_tokens=4, compile=True),
                       expected)


@pytest.mark.parametrize("k,ngram", [(1, 1), (3, 2), (5, 3)])
def test_prompt_lookup_greedy_equals_target_greedy(k, ngram):
    target = model(n_layers=2)
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [1, 2, 3]]
    expected = generate(target, prompts, max_new_tokens=30)
    out = generate(target, prompts, max_new_tokens=30, prompt_lookup_num_tokens=k, max_matching_ngram_size=ngram,
                   return_dict=True)
    assert torch.equal(out.sequences, expected)
    assert out.stats["proposed"] > 0 and 0 <= out.stats["acceptance_rate"] <= 1


def test_prompt_lookup_proposes_what_followed_the_last_match():
    from neoformer.generate.config import GenerationConfig
    from neoformer.generate.speculative import _PromptLookup

    cfg = GenerationConfig.build(prompt_lookup_num_tokens=3, max_matching_ngram_size=2)
    look = _PromptLookup(cfg, [1, 2, 3, 4, 9, 2, 3, 7, 8, 2, 3], vocab=10, pad=False)
    d, q = look.propose(torch.tensor([[3]]), 3)
    assert d.tolist() == [[7, 8, 2]]  # the latest earlier "2 3" was followed by 7 8 2
    assert torch.equal(q.softmax(-1).argmax(-1), d[0]) and float(q.softmax(-1).max(-1).values.min()) == 1.0
    look.extend([5])  # "3 5" never seen, "5" never seen: nothing to propose
    assert look.propose(torch.tensor([[5]]), 3)[0].shape == (1, 0)
    padded = _PromptLookup(cfg, [1, 2, 1], vocab=10, pad=True).propose(torch.tensor([[1]]), 3)[0]
    assert padded.tolist() == [[2, 1, 1]]  # compiled target: always g tokens


def test_prompt_lookup_sampling_follows_the_target_distribution():
    """Sampled first tokens with prompt lookup have the target's distribution (the proposal is
    one-hot: accepted with p(d), else drawn from p without d)."""
    target = model(vocab=V, n_layers=1, std=0.5)
    prompt = [1, 2, 3, 1, 2]  # "1 2" was followed by 3: lookup proposes 3 1 2
    with torch.inference_mode():
        p = torch.softmax(target(torch.tensor([prompt]), use_cache=False)[0][0, -1], -1)
    n = 1500
    out = generate(target, [prompt] * n, max_new_tokens=2, temperature=1.0, seed=0, prompt_lookup_num_tokens=3,
                   return_dict=True)
    firsts = torch.tensor([t[0] for t in out.new_tokens])
    freq = torch.bincount(firsts, minlength=V).float() / n
    assert 0.5 * (freq - p).abs().sum() < 0.05
    with pytest.raises(ValueError, match="not both"):
        generate(target, prompt, max_new_tokens=2, draft_model=target, prompt_lookup_num_tokens=3)
