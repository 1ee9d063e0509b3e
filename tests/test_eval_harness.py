"""lm-eval through neoformer's LM adapter: scores equal a direct computation with the model, the
rolling log-likelihood equals the perplexity sum, generate_until honours stop sequences, a local
YAML task runs offline, and the numbers match lm-eval's own HF backend on the HF export."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import write_mc_task

pytest.importorskip("lm_eval")

from neoformer.checkpoint import save_checkpoint  # noqa: E402
from neoformer.cli import main  # noqa: E402
from neoformer.eval import continuation_logprobs, rolling_windows, window_logprobs  # noqa: E402
from neoformer.eval.generation import greedy_until, shared_prefix  # noqa: E402
from neoformer.eval.harness import NeoformerLM, run_tasks  # noqa: E402
from neoformer.generate import generate  # noqa: E402
from neoformer.generate.stops import cut_at_stop  # noqa: E402
from neoformer.model import build_model  # noqa: E402
from neoformer.presets import PRESETS  # noqa: E402
from neoformer.tokenizer import train_bpe  # noqa: E402

DATA = Path(__file__).parent / "data"
TEXT = ("The cat sat on the mat. The dog ran to the park. A bird sang in the tree. "
        "Two plus two is four. The sun is hot and the moon is cold. ") * 20


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _tiny(preset: str, seed: int):
    """A tiny decoder (random weights: equality tests, not quality) + a BPE trained on TEXT."""
    torch.manual_seed(seed)
    tok = train_bpe([TEXT], vocab_size=300)
    return build_model(PRESETS[preset].replace(vocab_size=tok.vocab_size, max_seq_len=48)).eval(), tok


@pytest.fixture(scope="module")
def tiny():
    return _tiny("nexus-debug", 0)  # Llama-shaped with GQA: exports to HF


@pytest.fixture(scope="module")
def tiny_rmc():
    return _tiny("neoformer-x-debug", 1)  # RMC + NSB: model-owned state travels with the cache


def direct_logprob(model, context, continuation):
    """float64, one sequence, no batching, no cache: the reference."""
    model64 = model.double()
    try:
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model64(ids)[0][0, :-1].double(), -1)
        n = len(continuation)
        picked = logp[-n:].gather(1, torch.tensor(continuation)[:, None])
        greedy = bool((logp[-n:].argmax(-1) == torch.tensor(continuation)).all())
        return float(picked.sum()), greedy
    finally:
        model.float()


@pytest.mark.parametrize("which", ["tiny", "tiny_rmc"])
def test_continuation_logprobs_equal_a_direct_computation(which, request):
    model, tok = request.getfixturevalue(which)
    contexts = [tok.encode("The cat sat on"), tok.encode("Two plus two is"), tok.encode("A")]
    endings = [" the mat.", " the tree.", " four.", " five and more"]
    pairs = [(c, tok.encode(e)) for c in contexts for e in endings]  # shared contexts: the prefix path
    pairs.append((tok.encode("The sun"), tok.encode(" is hot")))  # a lone request
    got = continuation_logprobs(model, pairs, batch_size=5, pad_id=tok.pad_id)
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        want, want_greedy = direct_logprob(model, ctx, cont)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    # batch size and grouping never change a score
    one_by_one = continuation_logprobs(model, pairs, batch_size=1, pad_id=tok.pad_id)
    assert [lp for lp, _ in one_by_one] == pytest.approx([lp for lp, _ in got], abs=1e-4)


def test_left_truncation_matches_lm_eval_rule(tiny):
    model, tok = tiny
    ctx, cont = tok.encode(TEXT[:400]), tok.encode(" The dog")
    assert len(ctx) + len(cont) > 49
    (logprob, _), = continuation_logprobs(model, [(ctx, cont)])
    kept = (ctx + cont)[-49:]
    want, _ = direct_logprob(model, kept[:-len(cont)], cont)
    assert logprob == pytest.approx(want, abs=1e-4)


def test_rolling_loglikelihood_equals_perplexity(tiny):
    from lm_eval.api.instance import Instance

    model, tok = tiny
    lm = NeoformerLM(model, tok, batch_size=4)
    text = TEXT[:300]
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (total,) = lm.loglikelihood_rolling([req])
    ids = tok.encode(text)
    # disjoint windows of max_length tokens, each after one token of context (the first after EOS)
    want = sum(direct_logprob(model, c, t)[0] for c, t in rolling_windows(ids, tok.eos_id, 48))
    assert total == pytest.approx(want, abs=1e-3)
    assert len(ids) > 48  # more than one window was scored
    ppl = math.exp(-total / len(ids))
    assert ppl == pytest.approx(math.exp(-want / len(ids)), rel=1e-5)


@pytest.mark.parametrize("which", ["tiny", "tiny_rmc"])
def test_batched_windows_equal_one_window_at_a_time_in_float64(which, request):
    """window_logprobs batches windows of several documents (mixed lengths, right-padded, several
    forwards): every window's score equals that window alone in float64, and the plain path."""
    model, tok = request.getfixturevalue(which)
    pairs = [w for text in (TEXT[:300], TEXT[40:90], TEXT[:130])
             for w in rolling_windows(tok.encode(text), tok.eos_id, 48, stride=20)]
    assert len({len(c) + len(t) for c, t in pairs}) > 3  # windows of different lengths share batches
    got = window_logprobs(model, pairs, batch_size=3, pad_id=tok.pad_id)
    want = [direct_logprob(model, c, t)[0] for c, t in pairs]
    assert got == pytest.approx(want, abs=1e-4)
    assert got == pytest.approx([lp for lp, _ in continuation_logprobs(model, pairs, batch_size=1)], abs=1e-4)
    model.double()
    try:
        got64 = window_logprobs(model, pairs, batch_size=3, pad_id=tok.pad_id)
        one64 = [window_logprobs(model, [pair], batch_size=1)[0] for pair in pairs]
    finally:
        model.float()
    assert got64 == pytest.approx(one64, abs=1e-9)


