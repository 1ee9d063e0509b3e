"""Issue 16: careless-user paths give one clear answer (items 6, 7, 11, 12, 13, 16, 17, 18)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import pattern_batches

from neoformer import build_model
from neoformer.cli import main
from neoformer.config import ConfigError, ModelConfig
from neoformer.train import TrainConfig, TrainingDiverged, causal_lm, fit, list_checkpoints, load_model
from neoformer.checkpoint import load_training_state

QUIET = dict(progress=False, plot=False, log_every=1, eval_every=0, save_every=0)
TINY = ["--max-steps", "2", "--batch", "4", "--seq", "16", "--no-progress", "--threads", "1", "--eval-every", "0",
        "--train.eval_batches", "2", "--train.plot", "false"]


def tiny(preset="nexus-debug"):
    torch.manual_seed(0)
    return build_model(preset, vocab_size=32, max_seq_len=32)


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def corpus(tmp_path, word_corpus) -> Path:
    return word_corpus(tmp_path / "corpus", docs=5, lines=80, words_per_line=7)


@pytest.fixture
def run_dir(tmp_path, corpus, capsys) -> Path:
    """A finished 2-step char-tokenizer run of neoformer-x-debug."""
    out = tmp_path / "run"
    assert main(["train", "--preset", "neoformer-x-debug", "--data", str(corpus), "--tokenizer", "char",
                 "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    return out


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


# ---- 6: an update that overflows the weights ------------------------------------------------
def test_overflowing_update_stops_before_anything_is_saved(tmp_path):
    cfg = TrainConfig(max_steps=3, lr=1e38, warmup_steps=0, grad_clip=0.0, **{**QUIET, "save_every": 1})
    with pytest.raises(TrainingDiverged, match=r"weights became NaN/inf.*step 1.*no checkpoint"):
        fit(tiny(), causal_lm, pattern_batches(), cfg, out_dir=tmp_path, log=lambda _: None)
    assert not list_checkpoints(tmp_path / "checkpoints")


@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("lr", float("nan")), ("eps", float("nan")),
                                          ("min_lr", float("nan")), ("time_budget", float("inf"))])
def test_non_finite_train_values_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"train.{field} .* must be a finite number"):
        TrainConfig(**{field: value})


def test_non_finite_init_is_refused_and_cli_says_so(capsys):
    with pytest.raises(ConfigError, match="init_std"):
        ModelConfig(init_std=float("nan"))
    assert main(["train", "--preset", "nexus-debug", "--lr", "inf"]) == 2
    one_line_error(capsys, "train.lr (inf) must be a finite number")


# ---- 7: a second Ctrl-C aborts without saving -----------------------------------------------
def test_second_ctrl_c_mid_step_aborts_without_saving(tmp_path):
    def double_ctrl_c(model, batch):
        double_ctrl_c.calls += 1
        if double_ctrl_c.calls == 3:  # inside step 3, after its batch was taken
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return causal_lm(model, batch)

    double_ctrl_c.calls = 0
    messages = []
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(), double_ctrl_c, pattern_batches(), TrainConfig(max_steps=50, **QUIET), out_dir=tmp_path,
            log=messages.append)
    assert not list_checkpoints(tmp_path / "checkpoints")  # step 2 with 3 batches consumed would be torn
    assert any("aborted during step 3 without saving" in m for m in messages)
    assert signal.getsignal(signal.SIGINT) is before


# ---- 16: time budget and resume -------------------------------------------------------------
def test_resumed_run_gets_a_fresh_time_budget(tmp_path):
    cfg = TrainConfig(max_steps=10**6, time_budget=0.3, **QUIET)
    first = fit(tiny(), causal_lm, pattern_batches(), cfg, out_dir=tmp_path, log=lambda _: None)
    assert first.stop_reason == "time_budget" and first.step > 0
    second = fit(tiny(), causal_lm, pattern_batches(), cfg, out_dir=tmp_path, resume=True, log=lambda _: None)
    assert second.stop_reason == "time_budget" and second.step > first.step
    assert load_training_state(tmp_path)["elapsed"] >= 0.6  # elapsed still counts the whole run

    messages = []
    third = fit(tiny(), causal_lm, pattern_batches(), cfg.replace(budget_across_resumes=True), out_dir=tmp_path,
                resume=True, log=messages.append)
    assert third.step == second.step
    assert any("no steps trained: the time budget" in m for m in messages), messages


def test_slow_first_validation_does_not_eat_the_time_budget():
    def slow_val():
        time.sleep(0.4)
        return [next(pattern_batches(seed=9))]

    cfg = TrainConfig(max_steps=10**6, time_budget=0.2, **{**QUIET, "eval_every": 10**5})
    result = fit(tiny(), causal_lm, pattern_batches(), cfg, val_batches=slow_val, log=lambda _: None)
    assert result.stop_reason == "time_budget" and result.step >= 1


def test_resume_past_max_steps_says_why_nothing_trained(run_dir, capsys):
    assert main(["train", "--out", str(run_dir), "--resume", "--no-progress"]) == 0
    assert "no steps trained: the run is already at step 2 and train.max_steps is 2" in capsys.readouterr().out


# ---- 11: tracebacks replaced by one line ----------------------------------------------------
def test_string_in_a_float_field(capsys):
    assert main(["train", "--preset", "nexus-debug", "--train.beta1", "abc"]) == 2
    one_line_error(capsys, "train.beta1 ('abc')")


@pytest.mark.parametrize("text, section", [("preset: nima-debug\ntrain: [1, 2]\n", "train"), ("model: 5\n", "model")])
def test_yaml_section_of_the_wrong_type(tmp_path, capsys, text, section):
    (tmp_path / "run.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    one_line_error(capsys, f"config section {section!r} must be a mapping")


def test_manifest_whose_files_is_a_list(run_dir, capsys):
    checkpoint = run_dir / "checkpoints" / "step-000002"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = list(manifest["files"])
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert main(["checkpoint", "inspect", str(checkpoint)]) == 2
    one_line_error(capsys, "manifest.json is corrupt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_cuda_without_cuda(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "the", "--device", "cuda"]) == 2
    one_line_error(capsys, "CUDA is not available")


def test_prompt_file_that_is_a_directory_or_not_utf8(run_dir, tmp_path, capsys):
    assert main(["generate", str(run_dir), "--prompt-file", str(tmp_path)]) == 2
    one_line_error(capsys, str(tmp_path), "is a directory")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert main(["generate", str(run_dir), "--prompt-file", str(tmp_path / "latin1.txt")]) == 2
    one_line_error(capsys, "latin1.txt", "not UTF-8")


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--preset", "nexus-debug", "--out", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "is a file")
    assert main(["tokenizer", "train", "--kind", "char", "--out", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "is a file; pass a folder for the tokenizer")
    assert (tmp_path / "file").read_text() == "x"


# ---- 12: no silent acceptance ---------------------------------------------------------------
def test_resume_with_another_preset_is_refused(run_dir, capsys):
    assert main(["train", "--out", str(run_dir), "--resume", "--preset", "nima-debug"]) == 2
    one_line_error(capsys, "--preset nima-debug differs from the checkpoint's preset 'neoformer-x-debug'")


def test_draft_with_another_tokenizer_of_the_same_size(run_dir, tmp_path, corpus, capsys):
    other = tmp_path / "other_corpus"
    other.mkdir()
    for doc in corpus.iterdir():  # 'a' -> 'z': the same number of characters, other ids
        (other / doc.name).write_text(doc.read_text().replace("a", "z"))
    draft = tmp_path / "draft"
    assert main(["train", "--preset", "neoformer-x-debug", "--data", str(other), "--tokenizer", "char",
                 "--out", str(draft), *TINY]) == 0
    assert load_model(draft)[1].vocab_size == load_model(run_dir)[1].vocab_size
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--draft", str(draft), "--prompt", "the", "-n", "3"]) == 2
    one_line_error(capsys, "different tokenizer")


def test_val_fraction_zero_trains_without_validation(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "neoformer-x-debug", "--data", str(corpus), "--tokenizer", "char",
                 "--out", str(out), "--data.val_fraction", "0", *TINY]) == 0
    assert " 0 val tokens" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 2
    one_line_error(capsys, "val_fraction 0", "--split train")


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_must_be_positive(capsys, epochs):
    assert main(["train", "--preset", "nexus-debug", "--epochs", epochs]) == 2
    one_line_error(capsys, "--epochs")


def test_seq_longer_than_the_model_and_eval_batch_zero(run_dir, capsys):
    assert main(["train", "--preset", "nexus-debug", "--seq", "100000"]) == 2
    one_line_error(capsys, "train.seq_len (100000) is longer than the model's max_seq_len (64)")
    assert main(["eval", str(run_dir), "--seq", "65"]) == 2
    one_line_error(capsys, "max_seq_len (64)")
    assert main(["eval", str(run_dir), "--batch", "0"]) == 2
    one_line_error(capsys, "--batch (0) must be a positive integer")


# ---- 13: messages that say what is wrong and where ------------------------------------------
def test_too_few_windows_blames_seq_and_batch(tmp_path, corpus, capsys):
    assert main(["train", "--preset", "neoformer-x-debug", "--data", str(corpus), "--tokenizer", "char",
                 "--out", str(tmp_path / "run"), *TINY, "--seq", "64", "--batch", "1000"]) == 2
    one_line_error(capsys, "window(s) of seq_len 64", "lower --seq or --batch")


def test_jsonl_and_parquet_errors_name_the_flag_and_file(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"body": "hello"}\n')
    assert main(["tokenizer", "train", "--data", str(data), "--kind", "char", "--out", str(tmp_path / "tok")]) == 2
    one_line_error(capsys, "--data.text_field")
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"not parquet at all")
    assert main(["tokenizer", "train", "--data", str(parquet), "--kind", "char", "--out", str(tmp_path / "tok")]) == 2
    one_line_error(capsys, "bad.parquet", "not a readable Parquet file")


def test_binary_files_are_named(run_dir, tmp_path, capsys):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00model: 5")
    assert main(["train", "--config", str(tmp_path / "binary.yaml")]) == 2
    one_line_error(capsys, "binary.yaml", "not a UTF-8 text file")
    (run_dir / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00\x01")
    assert main(["eval", str(run_dir)]) == 2
    one_line_error(capsys, "latest", "not a text file")


def test_skipped_files_are_reported_once(tmp_path, corpus, caplog):
    (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert main(["train", "--preset", "neoformer-x-debug", "--data", str(corpus), "--tokenizer", "char",
                 "--out", str(tmp_path / "run"), *TINY]) == 0
    assert [r.getMessage() for r in caplog.records].count(f"{corpus}: skipped 1: 1 not-utf8 (latin1.txt)") == 1


def test_generate_checks_before_printing_the_prompt(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", ""]) == 2
    one_line_error(capsys, "the prompt is empty")
    assert main(["generate", str(run_dir), "--prompt", "def", "--top-p", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: top_p"), captured


def test_info_reads_a_run_directory(run_dir, capsys):
    assert main(["info", str(run_dir)]) == 0
    assert "decoder, 2 layers, d_model 64" in capsys.readouterr().out


# ---- 17: debug presets with the default tokenizer -------------------------------------------
def test_debug_preset_trains_with_the_default_bpe_tokenizer(tmp_path, corpus, capsys):
    assert main(["train", "--preset", "neoformer-x-debug", "--data", str(corpus), "--out", str(tmp_path / "run"),
                 *TINY]) == 0
    assert "tokenizer: bpe, vocab" in capsys.readouterr().out


# ---- 18: eval and generate use the busy-CPU thread policy -----------------------------------
def test_eval_and_generate_tune_threads_by_default(run_dir, capsys, monkeypatch):
    from neoformer.train.monitor import ThreadTuner

    steps = []
    monkeypatch.setattr(ThreadTuner, "after_step", lambda self, seconds: steps.append(seconds))
    assert main(["eval", str(run_dir), "--batches", "3"]) == 0
    assert len(steps) == 3
    assert main(["generate", str(run_dir), "--prompt", "the", "-n", "6", "--ignore-eos"]) == 0
    assert len(steps) >= 3 + 5
    steps.clear()
    assert main(["eval", str(run_dir), "--batches", "3", "--threads", "1"]) == 0
    assert main(["generate", str(run_dir), "--prompt", "the", "-n", "3", "--threads", "1"]) == 0
    assert steps == [] and torch.get_num_threads() == 1


def test_weights_check_tells_huge_from_non_finite():
    from neoformer.train.fit import weights_are_finite

    model = tiny()
    with torch.no_grad():
        first = next(model.parameters())
        first.fill_(1e30)  # the fast L2 norm overflows; the max-abs confirmation says finite
        assert weights_are_finite(model)
        first.view(-1)[0] = float("nan")
        assert not weights_are_finite(model)
