"""Built-in tasks: deterministic, right answers, graded correctly, usable as a training data source."""
from __future__ import annotations

import ast
import json
import re

import pytest
import torch

from neoformer.cli import main
from neoformer.data.sources import DataError, load_documents
from neoformer.eval.builtin import GENERATORS, KV_DISTANCES, examples, grade, score_task
from neoformer.model import build_model
from neoformer.presets import PRESETS
from neoformer.tokenizer import CharTokenizer


def test_examples_are_deterministic_and_splits_differ():
    for name in GENERATORS:
        assert examples(name, 20) == examples(name, 20)
        assert examples(name, 20, "train") != examples(name, 20, "test") or name == "python"
    assert load_documents("task:addition", "train").documents == load_documents("task:addition", "train").documents


def _bracket_reference(s: str) -> bool:
    while any(p in s for p in ("()", "[]", "{}")):
        s = s.replace("()", "").replace("[]", "").replace("{}", "")
    return s == ""


def test_answers_are_right():
    for e in examples("addition", 50):
        a, b = map(int, re.match(r"add (\d+)\+(\d+) -> ", e.prompt).groups())
        assert int(e.answer) == a + b
    for name, fn in (("copy", lambda s: s), ("reverse", lambda s: s[::-1]), ("sort", lambda s: "".join(sorted(s)))):
        for e in examples(name, 20):
            assert e.answer == fn(e.prompt.split()[1])
    answers = set()
    for e in examples("brackets", 100):
        answers.add(e.answer)
        assert e.answer == ("yes" if _bracket_reference(e.prompt.split()[1]) else "no")
    assert answers == {"yes", "no"}
    seen = set()
    for e in examples("kv_recall", 60):
        pairs, key = re.match(r"recall (.*) ; (\w)\? -> ", e.prompt).groups()
        table = dict(p.split("=") for p in pairs.split())
        assert table[key] == e.answer and len(table) == int(e.group[1:]) + 1
        seen.add(int(e.group[1:]))
    assert seen == set(KV_DISTANCES)
    for e in examples("python", 20):
        ast.parse(e.prompt + e.answer)


def test_grading():
    e = examples("addition", 1)[0]
    assert grade("addition", e, e.answer + "\nadd 1+1 -> 2") == 1.0
    assert grade("addition", e, e.answer + "1") == 0.0
    p = examples("python", 1)[0]
    assert grade("python", p, p.answer + "    return (") == 1.0  # a cut-off last line is ignored
    assert grade("python", p, "    return (\n") == 0.0
    assert grade("python", p, "") == 0.0


def test_score_task_grades_the_models_own_greedy_answers():
    torch.manual_seed(0)
    tok = CharTokenizer.from_texts(["".join(load_documents("task:all", "train").documents[:8])])
    model = build_model(PRESETS["nexus-debug"].replace(vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    from neoformer.generate import generate

    for name in ("addition", "kv_recall", "python"):
        got = score_task(model, tok, name, n=6, batch_size=4)
        want = []
        for e in examples(name, 6):
            out = generate(model, tok.encode(e.prompt), 48 if name == "python" else 8, tokenizer=tok,
                           eos_token_id=tok.eos_id, return_dict=True)
            want.append(grade(name, e, tok.decode([t for t in out.new_tokens[0] if t != tok.eos_id])))
        key = "parse_rate" if name == "python" else "exact_match"
        assert got[key] == pytest.approx(sum(want) / 6)
    assert set(score_task(model, tok, "kv_recall", n=6)) >= {f"exact_match@d{d}" for d in KV_DISTANCES}


def test_task_data_source_and_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="unknown built-in task 'addtion'.*addition"):
        load_documents("task:addtion")
    run = tmp_path / "run"
    assert main(["train", "--preset", "nexus-debug", "--data", "task:addition+copy", "--tokenizer", "char",
                 "--out", str(run), "--max-steps", "2", "--batch", "2", "--seq", "32", "--no-progress",
                 "--threads", "1", "--train.plot", "false", "--train.eval_batches", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--tasks", "builtin:addition,builtin:copy", "--limit", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(record["tasks"]) == {"builtin:addition", "builtin:copy"}
    assert main(["eval", str(run), "--tasks", "builtin:nope"]) == 2
    assert "unknown built-in task 'nope'" in capsys.readouterr().err
