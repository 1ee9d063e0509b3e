"""Every train run writes TensorBoard event files (tensorboard installed: the `tensorboard` extra),
read back here with tensorboard's own reader and compared with metrics.jsonl."""
from __future__ import annotations

import json

import pytest

from neoformer.cli import main

pytest.importorskip("tensorboard")


def test_train_run_writes_tensorboard_events_that_match_metrics(tmp_path, monkeypatch, word_corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))
    corpus = word_corpus(tmp_path / "corpus", docs=3, lines=40, words_per_line=6)
    run = tmp_path / "run"
    assert main(["train", "--preset", "nexus-debug", "--data", str(corpus), "--tokenizer", "char", "--out", str(run),
                 "--max-steps", "4", "--batch", "2", "--seq", "16", "--eval-every", "2", "--no-progress",
                 "--threads", "1", "--train.log_every", "1", "--train.eval_batches", "1", "--train.plot", "false"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "val_loss", "lr"} <= tags
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "val_loss"):
        want = [(r["step"], r[tag]) for r in records if tag in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
