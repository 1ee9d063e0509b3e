"""Data: sources (stdlib corpus, files, HF datasets), token cache, samplers, MLM, seq2seq, batching.

The usual path for a causal LM::

    data = prepare_data("stdlib", tokenizer="bpe", vocab_size=8192)    # cached after the first run
    sampler = make_sampler(CausalWindows(data.train, seq_len), batch_size, "shuffle", seed)
    x, y = next(sampler)                                                # (B, T) int64
    state = sampler.state_dict()                                        # resume: load_state_dict(state)
"""
from .batching import (
    IGNORE_INDEX, BucketSampler, EpochSampler, bucket_batches, pad_batch, pad_sequences, padding_ratio,
    token_budget_batches,
)  # fmt: skip
from .encoder import MLMMasker, PackedBatch, document_chunks, pack_sequences, packed_batches
from .pipelines import (
    PreparedData, TokenizedCorpus, default_cache_dir, prepare_data, prepare_tokenizer, tokenize_corpus,
)  # fmt: skip
from .sampling import CausalWindows, RandomWindowSampler, ShuffledWindowSampler, make_sampler, sequential_batches
from .seq2seq import Seq2SeqBatch, Seq2SeqDataset, load_pairs
from .sources import Corpus, DataError, SkipReport, load_documents, stdlib_corpus, stdlib_files

__all__ = [
    "IGNORE_INDEX", "BucketSampler", "CausalWindows", "Corpus", "DataError", "EpochSampler", "MLMMasker",
    "PackedBatch", "PreparedData", "RandomWindowSampler", "Seq2SeqBatch", "Seq2SeqDataset", "ShuffledWindowSampler",
    "SkipReport", "TokenizedCorpus", "bucket_batches", "default_cache_dir", "document_chunks", "load_documents",
    "load_pairs", "make_sampler", "pack_sequences", "packed_batches", "pad_batch", "pad_sequences", "padding_ratio",
    "prepare_data", "prepare_tokenizer", "sequential_batches", "stdlib_corpus", "stdlib_files", "tokenize_corpus",
    "token_budget_batches",
]  # fmt: skip
