"""Data pipeline: sources and splits, skip reports, token cache, samplers, MLM, seq2seq, batching."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from neoformer.data import (
    IGNORE_INDEX, BucketSampler, CausalWindows, DataError, MLMMasker, RandomWindowSampler, Seq2SeqDataset,
    ShuffledWindowSampler, bucket_batches, document_chunks, load_documents, load_pairs, make_sampler,
    pack_sequences, packed_batches, padding_ratio, prepare_data, prepare_tokenizer, sequential_batches,
    stdlib_files, token_budget_batches, tokenize_corpus,
)  # fmt: skip
from neoformer.data.sources import assign_splits, stdlib_root
from neoformer.tokenizer import CharTokenizer, Tokenizer

ALPHABET_TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?()[]{}=+-*/_'\"#\n\t0123456789"
CHAR = CharTokenizer.from_texts([ALPHABET_TEXT])


class CountingTokenizer(Tokenizer):
    """Wraps a tokenizer and counts encode calls, to prove the cache skips tokenization."""

    def __init__(self, inner: Tokenizer):
        self.inner, self.calls = inner, 0
        for name in ("kind", "vocab_size", "eos_id", "pad_id", "bos_id", "mask_id", "unk_id"):
            setattr(self, name, getattr(inner, name))

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)

    def _decode_ids(self, ids):
        return self.inner._decode_ids(ids)

    def _save_files(self, directory):
        return self.inner._save_files(directory)

    def _identity_bytes(self):
        return self.inner._identity_bytes()


def write_files(root, count, words=30):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        text = f"document {i}: " + " ".join(f"word{i * j % 97}" for j in range(words))
        (root / f"doc_{i:03d}.txt").write_text(text)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- sources and splits ----------------------------------------------------------------------
def test_stdlib_listing_is_deterministic_without_tests_or_site_packages():
    files = stdlib_files()
    assert files == stdlib_files() and len(files) > 300
    relative = [f.relative_to(stdlib_root()).as_posix() for f in files]
    assert relative == sorted(relative) and "os.py" in relative
    assert not any(part in ("test", "tests", "site-packages") for r in relative for part in r.split("/")[:-1])
    splits = assign_splits(relative)
    assert splits == assign_splits(relative)
    assert 0.005 < splits.count("val") / len(splits) < 0.05


def test_stdlib_corpus_val_split_is_small_and_disjoint_from_train():
    val = load_documents("stdlib", "val")
    assert 0 < len(val.documents) < 40 and val.identity == load_documents("stdlib", "val").identity
    assert val.identity != load_documents("stdlib", "train").identity


def test_directory_split_is_by_file_deterministic_and_complete(tmp_path):
    root = write_files(tmp_path / "docs", 60)
    train, val = (load_documents(str(root), split, val_fraction=0.1) for split in ("train", "val"))
    assert train.documents == load_documents(str(root), "train", val_fraction=0.1).documents
    assert len(val.documents) >= 1 and not set(train.documents) & set(val.documents)
    assert sorted(train.documents + val.documents) == sorted(load_documents(str(root), "all").documents)


def test_a_single_file_is_split_inside_at_a_line_break(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("".join(f"line {i}\n" for i in range(200)))
    train, val = load_documents(str(path), "train"), load_documents(str(path), "val")
    assert train.documents[0] + val.documents[0] == path.read_text() and val.documents[0].startswith("line")


def test_glob_and_jsonl_sources(tmp_path):
    write_files(tmp_path / "a", 3)
    write_files(tmp_path / "b" / "c", 2)
    assert len(load_documents(str(tmp_path / "**" / "*.txt"), "all").documents) == 5
    records = tmp_path / "data.jsonl"
    records.write_text("\n".join(json.dumps({"body": f"record {i}", "id": i}) for i in range(20)) + "\n")
    docs = load_documents(str(records), "all", text_field="body").documents
    assert docs == [f"record {i}" for i in range(20)]
    with pytest.raises(DataError, match=r"data.jsonl:1: no 'text' field \(has: body, id\)"):
        load_documents(str(records))


def test_bad_files_are_skipped_and_reported(tmp_path):
    root = write_files(tmp_path / "mixed", 3)
    (root / "empty.txt").write_text("")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    corpus = load_documents(str(root), "all")
    assert len(corpus.documents) == 3
    assert corpus.skipped.counts == {"empty": 1, "binary": 1, "not_utf8": 1}
    assert corpus.skipped.examples["binary"] == ["image.bin"] and "latin1.txt" in str(corpus.skipped)


def test_nothing_usable_is_one_clear_error_naming_the_path(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "empty.txt").write_text("   \n")
    (root / "blob.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=f"no usable text in {root}: skipped 2"):
        load_documents(str(root))
    with pytest.raises(DataError, match="data source not found: .*missing"):
        load_documents(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no files match"):
        load_documents(str(tmp_path / "*.nothing"))
    with pytest.raises(DataError, match="split must be one of"):
        load_documents("stdlib", "validation")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "", "third doc"]}), tmp_path / "part.parquet")
    corpus = load_documents(str(tmp_path / "part.parquet"), "all")
    assert corpus.documents == ["first doc", "third doc"] and corpus.skipped.counts["empty"] == 1


def test_hf_source_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="Hugging Face dataset path not found: /no/such/dataset"):
        load_documents("hf:/no/such/dataset")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"needs the datasets package: pip install 'neoformer\[datasets\]'"):
        load_documents(f"hf:{write_files(tmp_path / 'hf', 2)}")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets not installed")
def test_hf_source_reads_a_local_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "hfdata"
    root.mkdir()
    (root / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(50)))
    train = load_documents(f"hf:{root}", "train")
    val = load_documents(f"hf:{root}", "val")
    train_docs, val_docs = list(train.documents), list(val.documents)
    assert train_docs == list(train.documents)  # streams restart on every pass
    assert sorted(train_docs + val_docs) == sorted(f"row {i}" for i in range(50)) and val_docs


# ---- token cache -----------------------------------------------------------------------------
def test_token_cache_hits_on_the_second_call_without_tokenizing(tmp_path, cache):
    corpus = load_documents(str(write_files(tmp_path / "docs", 5)), "all")
    first_tok, second_tok = CountingTokenizer(CHAR), CountingTokenizer(CHAR)
    first = tokenize_corpus(corpus, first_tok)
    second = tokenize_corpus(load_documents(str(tmp_path / "docs"), "all"), second_tok)
    assert first_tok.calls == 5 and second_tok.calls == 0
    assert isinstance(second.tokens, np.memmap) and second.tokens.dtype == np.uint16
    assert np.array_equal(first.tokens, second.tokens) and np.array_equal(first.doc_offsets, second.doc_offsets)
    assert second.path.parent.parent == cache and not list(cache.rglob("*.tmp"))
    # every document is followed by EOS, and decodes back to its text
    assert [CHAR.decode(d) for d in second.documents()] == corpus.documents
    assert all(second.document(i, with_eos=True)[-1] == CHAR.eos_id for i in range(len(second)))


def test_token_cache_misses_when_a_file_or_the_tokenizer_changes(tmp_path, cache):
    root = write_files(tmp_path / "docs", 3)
    tokenize_corpus(load_documents(str(root), "all"), CHAR)
    (root / "doc_000.txt").write_text("changed text")
    counting = CountingTokenizer(CHAR)
    changed = tokenize_corpus(load_documents(str(root), "all"), counting)
    assert counting.calls == 3 and CHAR.decode(changed.document(0)) == "changed text"
    other = CountingTokenizer(CharTokenizer.from_texts([ALPHABET_TEXT + "~"]))
    tokenize_corpus(load_documents(str(root), "all"), other)
    assert other.calls == 3


def test_prepare_data_trains_the_tokenizer_once_and_reuses_it(tmp_path, cache, monkeypatch):
    root = write_files(tmp_path / "docs", 20, words=60)
    first = prepare_data(str(root), tokenizer="bpe", vocab_size=300)
    import neoformer.data.pipelines as pipelines

    monkeypatch.setattr(pipelines, "get_tokenizer", lambda *a, **k: pytest.fail("tokenizer trained twice"))
    second = prepare_data(str(root), tokenizer="bpe", vocab_size=300)
    assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert np.array_equal(first.train.tokens, second.train.tokens) and second.val.num_tokens > 0
    assert prepare_tokenizer(CHAR, first.train_corpus) is CHAR


# ---- causal windows and samplers -------------------------------------------------------------
def windows(num_tokens=1001, seq_len=10):
    return CausalWindows(np.arange(num_tokens, dtype=np.uint16), seq_len)


def test_causal_windows_shift_targets_by_one_and_pack_documents(tmp_path, cache):
    x, y = windows().batch(np.array([0, 37]))
    assert x.dtype == y.dtype == torch.int64 and x.shape == (2, 10)
    assert torch.equal(y, x + 1) and x[1, 0] == 37
    corpus = tokenize_corpus(load_documents(str(write_files(tmp_path / "d", 2, words=3)), "all"), CHAR)
    x, _ = CausalWindows(corpus, seq_len=corpus.num_tokens - 1)[0]
    assert (x == CHAR.eos_id).sum() == 1  # the EOS between the two documents
    with pytest.raises(DataError, match="fewer than seq_len"):
        CausalWindows(np.arange(5), 8)


@pytest.mark.parametrize("mode", ["shuffle", "random"])
def test_samplers_resume_exactly_from_a_mid_epoch_state(mode):
    sampler = make_sampler(windows(), batch_size=8, mode=mode, seed=3)
    for _ in range(9):  # an epoch has 12 batches: this state is mid-epoch and the replay crosses it
        next(sampler)
    state = sampler.state_dict()
    expected = [next(sampler) for _ in range(7)]
    resumed = make_sampler(windows(), batch_size=8, mode=mode, seed=99)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is a small JSON-able dict
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(7))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(DataError, match="sampler state is for"):
        make_sampler(windows(), 8, "random" if mode == "shuffle" else "shuffle").load_state_dict(state)


def test_shuffled_epochs_differ_but_are_seeded():
    plan = ShuffledWindowSampler(windows(), 4, seed=1).plan
    assert not np.array_equal(plan(0), plan(1))
    assert np.array_equal(plan(0), ShuffledWindowSampler(windows(), 4, seed=1).plan(0))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_do_not_overlap_and_cover_every_window(world_size):
    win = windows(num_tokens=1601, seq_len=10)  # 160 windows at shift 0, 159 otherwise
    for epoch in range(3):
        ranks = [ShuffledWindowSampler(win, 4, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
        plans = [sampler.plan(epoch) for sampler in ranks]
        starts = np.concatenate([p.ravel() for p in plans])
        shift = int(starts.min() % 10)
        all_windows = set(shift + 10 * np.arange(win.num_windows(shift)))
        assert len(set(starts)) == len(starts) and set(starts) <= all_windows
        assert len(all_windows) - len(starts) < world_size * 4  # only the remainder is left out
        assert len({len(p) for p in plans}) == 1  # equal batch counts keep DDP ranks in step
    full = [ShuffledWindowSampler(windows(1601), 5, seed=0, rank=r, world_size=2).plan(0) for r in range(2)]
    if full[0].min() % 10 == 0:  # with shift 0, 160 windows split exactly into 2 x 16 x 5
        assert sorted(np.concatenate([p.ravel() for p in full])) == list(range(0, 1600, 10))


def test_bad_sampler_arguments_are_clear_errors():
    with pytest.raises(DataError, match="need 0 <= rank < world_size; got rank=2, world_size=2"):
        make_sampler(windows(), 4, rank=2, world_size=2)
    with pytest.raises(DataError, match="sampler mode must be one of shuffle, random"):
        make_sampler(windows(), 4, mode="nanogpt")
    with pytest.raises(DataError, match="no full batch per epoch"):
        next(make_sampler(windows(), batch_size=500))


def test_random_sampler_ranks_draw_different_windows():
    a, b = (RandomWindowSampler(windows(), 8, seed=0, rank=r, world_size=2).next_indices() for r in range(2))
    assert not np.array_equal(a, b) and a.max() <= 1001 - 11


def test_sequential_batches_cover_every_window_once_across_ranks():
    win = windows(num_tokens=251, seq_len=10)
    seen = [x[:, 0] for r in range(3) for x, _ in sequential_batches(win, 4, rank=r, world_size=3)]
    assert sorted(torch.cat(seen).tolist()) == list(range(0, 250, 10))
    assert len(list(sequential_batches(win, 4, max_batches=2))) == 2


# ---- MLM masking and packing -----------------------------------------------------------------
def test_mlm_masking_proportions_and_special_token_safety():
    special = [CHAR.pad_id, CHAR.eos_id, CHAR.bos_id, CHAR.mask_id, CHAR.unk_id]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CHAR.vocab_size, (200, 500), generator=generator)
    ids[:, -50:] = CHAR.pad_id
    masker = MLMMasker.from_tokenizer(CHAR, seed=1)
    inputs, labels = masker(ids)
    is_special = torch.isin(ids, torch.tensor(special))
    selected = labels != IGNORE_INDEX
    assert not (selected & is_special).any() and torch.equal(inputs[is_special], ids[is_special])
    assert torch.equal(labels[selected], ids[selected])
    assert abs(selected.sum() / (~is_special).sum() - 0.15) < 0.01
    masked, kept = inputs[selected] == CHAR.mask_id, inputs[selected] == ids[selected]
    randomized = ~masked & ~kept
    assert abs(masked.float().mean() - 0.8) < 0.02 and abs(randomized.float().mean() - 0.1) < 0.02
    assert not torch.isin(inputs[selected][randomized], torch.tensor(special)).any()
    assert torch.equal(inputs, MLMMasker.from_tokenizer(CHAR, seed=1)(ids)[0])  # seeded


def test_mlm_needs_a_mask_token():
    with pytest.raises(DataError, match="no mask token"):
        MLMMasker(vocab_size=10, mask_id=None, special_ids=[0])


def test_packed_batches_have_correct_cu_seqlens():
    batch = pack_sequences([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]])
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 3, 8, 10]
    assert batch.max_seqlen == 5 and batch.input_ids.shape == (1, 10) and batch.input_ids[0, 3] == 4
    seqs = [list(range(n)) for n in (5, 7, 3, 8, 2, 6)]
    packs = list(packed_batches(seqs, max_tokens=12))
    assert all(p.cu_seqlens[-1] == p.input_ids.shape[1] <= 12 for p in packs)
    assert torch.cat([p.input_ids[0] for p in packs]).tolist() == [t for s in seqs for t in s]
    with pytest.raises(DataError, match="exceeds max_tokens"):
        list(packed_batches([list(range(20))], max_tokens=12))


def test_document_chunks_split_long_documents(tmp_path, cache):
    corpus = tokenize_corpus(load_documents(str(write_files(tmp_path / "d", 2, words=10)), "all"), CHAR)
    chunks = document_chunks(corpus, max_len=16)
    assert max(map(len, chunks)) == 16 and sum(map(len, chunks)) == corpus.num_tokens - len(corpus)


# ---- seq2seq pairs ---------------------------------------------------------------------------
def test_seq2seq_batches_are_padded_with_bos_eos_handling(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("abc\tX\nhello world\tHELLO WORLD\n")
    pairs = load_pairs(tsv)
    assert pairs == [("abc", "X"), ("hello world", "HELLO WORLD")]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"source": s, "target": t}) for s, t in pairs))
    assert load_pairs(jsonl) == pairs
    batch = Seq2SeqDataset(pairs, CHAR).collate([0, 1])
    assert batch.src_ids.shape == batch.src_mask.shape == (2, 12)
    assert batch.src_ids[0].tolist() == [*CHAR.encode("abc"), CHAR.eos_id] + [CHAR.pad_id] * 8
    assert batch.src_mask[0].tolist() == [True] * 4 + [False] * 8
    assert batch.tgt_in[0].tolist() == [CHAR.bos_id, *CHAR.encode("X")] + [CHAR.pad_id] * 10
    assert batch.tgt_out[0].tolist() == [*CHAR.encode("X"), CHAR.eos_id] + [IGNORE_INDEX] * 10
    assert batch.tgt_out[1, -1] == CHAR.eos_id and torch.equal(batch.tgt_in[1, 1:], batch.tgt_out[1, :-1])


def test_seq2seq_pair_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ok\tfine\nno tab here\n")
    with pytest.raises(DataError, match="bad.tsv:2: expected 'source<TAB>target'"):
        load_pairs(bad)
    with pytest.raises(DataError, match="not found"):
        load_pairs(tmp_path / "absent.tsv")


# ---- length bucketing ------------------------------------------------------------------------
def test_bucketing_pads_less_than_random_batching_and_keeps_every_example():
    lengths = np.random.default_rng(0).integers(5, 200, size=2000)
    bucketed = bucket_batches(lengths, batch_size=16, seed=0)
    random_batches = np.array_split(np.random.default_rng(1).permutation(2000), 125)
    assert padding_ratio(bucketed, lengths) < padding_ratio(random_batches, lengths) / 3
    assert sorted(np.concatenate(bucketed).tolist()) == list(range(2000))
    budget = token_budget_batches(lengths, max_tokens=1024, seed=0)
    assert all(len(b) * lengths[b].max() <= 1024 for b in budget)
    assert sorted(np.concatenate(budget).tolist()) == list(range(2000))
    assert padding_ratio(budget, lengths) < padding_ratio(random_batches, lengths) / 3


def test_bucket_sampler_resumes_and_shards(tmp_path):
    lengths = np.random.default_rng(0).integers(5, 50, size=300)
    sampler = BucketSampler(lengths, batch_size=8, seed=2)
    for _ in range(30):
        sampler.next_indices()
    state, expected = sampler.state_dict(), [sampler.next_indices() for _ in range(20)]
    resumed = BucketSampler(lengths, batch_size=8, seed=2)
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, resumed.next_indices()) for a in expected)
    shards = [BucketSampler(lengths, max_tokens=128, rank=r, world_size=2).plan(0) for r in range(2)]
    first, second = (set(np.concatenate(s).tolist()) for s in shards)
    assert not first & second and len(shards[0]) == len(shards[1])
    with pytest.raises(DataError, match="exactly one of batch_size or max_tokens"):
        BucketSampler(lengths)


def test_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "env-cache"))
    corpus = load_documents(str(write_files(tmp_path / "docs", 2)), "all")
    assert tokenize_corpus(corpus, CHAR).path.is_relative_to(tmp_path / "env-cache")
    explicit = tokenize_corpus(corpus, CHAR, cache_dir=tmp_path / "arg-cache")
    assert explicit.path.is_relative_to(tmp_path / "arg-cache") and os.path.isdir(tmp_path / "arg-cache" / "tokens")
