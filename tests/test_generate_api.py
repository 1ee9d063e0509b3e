"""generate() / stream() options, argument errors, stop strings, EOS and the seed API."""
import pytest
import torch

from neoformer import ModelConfig, build_model
from neoformer.generate import GenerationConfig, generate, stream, stream_text



TEXT = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def tok(fox_tokenizer):
    return fox_tokenizer


@pytest.fixture(scope="module")
def model(fox_model):
    return fox_model


def test_seed_api_and_aliases(model):
    x = torch.tensor([[5, 6, 7]])
    out = model.generate(x, max_new=8, temp=0.8, top_k=50, seed=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :3], x)
    assert torch.equal(out, model.generate(x, max_new_tokens=8, temperature=0.8, top_k=50, seed=0))
    assert not torch.equal(out, model.generate(x, max_new=8, temp=0.8, top_k=50, seed=1))
    greedy = model.generate(x, 8)
    assert torch.equal(greedy, model.generate(x, 8, temperature=0))
    assert torch.equal(greedy, model.generate(x, 8, top_k=5, do_sample=False))


@pytest.mark.parametrize("options, message", [
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(num_beams=0), "num_beams"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(temprature=0.5), "did you mean 'temperature'"),
    (dict(stop=["x"]), "tokenizer"),
    (dict(trim="drop"), "trim"),
    (dict(context_window=16, trim_keep=16), "trim_keep"),
])
def test_bad_arguments_raise_one_clear_error(model, options, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2, 3], **{"max_new_tokens": 4, **options})


def test_prompt_longer_than_the_model_is_an_error(model):
    with pytest.raises(ValueError, match="longer than the model can take"):
        generate(model, list(range(5, 40)) * 2, max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    enc = build_model(ModelConfig(kind="encoder", vocab_size=50, d_model=32, n_layers=1, n_heads=4))
    with pytest.raises(ValueError, match="encoder"):
        generate(enc, [1, 2], max_new_tokens=2)


def test_eos_stops_rows_and_pads(model):
    ids = [[5, 6, 7], [9, 10]]
    free = generate(model, ids, max_new_tokens=10, return_dict=True)
    eos = free.new_tokens[0][2]
    out = generate(model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, return_dict=True)
    assert out.new_tokens[0] == free.new_tokens[0][:3]
    assert out.sequences[0, 3 + 3:].tolist() == [0] * (out.sequences.shape[1] - 6)


def test_stop_strings_and_texts(model, tok):
    prompt = tok.encode("the ")
    free = generate(model, prompt, max_new_tokens=12, tokenizer=tok, eos_token_id=[], return_dict=True)
    text = free.texts[0]
    stop = text[3:5]
    out = generate(model, prompt, max_new_tokens=12, tokenizer=tok, stop=[stop], eos_token_id=[], return_dict=True)
    assert out.texts[0] == text[:text.find(stop)]
    assert stop in tok.decode(out.new_tokens[0]) and len(out.new_tokens[0]) < 12
    pieces = list(stream_text(model, tok, "the ", 12, stop=stop, eos_token_id=[]))
    assert "".join(pieces) == out.texts[0]


def test_stream_yields_the_same_tokens(model):
    ids = [[5, 6, 7], [9, 10, 11, 12]]
    stats = {}
    steps = list(stream(model, ids, max_new_tokens=6, top_k=10, seed=4, stats=stats))
    out = generate(model, ids, max_new_tokens=6, top_k=10, seed=4)
    assert torch.equal(torch.stack(steps, 1), out[:, -6:])
    assert stats["prefill_s"] > 0 and "decode_s" in stats
    with pytest.raises(ValueError, match="beam"):
        next(stream(model, ids, max_new_tokens=3, num_beams=2))


def test_num_return_sequences_and_history_options(model):
    out = generate(model, [[5, 6], [7, 8, 9]], max_new_tokens=10, temperature=1.0, num_return_sequences=3, seed=0,
                   repetition_penalty=1.2, no_repeat_ngram_size=2, return_dict=True)
    assert out.sequences.shape == (6, 13)
    prompts = [[5, 6]] * 3 + [[7, 8, 9]] * 3
    for toks, prompt in zip(out.new_tokens, prompts):
        row = prompt + toks
        bigrams = list(zip(row, row[1:]))  # no bigram of prompt + generated tokens repeats
        assert len(bigrams) == len(set(bigrams)) and len(toks) == 10


def test_generation_config_build():
    cfg = GenerationConfig.build(max_new=5, temp=0.7)
    assert cfg.max_new_tokens == 5 and cfg.temperature == 0.7 and cfg.sampling
    assert not GenerationConfig.build().sampling
    with pytest.raises(ValueError, match="both given"):
        GenerationConfig.build(max_new=5, max_new_tokens=6)
