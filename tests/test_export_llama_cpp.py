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

