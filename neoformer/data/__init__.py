"""Data: sources (stdlib corpus, files, HF datasets), token cache, samplers, MLM, seq2seq, batching."""
from .pipelines import PreparedData, TokenizedCorpus, default_cache_dir, prepare_data, prepare_tokenizer, tokenize_corpus
from .sources import Corpus, DataError, SkipReport, load_documents, stdlib_corpus

__all__ = [
    "Corpus", "DataError", "PreparedData", "SkipReport", "TokenizedCorpus", "default_cache_dir",
    "load_documents", "prepare_data", "prepare_tokenizer", "stdlib_corpus", "tokenize_corpus",
]  # fmt: skip