def test_generate_until_honours_stop_sequences(tiny):
    from lm_eval.api.instance import Instance

    model, tok = tiny
    lm = NeoformerLM(model, tok, batch_size=2)
    prompts = ["The cat", "Two plus two is", "A bird"]
    free = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 12, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    texts = lm.generate_until(free)
    assert len(texts) == 3 and all(texts)
    # greedy equals neoformer.generate one prompt at a time
    from neoformer.generate import generate

    for p, t in zip(prompts, texts):
        out = generate(model, tok.encode(p), 12, tokenizer=tok, eos_token_id=tok.eos_id, return_dict=True)
        assert t == tok.decode([x for x in out.new_tokens[0] if x != tok.eos_id])
    # stop at a piece of the free text: the result is cut right before it
    stop = texts[0][3:5]
    assert stop and stop not in texts[0][:3]
    cut = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [stop], "max_gen_toks": 12}), 0)])
    assert cut == [texts[0][:texts[0].index(stop)]]


@pytest.mark.parametrize("prefix", ["", "Q: The cat sat on the mat. A: yes. Q: "])
def test_greedy_until_equals_generate_one_prompt_at_a_time(tiny, prefix):
    """The shared prefix read once (or none), the rest prefilled per length group without padding,
    rows of different and equal lengths, EOS and a stop string: the same text as generate()."""
    model, tok = tiny
    prompts = [tok.encode(prefix + p) for p in ("The dog ran", "Two plus two is four and", "A bird", "A cat",
                                                "The sun is hot and the moon")]
    assert len({len(p) for p in prompts}) < len(prompts)  # some rows share a length group
    assert shared_prefix(prompts) == len(os.path.commonprefix(prompts)) and (shared_prefix(prompts) > 0) == bool(prefix)
    for stops in ([], [" the"]):
        got = greedy_until(model, tok, prompts, 10, stops, tok.eos_id)
        for p, text in zip(prompts, got):
            out = generate(model, p, 10, tokenizer=tok, eos_token_id=tok.eos_id, stop=tuple(stops), return_dict=True)
            assert text == cut_at_stop(tok.decode([x for x in out.new_tokens[0] if x != tok.eos_id]), stops)
        assert not stops or any(len(t) < 20 for t in got)


