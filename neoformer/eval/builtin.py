"""Built-in offline tasks: small, generated deterministically, usable to train and to score.

Every task writes examples as one line of text, ``PROMPT ANSWER\\n``:

    copy      ``copy 4719 -> 4719``           reverse   ``reverse 4719 -> 9174``
    sort      ``sort 4719 -> 1479``           addition  ``add 123+456 -> 579``
    brackets  ``brackets ([]{}) -> yes``      kv_recall ``recall a=3 q=7 ... z=1 ; a? -> 3``
    python    a Python snippet (the scoring prompt is its first line; the rate of completions that parse)

``kv_recall`` asks for a key written ``distance`` pairs before the question, for growing distances
(long context, RoPE scaling and the RMC memory); its score has one accuracy per distance.

Training: ``--data task:addition`` (or ``task:all``) is a data source (neoformer.data.sources):
deterministic documents of many example lines, train/val/test each from its own seed.
Scoring: ``neoformer eval CKPT --tasks builtin:addition`` generates greedily after each test
prompt, stops at the newline, and counts exact matches (``python``: completions that parse).
"""
from __future__ import annotations

import ast
import random
import zlib
from dataclasses import dataclass
from typing import Callable

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
KV_DISTANCES = (1, 4, 16)
DOCUMENTS = {"train": 400, "val": 20}  # documents per split of a task data source
LINES_PER_DOCUMENT = 16


@dataclass(frozen=True)
class Example:
    prompt: str  # ends right before the answer
    answer: str  # without the newline
    group: str = ""  # kv_recall: the distance

    @property
    def line(self) -> str:
        return f"{self.prompt}{self.answer}\n"


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def _copy(rng):
    s = _digits(rng, 3, 8)
    return Example(f"copy {s} -> ", s)


def _reverse(rng):
    s = _digits(rng, 3, 8)
    return Example(f"reverse {s} -> ", s[::-1])


def _sort(rng):
    s = _digits(rng, 3, 8)
    return Example(f"sort {s} -> ", "".join(sorted(s)))


def _addition(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return Example(f"add {a}+{b} -> ", str(a + b))


def _balanced(s: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in s:
        if ch in "([{":
            stack.append(ch)
        elif not stack or stack.pop() != pairs[ch]:
            return False
    return not stack


def _brackets(rng):
    if rng.random() < 0.5:  # a balanced string, built by nesting and concatenation
        s = ""
        while len(s) < rng.randint(2, 10):
            o, c = rng.choice(("()", "[]", "{}"))
            s = o + s + c if rng.random() < 0.5 else s + o + c
    else:
        s = "".join(rng.choice("()[]{}") for _ in range(rng.randrange(2, 11, 2)))
    return Example(f"brackets {s} -> ", "yes" if _balanced(s) else "no")


def _kv_recall(rng):
    distance = rng.choice(KV_DISTANCES)
    keys = rng.sample("abcdefghijklmnopqrstuvwxyz", distance + 1)
    values = [rng.choice("0123456789") for _ in keys]
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))  # the asked key comes `distance` pairs back
    return Example(f"recall {pairs} ; {keys[0]}? -> ", values[0], group=f"d{distance}")


_NAMES = ("x", "y", "n", "total", "value", "items", "count", "result")


def _python(rng):
    """A small valid function; the scoring prompt is its header, the answer the body."""
    name, a, b = rng.choice(("add", "scale", "pick", "clamp", "step")), *rng.sample(_NAMES, 2)
    body = rng.choice((
        f"    return {a} + {b}\n",
        f"    if {a} > {b}:\n        return {a}\n    return {b}\n",
        f"    {a} = {a} * 2\n    return {a} - {b}\n",
        f"    for i in range({b}):\n        {a} += i\n    return {a}\n",
        f"    return [{a} for _ in range({b})]\n",
    ))
    return Example(f"def {name}({a}, {b}):\n", body)


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "copy": _copy, "reverse": _reverse, "sort": _sort, "addition": _addition, "brackets": _brackets,
    "kv_recall": _kv_recall, "python": _python,
}


