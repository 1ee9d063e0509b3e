"""`neoformer generate CKPT ...` on a checkpoint written by the training code's save_checkpoint."""
import pytest
import torch

from neoformer import ModelConfig, build_model
from neoformer.cli import main
from neoformer.generate import generate
from neoformer.tokenizer import CharTokenizer

from neoformer import checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tok = CharTokenizer.from_texts([TEXT])
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, layers in (("target", 2), ("draft", 1)):
        torch.manual_seed(layers)
        cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=layers, n_heads=4, ffn_hidden=48,
                          max_seq_len=64, init_std=0.3)
        model = build_model(cfg)
        out[name] = checkpoint.save_checkpoint(root / name, 1, model, tokenizer=tok)
    return out, tok


def test_cli_streams_greedy_text_and_reports_speed(ckpts, capsys):
    paths, tok = ckpts
    assert main(["generate", str(paths["target"]), "--prompt", "the ", "-n", "12", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    model, _ = checkpoint.load_model(paths["target"])
    expected = generate(model, tok.encode("the "), 12, tokenizer=tok, eos_token_id=[], return_dict=True).texts[0]
    assert captured.out == "the " + expected + "\n"
    assert "tokens/s" in captured.err


def test_cli_options_batch_beams_and_draft(ckpts, capsys):
    paths, _ = ckpts
    target = str(paths["target"])
    assert main(["generate", target, "--prompt", "a", "--prompt", "the", "-n", "5", "--num-beams", "3",
                 "--num-return-sequences", "2", "--length-penalty", "0.8", "--early-stopping", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 4
    assert main(["generate", target, "--prompt", "the ", "-n", "8", "--temperature", "0.8", "--top-k", "5",
                 "--top-p", "0.9", "--min-p", "0.05", "--seed", "1", "--repetition-penalty", "1.2",
                 "--no-repeat-ngram-size", "3", "--stop", "zz"]) == 0
    assert main(["generate", target, "--prompt", "the ", "-n", "8", "--draft", str(paths["draft"]),
                 "--num-draft-tokens", "3"]) == 0
    assert "draft acceptance" in capsys.readouterr().err


def test_cli_errors_are_one_line(ckpts, capsys):
    paths, _ = ckpts
    assert main(["generate", str(paths["target"]), "--prompt", "x", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: top_p (1.5)") and err.count("\n") == 1
    assert main(["generate", str(paths["target"])]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_cli_prompt_lookup_and_half_precision_weights(ckpts, capsys):
    target = str(ckpts[0]["target"])
    base = ["generate", target, "--prompt", "the the the ", "-n", "12", "--ignore-eos"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--prompt-lookup", "3", "--max-matching-ngram-size", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "draft acceptance" in captured.err  # greedy: the target's own tokens
    assert main(base + ["--dtype", "bf16"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(base + ["--dtype", "int3"])
    assert "unknown dtype 'int3'; choose bf16, fp16 or fp32" in capsys.readouterr().err


def test_cli_packs_the_linears_for_the_cpu_kernels_unless_told_not_to(ckpts):
    from neoformer.cli.generate import _load
    from neoformer.kernels import TiledLinear, build

    path = str(ckpts[0]["target"])
    packed, _ = _load(path, None, None)
    plain, _ = _load(path, None, None, cpu_kernels=False)
    assert any(isinstance(m, TiledLinear) for m in packed.modules()) == build.load()
    assert not any(isinstance(m, TiledLinear) for m in plain.modules())