def write_task(folder: Path, data: Path) -> Path:
    write_mc_task(folder, data)
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""")
    return folder


def test_offline_local_yaml_task_runs(tiny, tmp_path):
    model, tok = tiny
    tasks = write_task(tmp_path / "tasks", DATA / "tiny_mc.json")
    out = run_tasks(model, tok, ["tiny_mc", "tiny_gen"], include_path=tasks, batch_size=8)
    mc = out["results"]["tiny_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and "acc_norm,none" in mc
    docs = [json.loads(line) for line in (DATA / "tiny_mc.json").read_text().splitlines()]
    assert out["n_samples"]["tiny_mc"]["effective"] == len(docs)
    # the accuracy equals argmax over our own scores of the choices
    hits = 0
    for doc in docs:
        scores = continuation_logprobs(model, [(tok.encode(doc["question"]), tok.encode(" " + c))
                                               for c in doc["choices"]])
        hits += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["answer"]
    assert mc["acc,none"] == pytest.approx(hits / len(docs))
    assert "exact_match,none" in out["results"]["tiny_gen"]


def test_missing_local_file_is_one_line(tiny, tmp_path):
    model, tok = tiny
    tasks = write_task(tmp_path / "tasks", tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match=r"task tiny_mc: data file .*nowhere.json"):
        run_tasks(model, tok, ["tiny_mc"], include_path=tasks)


def test_eval_cli_tasks_table_json_and_run_metrics(tiny, tmp_path, capsys):
    model, tok = tiny
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 7, model, tokenizer=tok, config={"model": model.config.to_dict()})
    tasks = write_task(tmp_path / "tasks", DATA / "tiny_mc.json")
    assert main(["eval", str(run), "--tasks", "tiny_mc", "--include-path", str(tasks), "--limit", "4",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc" in printed
    assert main(["eval", str(run), "--tasks", "tiny_mc", "--include-path", str(tasks), "--limit", "4", "--json",
                 "--threads", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["step"] == 7 and 0 <= record["tasks"]["tiny_mc"]["acc"] <= 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["eval/tiny_mc/acc"] == record["tasks"]["tiny_mc"]["acc"] and lines[-1]["step"] == 7
    # lm-eval's own entry point finds the registered class by name and loads the checkpoint
    from lm_eval import simple_evaluate

    from neoformer.eval.harness import task_manager

    out = simple_evaluate(model="neoformer", model_args=f"pretrained={run},batch_size=4", tasks=["tiny_mc"],
                          task_manager=task_manager(["tiny_mc"], tasks), limit=4, bootstrap_iters=0)
    assert out["results"]["tiny_mc"]["acc,none"] == record["tasks"]["tiny_mc"]["acc"]
    capsys.readouterr()  # lm-eval's progress bars
    for bad in (["--tasks", "tiny_mc", "--include-path", str(tmp_path / "nowhere")], ["--tasks", ","],
                ["--tasks", "tiny_mc", "--bpb"], ["--stride", "4"], ["--tasks", "tiny_mc", "--limit", "0"]):
        assert main(["eval", str(run), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_same_numbers_as_lm_eval_hf_backend_on_the_export(tiny, tmp_path):
    """lm-eval's HFLM on `to_hf(model)` gives the same log-likelihoods (1e-4) and accuracies."""
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from neoformer.hf import to_hf

    model, tok = tiny
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    export = to_hf(model, tmp_path / "hf", tokenizer_dir=tok_dir / "tokenizer.json")
    # to_hf writes no special tokens (eos_token_id None, a bare tokenizer_config): name EOS as ours does
    eos = tok._tok.id_to_token(tok.eos_id)
    (export / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos}))
    hf_config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": tok.eos_id}))
    hf = HFLM(pretrained=str(export), backend="causal", batch_size=4, device="cpu", dtype="float32",
              max_length=model.config.max_seq_len, add_bos_token=False)
    ours = NeoformerLM(model, tok, batch_size=4)
    assert hf.prefix_token_id == ours.prefix_token_id
    docs = [json.loads(line) for line in (DATA / "tiny_mc.json").read_text().splitlines()]
    reqs = [Instance("loglikelihood", {}, (d["question"], " " + c), i) for i, d in enumerate(docs) for c in d["choices"]]
    reqs.append(Instance("loglikelihood", {}, ("", "The cat"), 0))
    for (a, ga), (b, gb) in zip(ours.loglikelihood(reqs), hf.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    rolling = [Instance("loglikelihood_rolling", {}, (TEXT[:250],), 0)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), abs=1e-3)
    gen = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 10, "do_sample": False}), i)
           for i, p in enumerate(["The cat", "Two plus"])]
    assert ours.generate_until(gen) == hf.generate_until(gen)
