"""Tokenizers: exact Unicode round-trips, save/load identity, clear errors, no network."""
from __future__ import annotations

import base64
import functools
import socket

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neoformer.tokenizer import (
    CharTokenizer,
    TokenizerError,
    get_tokenizer,
    load_tokenizer,
    train_bpe,
    train_sentencepiece,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Grüße aus Köln! Ça va? 日本語のテキスト, emoji 🙂 and tabs\tand  spaces.\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
    "The quick brown fox jumps over the lazy dog. 0123456789\n",
] * 20
SAMPLES = ["hello world", "  leading spaces", "ünïcödé ▁ 🙂 \x00 \r\n", "<|endoftext|> <pad> <mask>", ""]
ROUND_TRIP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def bpe():
    return train_bpe(CORPUS, vocab_size=300)


@functools.cache
def sentencepiece(model_type: str = "bpe"):
    return train_sentencepiece(CORPUS, vocab_size=400, model_type=model_type)


@functools.cache
def tiktoken_file(directory: str) -> str:
    """A tiny .tiktoken vocabulary: every single byte plus a few merges."""
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld"]
    path = f"{directory}/tiny.tiktoken"
    with open(path, "wb") as out:
        out.writelines(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens))
    return path


@pytest.fixture(scope="module")
def tiny_tiktoken(tmp_path_factory):
    return load_tokenizer(tiktoken_file(str(tmp_path_factory.mktemp("tiktoken"))))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# ---- exact round-trips -----------------------------------------------------------------------
CHAR = CharTokenizer.from_texts(CORPUS)


@ROUND_TRIP
@given(st.text(alphabet=st.sampled_from(CHAR.chars)))
def test_char_round_trips_on_its_alphabet(text):
    assert CHAR.decode(CHAR.encode(text)) == text


def test_char_ids_are_stable_and_unknown_chars_map_to_unk():
    again = CharTokenizer.from_texts(reversed(CORPUS))
    assert again.chars == CHAR.chars and again.encode("add") == CHAR.encode("add")
    ids = CHAR.encode("a\u00a7b")  # § is not in the corpus
    assert ids[1] == CHAR.unk_id and CHAR.decode(ids) == "a\ufffdb"


@ROUND_TRIP
@given(st.text())
def test_bpe_round_trips_any_unicode(text):
    assert bpe().decode(bpe().encode(text)) == text


@ROUND_TRIP
@given(st.text(), st.sampled_from(["bpe", "unigram"]))
def test_sentencepiece_byte_fallback_round_trips_any_unicode(text, model_type):
    tok = sentencepiece(model_type)
    assert tok.decode(tok.encode(text)) == text


@ROUND_TRIP
@given(st.text())
def test_tiktoken_local_file_round_trips_any_unicode(tiny_tiktoken, text):
    assert tiny_tiktoken.decode(tiny_tiktoken.encode(text)) == text


def test_tiktoken_local_file_uses_its_merges_and_cl100k_specials(tiny_tiktoken):
    assert tiny_tiktoken.encode("hello") == [259]  # the merged "hello" token
    assert tiny_tiktoken.eos_id == 264  # <|endoftext|> right after the last rank
    assert {tiny_tiktoken.pad_id, tiny_tiktoken.mask_id} == {269, 270}
    assert tiny_tiktoken.vocab_size == 271


# ---- behaviour shared by every kind ----------------------------------------------------------
def all_kinds(tmp_path):
    return {
        "char": CHAR,
        "bpe": bpe(),
        "sentencepiece": sentencepiece("bpe"),
        "tiktoken": load_tokenizer(tiktoken_file(str(tmp_path))),
    }


