import random
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are op-overhead bound and reproducible on one thread; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_word_corpus(directory: Path, docs: int, lines: int, words_per_line: int) -> Path:
    """A tiny deterministic text corpus: ``docs`` files of random lines from a 13-word vocabulary."""
    directory.mkdir()
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran past small red houses".split()
    for i in range(docs):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(words_per_line)) for _ in range(lines))
        (directory / f"doc{i}.txt").write_text(text)
    return directory


@pytest.fixture
def word_corpus():
    return write_word_corpus


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private tokenizer/data cache per test, and the thread count restored afterwards (CLI runs change it)."""
    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


FOX = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def fox_tokenizer():
    from neoformer.tokenizer import CharTokenizer

    return CharTokenizer.from_texts([FOX])


@pytest.fixture(scope="module")
def fox_model(fox_tokenizer):
    """A tiny random GQA decoder over the fox tokenizer's vocabulary (eval mode)."""
    from neoformer import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=fox_tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=48, max_seq_len=64, init_std=0.3)
    return build_model(cfg).eval()
