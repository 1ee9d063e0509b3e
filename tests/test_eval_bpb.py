"""Perplexity and bits per byte with a sliding window, against a direct float64 computation."""
from __future__ import annotations

import json
import math

import pytest
import torch

from neoformer.checkpoint import save_checkpoint
from neoformer.cli import main
from neoformer.eval.perplexity import score_text
from neoformer.model import build_model
from neoformer.presets import PRESETS
from neoformer.tokenizer import train_bpe

TEXT = "héllo wörld: the cat sat on the mat, and the dog ran to the park. " * 6


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = train_bpe([TEXT], vocab_size=300)
    return build_model(PRESETS["nexus-debug"].replace(vocab_size=tok.vocab_size, max_seq_len=32)).eval(), tok


def direct_nll(model, ids: list[int], prefix: int, window: int, stride: int) -> float:
    """float64, one window at a time: token i is predicted from at most `window` tokens before it,
    scored in the chunk of `stride` new tokens that contains it."""
    model = model.double()
    seq = [prefix] + ids
    total = 0.0
    with torch.no_grad():
        for a in range(1, len(seq), stride):
            b = min(a + stride, len(seq))
            lo = max(0, b - 1 - window)
            logits = model(torch.tensor([seq[lo:b - 1]]))[0][0].double()
            logp = torch.log_softmax(logits, -1)[-(b - a):]
            total -= float(logp.gather(1, torch.tensor(seq[a:b])[:, None]).sum())
    model.float()
    return total


@pytest.mark.parametrize("stride", [None, 8, 1])
def test_bits_per_byte_equals_a_direct_float64_computation(tiny, stride):
    model, tok = tiny
    docs = [TEXT, TEXT[:50]]
    score = score_text(model, tok, docs, stride=stride, batch_size=3)
    want = sum(direct_nll(model, tok.encode(d), tok.eos_id, 32, stride or 32) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert n_bytes > sum(len(d) for d in docs)  # non-ASCII: bytes, not characters
    assert score.nll == pytest.approx(want, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(want / math.log(2) / n_bytes, rel=1e-5)
    assert score.tokens == sum(len(tok.encode(d)) for d in docs) and score.bytes == n_bytes
    assert score.perplexity == pytest.approx(math.exp(want / score.tokens), rel=1e-5)


def test_sliding_window_gives_more_context(tiny):
    """A smaller stride scores each token with more context: different (not equal) numbers."""
    model, tok = tiny
    a, b = (score_text(model, tok, [TEXT], stride=s).nll for s in (32, 4))
    assert a != pytest.approx(b, rel=1e-6)


def test_eval_bpb_cli(tiny, tmp_path, capsys):
    model, tok = tiny
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 3, model, tokenizer=tok, config={"model": model.config.to_dict()})
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["eval", str(run), "--bpb", "--data", str(text), "--stride", "16", "--json", "--threads", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = score_text(model, tok, [TEXT], stride=16)
    assert record["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6) and record["stride"] == 16
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["eval/text/bits_per_byte"] == pytest.approx(record["bits_per_byte"])
    assert main(["eval", str(run), "--bpb", "--data", str(text), "--stride", "99"]) == 2
    assert "stride (99)" in capsys.readouterr().err
    assert main(["eval", str(run), "--bpb"]) == 2
    assert "--bpb needs --data" in capsys.readouterr().err
