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
