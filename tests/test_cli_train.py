"""`neoformer train / eval / checkpoint / tokenizer` end to end on tiny presets and a tiny corpus."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from neoformer.cli import main
from neoformer.train import load_model
from neoformer.train.run_config import load_run_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-steps", "4", "--batch", "4", "--seq", "16", "--no-progress", "--threads", "1", "--eval-every", "2",
        "--train.eval_batches", "2", "--train.plot", "false"]


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def corpus(tmp_path, word_corpus) -> Path:
    return word_corpus(tmp_path / "corpus", docs=5, lines=80, words_per_line=7)


def train(*args: str) -> int:
    return main(["train", *args])


def test_train_eval_inspect_decoder(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train("--preset", "neoformer-x-debug", "--data", str(corpus), "--tokenizer", "char", "--out", str(out),
                 "--samples", "1", "--train.sample_tokens", "5", *TINY) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and " ppl " in printed and "--- sample 1 ---" in printed
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    model, tok = load_model(out)
    assert model.config.vocab_size == tok.vocab_size and model.config.rmc

    assert main(["eval", str(out), "--json", "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"])

    assert main(["checkpoint", "inspect", str(out)]) == 0
    assert "files verified" in capsys.readouterr().out
    assert main(["checkpoint", "list", str(out)]) == 0
    assert "<- latest" in capsys.readouterr().out


def test_resume_continues_the_run(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    base = ["--preset", "nexus-debug", "--data", str(corpus), "--tokenizer", "char", "--out", str(out), *TINY]
    assert train(*base) == 0
    assert train("--out", str(out), "--resume", "--max-steps", "6", "--no-progress") == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6 and "done (max_steps): 6 steps" in capsys.readouterr().out
    assert train("--out", str(out), "--resume", "--model.d_model", "32") == 2
    assert "differs from the checkpoint" in capsys.readouterr().err


def test_mlm_trains_through_the_same_command(tmp_path, corpus, capsys):
    out = tmp_path / "mlm"
    assert train("--preset", "neobert-debug", "--data", str(corpus), "--tokenizer", "char", "--out", str(out),
                 "--samples", "1", *TINY) == 0
    printed = capsys.readouterr().out
    assert "masked LM (15% masked)" in printed and "masked-token accuracy" in printed
    model, tok = load_model(out)
    assert model.config.kind == "encoder" and model.config.pad_token_id == tok.pad_id
    assert main(["eval", str(out), "--batches", "2"]) == 0


def test_seq2seq_trains_through_the_same_command(tmp_path, corpus, capsys):
    out = tmp_path / "s2s"
    assert train("--preset", "nima-transformer-debug", "--data", str(corpus), "--tokenizer", "char", "--out", str(out),
                 "--samples", "1", "--train.sample_tokens", "4", *TINY) == 0
    printed = capsys.readouterr().out
    assert "synthetic next_line pairs" in printed and "prediction:" in printed
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{w} {i}\t{i} {w}\n" for i, w in enumerate(["ab", "cd", "ef", "gh"] * 10)))
    assert train("--preset", "nima-transformer-debug", "--data", str(pairs), "--tokenizer", "char",
                 "--out", str(tmp_path / "pairs"), *TINY) == 0
    assert f"pairs from {pairs}" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "pairs"), "--batches", "2"]) == 0


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_trains_a_step_when_shrunk(tmp_path, corpus, config):
    run = load_run_config(REPO / "configs" / config)
    shrink = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "null",
              "--model.ffn_hidden", "64", "--model.max_seq_len", "64", "--train.grad_accum", "1",
              "--train.deterministic", "false", "--train.gradient_checkpointing", "false"]
    if run.model.kind == "encoder_decoder":
        shrink += ["--model.n_encoder_layers", "1"]
    assert train("--config", str(REPO / "configs" / config), "--data", str(corpus), "--tokenizer", "char",
                 "--out", str(tmp_path / "run"), *shrink, *TINY[:-4], "--train.plot", "false") == 0


def test_demo_preset_defaults():
    run = load_run_config(preset="neoformer-x-demo")
    assert run.train.time_budget and run.train.samples and run.model.rmc and run.model.nsb
    assert run.tokenizer.vocab_size == run.model.vocab_size


@pytest.mark.parametrize("args, message", [
    (["--preset", "lumi-tiy"], "did you mean 'lumi-tiny'"),
    (["--preset", "lumi-debug", "--train.lrr", "1"], "unrecognized arguments"),
    (["--preset", "lumi-debug", "--train.lr", "-1"], "train.lr (-1) must be a positive number"),
    (["--preset", "lumi-debug", "--data", "/no/such/dir"], "data source not found"),
    (["--preset", "lumi-debug", "--model.n_heads", "3"], "must be divisible"),
    ([], "pass --preset NAME or --config FILE"),
    (["--config", "/no/such.yaml"], "config file not found"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if message == "unrecognized arguments" else _no_raise():
        code = train(*args, "--out", str(tmp_path / "x"))
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == (1 if message != "unrecognized arguments" else 2)  # argparse adds a usage line


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("command", [["train"], ["eval"], ["tokenizer", "train"], ["checkpoint", "inspect"]])
def test_help_works(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_tokenizer_train_command(tmp_path, corpus, capsys):
    from neoformer.tokenizer import load_tokenizer

    for kind, size in (("char", 0), ("bpe", 300)):
        out = tmp_path / kind
        assert main(["tokenizer", "train", "--data", str(corpus), "--kind", kind, "--vocab-size", str(size or 300),
                     "--out", str(out)]) == 0
        tok = load_tokenizer(out)
        assert tok.decode(tok.encode("the cat")) == "the cat"
    assert "characters/token" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--data", str(corpus), "--kind", "bpe", "--vocab-size", "10",
                 "--out", str(tmp_path / "x")]) == 2
    assert "too small" in capsys.readouterr().err


def test_override_parsing():
    assert parse_overrides(["--train.lr", "3e-4", "--model.rmc=false", "--data.source", "x"]) == {
        "train.lr": 3e-4, "model.rmc": False, "data.source": "x"}
    run = load_run_config(preset="lumi-debug", overrides={"train.lr": "3e-4", "model.n_layers": 3})
    assert run.train.lr == 3e-4 and run.model.n_layers == 3