def _check(name: str) -> None:
    if name not in GENERATORS:
        from ..config import did_you_mean

        raise ValueError(f"unknown built-in task {name!r}{did_you_mean(name, list(GENERATORS))}; "
                         f"choose from {', '.join(GENERATORS)} or all")


def expand_names(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for n in (GENERATORS if name == "all" else [name]):
            _check(n)
            if n not in out:
                out.append(n)
    return out


def examples(name: str, n: int, split: str = "test") -> list[Example]:
    """``n`` examples of a task, the same every time (seeded by the task name and the split)."""
    _check(name)
    rng = random.Random(zlib.crc32(name.encode()) * 10 + SPLIT_SEEDS[split])
    return [GENERATORS[name](rng) for _ in range(n)]


# ---- training data ---------------------------------------------------------------------------
def task_documents(spec: str, split: str) -> list[str]:
    """Documents of ``spec`` (a task name, ``a+b`` for several, or ``all``) for one split."""
    names = expand_names(spec.split("+"))
    count = DOCUMENTS.get(split, DOCUMENTS["train"])
    rows = {name: examples(name, count * LINES_PER_DOCUMENT, split) for name in names}
    docs = []
    for d in range(count):
        lines = [rows[names[(d + i) % len(names)]][d * LINES_PER_DOCUMENT + i].line for i in range(LINES_PER_DOCUMENT)]
        docs.append("".join(lines))
    return docs


def task_corpus(spec: str, split: str = "train", val_fraction: float | None = None, **_ignored):
    """The ``task:SPEC`` data source (neoformer.data.sources): ``all`` splits = train + val."""
    from ..data.sources import Corpus

    docs = task_documents(spec, "train") + task_documents(spec, "val") if split == "all" else task_documents(spec, split)
    return Corpus(f"task:{spec}", split, docs, identity=f"task:{spec}:v1:{split}")


# ---- scoring ---------------------------------------------------------------------------------
def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def grade(name: str, example: Example, completion: str) -> float:
    """1.0 when ``completion`` (generated after ``example.prompt``) is right, else 0.0."""
    if name == "python":  # whole lines only: a cut-off last line is the token budget's fault, not the model's
        body = completion[:completion.rfind("\n") + 1]
        return float(bool(body.strip()) and _parses(example.prompt + body))
    return float(completion.split("\n")[0].strip() == example.answer)


def score_task(model, tokenizer, name: str, *, n: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """Greedy completions of ``n`` (default 64) test prompts -> ``{"exact_match": ...}`` (kv_recall:
    also ``exact_match@dN`` per distance; python: ``parse_rate``)."""
    from ..generate import generate

    n = n or 64
    items = examples(name, n, "test")
    hits: list[float] = []
    for start in range(0, n, batch_size):
        batch = items[start:start + batch_size]
        prompts = [tokenizer.encode(e.prompt) for e in batch]
        longest = max(len(tokenizer.encode(e.answer)) for e in batch)
        out = generate(model, prompts, (48 if name == "python" else longest + 2), tokenizer=tokenizer,
                       stop=() if name == "python" else ("\n",), eos_token_id=tokenizer.eos_id, return_dict=True)
        for e, toks in zip(batch, out.new_tokens):
            hits.append(grade(name, e, tokenizer.decode([t for t in toks if t != tokenizer.eos_id])))
    result = {("parse_rate" if name == "python" else "exact_match"): sum(hits) / len(hits)}
    groups = sorted({e.group for e in items if e.group}, key=lambda g: int(g[1:]))
    for g in groups:
        mine = [h for h, e in zip(hits, items) if e.group == g]
        result[f"exact_match@{g}"] = sum(mine) / len(mine)
    return result


__all__ = ["Example", "GENERATORS", "examples", "expand_names", "grade", "score_task", "task_corpus", "task_documents"]
