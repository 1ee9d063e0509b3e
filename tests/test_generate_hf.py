"""Parity with Hugging Face transformers: greedy and beam search token for token on a random tiny
Llama (weights copied with neoformer.from_hf), and each logits processor against HF's."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper)

from neoformer.generate import GenerationConfig, generate  # noqa: E402
from neoformer.generate.sampling import History, min_p_filter, process, top_k_filter, top_p_filter  # noqa: E402



VOCAB = 61


@pytest.fixture(scope="module")
def pair():
    """A random tiny LlamaForCausalLM and the same weights in a neoformer model."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    hf = LlamaForCausalLM(cfg).eval()
    from neoformer.hf import from_hf

    return hf, from_hf(hf)


def prompts(n_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 9, (n_rows,), generator=g)]


def hf_generate(hf, rows, **kw):
    """HF generate on left-padded rows; returns the new tokens of each row."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, pad_token_id=0, **kw)
    return out[:, T:].tolist()


def test_greedy_matches_transformers(pair):
    hf, ours = pair
    for rows in (prompts(1, 1), prompts(1, 2), prompts(4, 3)):
        expected = hf_generate(hf, rows, max_new_tokens=16, do_sample=False)
        got = generate(ours, rows, max_new_tokens=16, pad_token_id=0)
        assert got[:, -16:].tolist() == expected


@pytest.mark.parametrize("options", [
    dict(num_beams=3),
    dict(num_beams=4, num_return_sequences=2, length_penalty=0.5, eos=True),
    dict(num_beams=3, early_stopping=True, eos=True),
    dict(num_beams=2, early_stopping="never", length_penalty=1.5, eos=True),
    dict(num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=2),
])
def test_beam_search_matches_transformers(pair, options):
    hf, ours = pair
    options = dict(options)
    rows = prompts(2, 7)
    eos = None
    if options.pop("eos", False):  # an EOS the beams actually produce, so hypotheses finish early
        eos = generate(ours, rows[:1], max_new_tokens=3, pad_token_id=0)[0, -2].item()
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = (torch.arange(T)[None] >= torch.tensor([T - len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                               eos_token_id=eos, output_scores=True, return_dict_in_generate=True, **options)
    got = generate(ours, rows, max_new_tokens=10, pad_token_id=0, eos_token_id=eos, return_dict=True, **options)
    def until_eos(row):  # HF fills finished beams with eos when pad_token_id is 0 (falsy)
        return row[:row.index(eos) + 1] if eos in row else row

    assert got.new_tokens == [until_eos(r) for r in expected.sequences[:, T:].tolist()]
    assert got.sequences.shape == expected.sequences.shape
    assert torch.allclose(got.scores, expected.sequences_scores, atol=1e-4)


def test_repetition_penalty_and_ngrams_match_processors():
    torch.manual_seed(1)
    ids = torch.randint(0, 20, (3, 12))
    logits = torch.randn(3, 20) * 3
    for penalty in (0.7, 1.5):
        cfg = GenerationConfig.build(repetition_penalty=penalty, no_repeat_ngram_size=3)
        history = History(cfg, ids.tolist(), 20, "cpu")
        expected = NoRepeatNGramLogitsProcessor(3)(ids, RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))
        assert torch.allclose(process(logits, cfg, history), expected)
        # incremental updates give the same as recomputing from the whole sequence
        new = torch.randint(0, 20, (3,))
        history.append(new)
        ids2 = torch.cat((ids, new[:, None]), dim=1)
        expected = NoRepeatNGramLogitsProcessor(3)(ids2, RepetitionPenaltyLogitsProcessor(penalty)(ids2, logits.clone()))
        assert torch.allclose(process(logits, cfg, history), expected)


def test_warpers_match_processors():
    torch.manual_seed(2)
    logits = torch.randn(4, 50) * 2
    logits[0, :5] = 1.0  # ties
    ids = torch.zeros(4, 1, dtype=torch.long)
    for k in (1, 5, 50, 80):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits))
    for p in (0.05, 0.5, 0.9, 1.0):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits))
    for m in (0.0, 0.05, 0.3, 1.0):
        assert torch.equal(min_p_filter(logits, m), MinPLogitsWarper(m)(ids, logits))
    cfg = GenerationConfig.build(temperature=0.7, top_k=20, top_p=0.8, min_p=0.1)
    expected = logits
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.1)):
        expected = proc(ids, expected)
    assert torch.equal(process(logits, cfg, None), expected)
