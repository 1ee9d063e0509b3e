"""The same lm-eval numbers through `neoformer serve` + lm-eval's `local-completions` backend as
through neoformer's LM adapter (issue 14): a local multiple-choice task, offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import serving, write_mc_task

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
pytest.importorskip("transformers")

from neoformer.checkpoint import save_checkpoint  # noqa: E402
from neoformer.eval.harness import run_tasks, task_manager  # noqa: E402
from neoformer.model import build_model  # noqa: E402
from neoformer.presets import PRESETS  # noqa: E402
from neoformer.tokenizer import train_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
TEXT = "The cat sat on the mat. The dog ran to the park. A bird sang in the tree. Two plus two is four. " * 20


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)
    tok = train_bpe([TEXT], vocab_size=300)
    model = build_model(PRESETS["nexus-debug"].replace(vocab_size=tok.vocab_size, max_seq_len=64)).eval()
    path = save_checkpoint(tmp_path / "ckpt", 1, model, tokenizer=tok, config={"model": model.config.to_dict()})
    hf_tok = tmp_path / "hf_tok"  # local-completions tokenizes with a Hugging Face tokenizer: the same BPE
    tok.save(hf_tok)
    (hf_tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with serving(path, max_batch=8) as (port, proc):
        yield port, model, tok, hf_tok
    proc.wait(timeout=20)


def write_task(folder: Path) -> Path:
    return write_mc_task(folder, DATA / "tiny_mc.json")


def test_served_local_completions_agree_with_the_adapter(served, tmp_path):
    from lm_eval import simple_evaluate

    port, model, tok, hf_tok = served
    tasks = write_task(tmp_path / "tasks")
    ours = run_tasks(model, tok, ["tiny_mc"], include_path=tasks)["results"]["tiny_mc"]
    remote = simple_evaluate(
        model="local-completions", tasks=["tiny_mc"], task_manager=task_manager(["tiny_mc"], tasks),
        model_args=f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={hf_tok},num_concurrent=1,max_retries=1,tokenized_requests=True",
        bootstrap_iters=0, log_samples=True)
    theirs = remote["results"]["tiny_mc"]
    assert theirs["acc,none"] == ours["acc,none"] and theirs["acc_norm,none"] == ours["acc_norm,none"]
    # request by request: the served log-likelihoods equal the adapter's (1e-4)
    from lm_eval.api.instance import Instance

    from neoformer.eval.harness import NeoformerLM

    samples = remote["samples"]["tiny_mc"]
    requests = [Instance("loglikelihood", {}, tuple(args), 0) for s in samples for args in s["arguments"]]
    served_ll = [r[0][0] for s in samples for r in s["resps"]]
    direct = [lp for lp, _ in NeoformerLM(model, tok).loglikelihood(requests)]
    assert served_ll == pytest.approx(direct, abs=1e-4)