@pytest.mark.parametrize("kind", ["char", "bpe", "sentencepiece", "tiktoken"])
def test_save_and_load_give_identical_ids(tmp_path, kind):
    tok = all_kinds(tmp_path)[kind]
    reloaded = load_tokenizer(tok.save(tmp_path / "saved"))
    assert type(reloaded) is type(tok)
    assert [reloaded.encode(s) for s in SAMPLES + CORPUS[:4]] == [tok.encode(s) for s in SAMPLES + CORPUS[:4]]
    assert reloaded.fingerprint == tok.fingerprint
    assert (reloaded.vocab_size, reloaded.eos_id, reloaded.pad_id, reloaded.bos_id, reloaded.mask_id) == (
        tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id, tok.mask_id,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece", "tiktoken"])
def test_special_token_text_stays_plain_text_and_decode_drops_specials(tmp_path, kind):
    tok = all_kinds(tmp_path)[kind]
    ids = tok.encode("<|endoftext|>")
    assert tok.eos_id not in ids and tok.decode(ids) == "<|endoftext|>"
    text = "hello world"
    assert tok.decode([tok.eos_id, *tok.encode(text), tok.pad_id]) == text
    assert tok.decode(np.array(tok.encode(text))) == tok.decode(torch.tensor(tok.encode(text))) == text


@pytest.mark.parametrize("kind", ["char", "bpe", "sentencepiece", "tiktoken"])
def test_ids_fit_the_vocabulary_and_specials_are_distinct(tmp_path, kind):
    tok = all_kinds(tmp_path)[kind]
    ids = [i for batch in tok.encode_batch(SAMPLES + CORPUS[:4]) for i in batch]
    assert 0 <= min(ids) and max(ids) < tok.vocab_size
    assert tok.mask_id is not None and tok.mask_id != tok.pad_id != tok.eos_id


def test_fingerprint_changes_with_the_vocabulary():
    assert bpe().fingerprint != train_bpe(CORPUS, vocab_size=290).fingerprint


def test_get_tokenizer_loads_tokenizer_json_and_model_files(tmp_path):
    saved = tmp_path / "saved"
    bpe().save(saved)
    sentencepiece().save(saved / "sp")
    from_json = get_tokenizer(str(saved / "tokenizer.json"))
    from_model = get_tokenizer(str(saved / "sp" / "tokenizer.model"))
    assert from_json.encode("hello world") == bpe().encode("hello world")
    assert from_model.encode("hello world") == sentencepiece().encode("hello world")


def test_get_tokenizer_trains_each_kind():
    for spec in ("char", "bpe", "sentencepiece", "sentencepiece-unigram"):
        tok = get_tokenizer(spec, CORPUS, vocab_size=400)
        assert tok.decode(tok.encode(CORPUS[1])) == CORPUS[1]


# ---- clear errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tokenizer.json", "spm.model", "vocab.tiktoken"])
def test_missing_tokenizer_files_raise_one_clear_error(tmp_path, name):
    with pytest.raises(TokenizerError, match=f"tokenizer file not found: .*{name}"):
        get_tokenizer(str(tmp_path / name))


def test_uncached_cl100k_base_raises_without_network(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    message = (
        "cl100k_base encoding is not cached locally; download cl100k_base.tiktoken elsewhere "
        "and pass --tokenizer path/to/cl100k_base.tiktoken"
    )
    with pytest.raises(TokenizerError) as error:
        get_tokenizer("cl100k_base")
    assert str(error.value) == message
    with pytest.raises(TokenizerError, match="gpt2 encoding is not cached locally"):
        get_tokenizer("gpt2")


def test_corrupt_tiktoken_cache_entry_is_not_trusted(tmp_path, monkeypatch, no_network):
    import hashlib

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"truncated download")
    with pytest.raises(TokenizerError, match="not cached locally"):
        get_tokenizer("cl100k_base")


def test_bad_tiktoken_files_name_the_problem(tmp_path):
    partial = tmp_path / "partial.tiktoken"
    partial.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(200)))
    with pytest.raises(TokenizerError, match="lacks 56 single-byte tokens"):
        get_tokenizer(str(partial))
    garbled = tmp_path / "garbled.tiktoken"
    garbled.write_bytes(b"aGk= 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match="garbled.tiktoken:2"):
        get_tokenizer(str(garbled))


def test_unknown_specs_and_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="did you mean 'bpe'"):
        get_tokenizer("bpee")
    with pytest.raises(TokenizerError, match="pass corpus_texts"):
        get_tokenizer("bpe")
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(TokenizerError, match="no tokenizer_meta.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(TokenizerError, match="model_type"):
        train_sentencepiece(CORPUS, 300, model_type="word")
    with pytest.raises(TokenizerError, match="vocab_size 300 is too small for this corpus; .* at least 3"):
        train_sentencepiece(CORPUS, 300)
