"""llama.cpp itself runs neoformer's GGUF files: greedy text equal to neoformer's (slow, needs llama.cpp).

The slow tests use the cached trained small teacher (benchmarks/teacher.py; random weights have
near-tied logits, which would make "the same greedy text" say little) and llama.cpp's binaries from
``$NEOFORMER_LLAMA_CPP_DIR`` (``make llama-cpp``); they skip when either is missing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from neoformer.checkpoint import load_checkpoint  # noqa: E402
from neoformer.cli import main  # noqa: E402
from neoformer.export import ExportError, export  # noqa: E402

LLAMA_CPP = os.environ.get("NEOFORMER_LLAMA_CPP_DIR")
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason="set NEOFORMER_LLAMA_CPP_DIR to llama.cpp's build/bin")


@pytest.fixture(scope="module")
def teacher():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from teacher import recipe_dir

    run = recipe_dir("small")
    if not (run / "recipe.json").is_file():
        pytest.skip("the small teacher is not trained: python benchmarks/teacher.py (or set NEOFORMER_TEACHER_CACHE)")
    model, tokenizer, config = load_checkpoint(run, contents=("full",))
    return model.float().eval(), tokenizer


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("quant", [None, "q8_0"])
def test_llama_cpp_greedy_text_equals_neoformer(quant, teacher, tmp_path):
    model, tokenizer = teacher
    result = export(model, tmp_path / "g", "gguf", quant=quant, tokenizer=tokenizer, llama_cpp=LLAMA_CPP)
    assert "prompt tokens equal" in result.checked, result.checked
    compared = int(result.checked.split("equals neoformer's over ")[1].split(" of ")[0])
    # F32: every token; Q8_0: at least up to the first near tie (the trained teacher's first is step 11)
    assert compared == 32 if quant is None else compared >= 8, result.checked


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_check_catches_a_wrong_rope_layout(teacher, tmp_path, monkeypatch):
    from neoformer.export import gguf_format
    from neoformer.export.llama_cpp import check_llama_cpp, llama_cpp_binary

    model, tokenizer = teacher
    monkeypatch.setattr(gguf_format, "_permute", lambda w, n_head: w)  # forget GGML's interleaved Q/K rows
    export(model, tmp_path / "g", "gguf", tokenizer=tokenizer, verify=False)
    with pytest.raises(ExportError, match="greedy text differs"):
        check_llama_cpp(llama_cpp_binary(LLAMA_CPP), tmp_path / "g" / "model.gguf", model, tokenizer, "F32")


def test_llama_cpp_option_refusals(tmp_path, capsys):
    from neoformer import build_model
    from neoformer.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run", 1, build_model("lumi-debug", vocab_size=64))
    for extra, message in ((["--format", "hf"], "use it with --format gguf"),
                           (["--format", "gguf"], "no executable llama-completion")):
        assert main(["export", str(ckpt), "--out", str(tmp_path / "o"), "--llama-cpp", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o" / "model.gguf").exists()


# ---- AOTInductor ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_aoti_package_matches_neoformer_at_batch_one_and_one_token_prompt(tmp_path):
    from neoformer import build_model
    from neoformer.export.aoti_format import AotiDecoder
    from neoformer.export.common import probe_ids

    torch.manual_seed(0)
    model = build_model("nexus-debug", vocab_size=96, n_layers=1).eval()
    result = export(model, tmp_path / "aoti", "aoti")  # verification: batch 2, prefill 5 + 3 cached steps
    assert result.max_diff <= 1e-5 and result.files == ["model.pt2", "neoformer_export.json"]
    package = AotiDecoder(tmp_path / "aoti")
    ids = probe_ids(96, 4, seed=7)[:1]  # batch 1, a one-token prefill, then 3 one-token steps
    cfg = model.config
    past = [torch.zeros(1, cfg.resolved_n_kv_heads, 0, cfg.resolved_head_dim) for _ in range(2 * cfg.n_layers)]
    logits, present, _ = model(ids[:, :1], use_cache=True)
    reference = [logits]
    for t in range(1, 4):
        logits, present, _ = model(ids[:, t:t + 1], present, use_cache=True)
        reference.append(logits)
    for t in range(4):
        logits, *past = package(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), *past)
        torch.testing.assert_close(logits, reference[t], atol=1e-5, rtol=1e-5)


def test_aoti_refuses_encoders(tmp_path):
    from neoformer import build_model

    with pytest.raises(ExportError, match="aoti packages a decoder"):
        export(build_model("neobert-debug", vocab_size=96), tmp_path / "a", "aoti")
    assert not (tmp_path / "a").exists()
