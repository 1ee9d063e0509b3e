"""neoformer.quantize: packed formats against float references and bitsandbytes, quantized models of every
kind, checkpoints that round-trip bit-exactly, planner bytes == file bytes, and the CLI's one-line refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from neoformer import build_model
from neoformer.checkpoint import load_checkpoint, save_checkpoint
from neoformer.cli import main
from neoformer.config import ConfigError
from neoformer.generate import generate
from neoformer.model.weights import writes_residual
from neoformer.planner import weight_bytes
from neoformer.quantize import (
    SCHEMES, QuantizedEmbedding, QuantizedLinear, kernels as K, quantize_checkpoint, quantize_model, quantized_summary,
    tensor_bytes,
)
from neoformer.quantize.modules import INT4_GEMM_ROWS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# |logits - fp32 logits|max / |fp32 logits|max on the debug presets (stated in docs/quantize.md)
LOGIT_TOLERANCE = {"int8": 0.03, "int8-dynamic": 0.05, "nf4": 0.25, "int4": 0.2}


def _weight(out=96, n_in=128, seed=0):
    torch.manual_seed(seed)
    return torch.randn(out, n_in) * 0.05


# ---- formats: error bounds against the float weight -------------------------------------------
def test_int8_error_is_at_most_half_a_step_per_row():
    w = _weight()
    q = K.quantize_int8(w)
    step = w.abs().amax(dim=1) / 127
    err = (K.dequantize_int8(q) - w).abs()
    assert (err <= step[:, None] / 2 + 1e-7).all()
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == torch.float32


def test_nf4_matches_bitsandbytes_byte_for_byte():
    import bitsandbytes.functional as bnb  # in the test extra: this test runs in `make test`
    w = _weight()
    q = K.quantize_nf4(w, 64)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.qweight.flatten(), packed.flatten()) and torch.equal(q.absmax.flatten(), state.absmax)
    assert torch.equal(K.dequantize_nf4(q), bnb.dequantize_4bit(packed, state))
    # nearest level: the error is at most half the widest gap between NF4 levels, times the group absmax
    levels = K.nf4_levels()
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    err = (K.dequantize_nf4(q) - w).abs().reshape(96, 2, 64)
    assert (err <= half_gap * q.absmax[..., None] + 1e-7).all()


def test_int4_error_is_at_most_half_a_step_per_group():
    w = _weight()
    q = K.quantize_int4(w, 32)
    err = (K.dequantize_int4(q) - w).abs().reshape(96, 4, 32)
    assert (err <= q.scales.float()[..., None] * 0.5 + 1e-6).all()
    assert torch.equal(K.unpack_nibbles(K.pack_nibbles(torch.arange(16).repeat(2, 1))), torch.arange(16).repeat(2, 1).byte())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_relative_weight_error_per_scheme(scheme):
    w = _weight()
    layer = torch.nn.Linear(128, 96, bias=False)
    layer.weight.data.copy_(w)
    q = QuantizedLinear.from_linear(layer, scheme, 64 if scheme in ("nf4", "int4") else None)
    rel = ((q.dequantize() - w).norm() / w.norm()).item()
    assert rel < {"int8": 0.01, "int8-dynamic": 0.01, "nf4": 0.12, "int4": 0.12}[scheme]


# ---- the fast ops against the float64 reference -----------------------------------------------
@pytest.mark.parametrize("rows", [1, 10])  # int8: the packed GEMV op (decode) and the bf16 GEMM (prefill)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fast_forward_matches_the_float64_reference(scheme, rows):
    torch.manual_seed(1)
    layer = torch.nn.Linear(128, 96, bias=True)
    q = QuantizedLinear.from_linear(layer, scheme, 64 if scheme in ("nf4", "int4") else None)
    x = torch.randn(2, rows // 2, 128) if rows > 1 else torch.randn(1, 1, 128)
    with torch.no_grad():
        fast = q(x)
        if scheme == "int8-dynamic":  # activations are quantized too: the reference does the same in float64
            expected = K.int8_dynamic_reference(x.double(), q.packed()) + q.bias.double()
        else:
            expected = F.linear(x.double(), q.dequantize(torch.float64), q.bias.double())
    assert fast.shape == (*x.shape[:2], 96) and fast.dtype == x.dtype
    # int8 / int4 / nf4 run on bf16 (prefill) or int8 (4-bit decode) activations, and nf4's decode kernel on its levels
    # rounded to 1/127: ~1e-2 of the output scale
    tolerance = 2e-2 if scheme in ("int8", "int4", "nf4") else 1e-5
    assert (fast.double() - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.fixture
def without_neoformer_kernels(monkeypatch):
    """As on a machine where neoformer's CPU kernels cannot load (PyTorch's own ops then run)."""
    from neoformer.kernels import build

    monkeypatch.setitem(build._state, "loaded", False)


def test_int4_prefill_gemm_on_the_kernel_layout_matches_the_float64_reference(without_neoformer_kernels):
    torch.manual_seed(2)
    q = QuantizedLinear.from_linear(torch.nn.Linear(128, 192, bias=False), "int4", 32)
    x = torch.randn(INT4_GEMM_ROWS + 3, 128)
    with torch.no_grad():
        fast, decode = q(x), q(x[:1])  # the block-dequantized GEMM, then PyTorch's packed GEMV kernel
        expected = F.linear(x.double(), q.dequantize(torch.float64))
    assert q._layout_known and q.qweight is None and q._kernel is None
    assert (fast.double() - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert (decode.double() - expected[:1]).abs().max() <= 2e-2 * expected[:1].abs().max()
    assert torch.equal(K.int4_cpu_unpack(q._int4_cpu[0], 192, 128), K.unpack_nibbles(q.packed().qweight))


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("scheme, out", [("int4", 128), ("int4", 96), ("int8", 96), ("int8-dynamic", 80), ("nf4", 80)])
def test_a_kernel_layout_holds_the_weight_once_and_gives_the_stored_bytes_back(scheme, out, kernels, monkeypatch):
    """Whichever kernel takes the weight over (neoformer's, or PyTorch's int4 layout without them), the stored
    tensors it replaces are dropped and come back bit for bit in state_dict, dequantize and the prefill path."""
    from neoformer.kernels import build

    if not kernels:
        monkeypatch.setitem(build._state, "loaded", False)
    elif not build.load():
        pytest.skip(f"neoformer's CPU kernels cannot load here: {build.unavailable_reason()}")
    torch.manual_seed(3)
    group = 64 if scheme in ("int4", "nf4") else None
    q = QuantizedLinear.from_linear(torch.nn.Linear(128, out), scheme, group)
    stored = {k: v.clone() for k, v in q.state_dict().items()}
    dense = q.dequantize()
    with torch.no_grad():
        prefill_before = q(torch.randn(40, 128, generator=torch.Generator().manual_seed(0)))
        q(torch.randn(1, 128))  # the first small batch builds the kernel layout
    held_once = (q._kernel is not None) if kernels else (scheme == "int4" and out % 64 == 0)
    assert (q.qweight is None) == held_once
    again = q.state_dict()
    assert stored.keys() == again.keys() and all(torch.equal(stored[k], again[k]) for k in stored)
    assert torch.equal(q.dequantize(), dense)
    with torch.no_grad():
        assert torch.equal(q(torch.ones(2, 128)), q(torch.ones(2, 128)))
        prefill_after = q(torch.randn(40, 128, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(prefill_after, prefill_before, rtol=1e-2, atol=1e-2 * prefill_before.abs().max().item())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_frozen_base_and_gradients_reach_the_input(scheme):
    torch.manual_seed(2)
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), scheme, 64 if scheme in ("nf4", "int4") else None)
    assert list(q.parameters()) == [] and q.in_features == 64 and q.out_features == 32 and q.scheme == scheme
    x = torch.randn(3, 64, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(3, -1))


# ---- whole models -----------------------------------------------------------------------------
def _logits(model, preset, x):
    out = model(x, x[:, :5]) if preset == "nima-transformer-debug" else model(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("preset", ["lumi-debug", "neoformer-x-debug", "neobert-debug", "nima-transformer-debug"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_model_kind_quantizes_within_tolerance(preset, scheme):
    torch.manual_seed(0)
    model = build_model(preset).eval()
    x = torch.randint(1, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = _logits(model, preset, x)
        marked = {name for name, m in model.named_modules() if writes_residual(m)}
        # the NSB's fuse_in is 64 + 16 wide: a 64-group does not divide it (refused; tested below)
        group = 16 if preset == "neoformer-x-debug" and scheme in ("nf4", "int4") else None
        quantize_model(model, scheme, group)
        got = _logits(model, preset, x)
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized and not any("lm_head" in name for name in quantized)
    assert marked == {name for name, m in model.named_modules() if writes_residual(m)} and marked <= quantized
    assert (got - ref).abs().max() <= LOGIT_TOLERANCE[scheme] * ref.abs().max()


def test_generation_with_the_static_cache_matches_full_recompute():
    torch.manual_seed(0)
    model = quantize_model(build_model("lumi-debug").eval(), "int4")
    out = generate(model, [5, 6, 7], max_new_tokens=6)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        for _ in range(6):  # greedy without a cache: the whole sequence each step
            ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4", "int8-dynamic"])
def test_compiled_decode_step_matches_eager(scheme):
    torch.manual_seed(0)
    model = quantize_model(build_model("lumi-debug").eval(), scheme)
    expected = generate(model, [1, 2, 3], max_new_tokens=8)
    assert torch.equal(generate(model, [1, 2, 3], max_new_tokens=8, compile=True), expected)


# ---- checkpoints ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("lumi-debug")
    return save_checkpoint(tmp_path_factory.mktemp("float") / "ck", 3, model), model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_checkpoint_round_trips_bit_exactly(float_ckpt, tmp_path, scheme):
    path, _ = float_ckpt
    written, model, _ = quantize_checkpoint(path, tmp_path / "q", scheme)
    loaded, _, config = load_checkpoint(tmp_path / "q")
    assert config["contents"] == "quantized" and config["quantization"]["scheme"] == scheme
    saved, again = model.state_dict(), loaded.state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    x = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    assert [n for n, m in loaded.named_modules() if writes_residual(m)] == \
        [n for n, m in model.named_modules() if writes_residual(m)]


@pytest.mark.parametrize("preset", ["nima-debug", "neobert-debug", "nima-transformer-debug"])
def test_every_kind_loads_from_a_quantized_checkpoint(tmp_path, preset):
    """Tied heads stay tied, biases survive, nothing is left on the meta device the loader builds on."""
    torch.manual_seed(0)
    model = build_model(preset).eval()
    path = save_checkpoint(tmp_path / "ck", 1, model)
    _, quantized, _ = quantize_checkpoint(path, tmp_path / "q", "int4", 32)
    loaded, _, _ = load_checkpoint(tmp_path / "q")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.lm_head.weight is loaded.embed.tokens.weight
    x = torch.randint(1, 128, (2, 8))
    with torch.no_grad():
        assert torch.equal(_logits(quantized, preset, x), _logits(loaded, preset, x))


@pytest.mark.parametrize("scheme,group,skip", [("int8", None, ("lm_head", "embed")), ("nf4", 64, ("lm_head",)),
                                               ("int4", 32, ()), ("int8-dynamic", None, ("ffn",))])
def test_planner_bytes_equal_the_written_tensor_bytes(float_ckpt, tmp_path, scheme, group, skip):
    path, model = float_ckpt
    written, _, config = quantize_checkpoint(path, tmp_path / "q", scheme, group, skip)
    planned = weight_bytes(model.config, "int8" if scheme == "int8-dynamic" else scheme, group_size=group or 64,
                           skip=skip, float_bytes=4, embeddings=not any(word in "embed.tokens" for word in skip))
    summary = quantized_summary(written, json.loads((written / "config.json").read_text()))
    assert tensor_bytes(written) == planned == summary["planned_bytes"] == summary["tensor_bytes"]


def test_bf16_load_keeps_packed_tensors(float_ckpt, tmp_path):
    quantize_checkpoint(float_ckpt[0], tmp_path / "q", "int8")
    model, _, _ = load_checkpoint(tmp_path / "q", dtype=torch.bfloat16)
    q = model.decoder.blocks[0].attn.q_proj
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]]))[0].dtype == torch.bfloat16


def test_bad_requests_are_refused_in_one_line(float_ckpt, tmp_path):
    path, _ = float_ckpt
    cases = [
        (dict(scheme="int5"), "unknown quantization scheme 'int5'"),
        (dict(scheme="nf4", group_size=48), "group size 48 does not divide the input width 64"),
        (dict(scheme="int8", group_size=32), "int8 scales each output row"),
        (dict(scheme="int4", skip=("proj", "ffn", "lm_head", "embed")), "no nn.Linear left to quantize"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            quantize_checkpoint(path, tmp_path / "never", **kwargs)
        assert not (tmp_path / "never").exists()
    quantize_checkpoint(path, tmp_path / "q", "int8")
    with pytest.raises(ConfigError, match="already a quantized checkpoint"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "q2", "nf4")
    with pytest.raises(ConfigError, match="overlaps the checkpoint"):
        quantize_checkpoint(path, path / "inside", "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(load_checkpoint(tmp_path / "q")[0], "int8")


# ---- the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import write_word_corpus

    root = tmp_path_factory.mktemp("run")
    corpus = write_word_corpus(root / "corpus", docs=3, lines=40, words_per_line=7)
    threads = torch.get_num_threads()
    assert main(["train", "--preset", "lumi-debug", "--data", str(corpus), "--tokenizer", "char", "--out",
                 str(root / "run"), "--max-steps", "2", "--batch", "4", "--seq", "16", "--no-progress", "--threads",
                 "1", "--train.plot", "false", "--train.eval_batches", "1", "--eval-every", "2"]) == 0
    torch.set_num_threads(threads)
    return root / "run"


def test_cli_quantize_then_generate_eval_and_info(trained_run, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(trained_run), "--out", str(out), "--scheme", "int4", "--group-size", "32"]) == 0
    assert "int4 g32, 14 Linears quantized" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "the cat", "-n", "4", "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["eval", str(out), "--json", "--batches", "1", "--threads", "1"]) == 0
    quantized = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(trained_run), "--json", "--batches", "1", "--threads", "1", "--quantize", "int4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantize"] == "int4"
    assert quantized["perplexity"] > 1
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized"]["tensor_bytes"] == info["quantized"]["planned_bytes"] == tensor_bytes(out)
    assert main(["generate", str(trained_run), "--prompt", "the", "-n", "3", "--quantize", "nf4",
                 "--threads", "1"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--scheme", "int3"], "error: unknown quantization scheme 'int3'"),
    (["--scheme", "nf4", "--group-size", "48"], "error: group size 48 does not divide the input width 64"),
])
def test_cli_refusals_are_one_line(trained_run, tmp_path, capsys, argv, message):
    assert main(["quantize", str(trained_run), "--out", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_quantize_on_load_refuses_an_unknown_scheme(trained_run, capsys):
    assert main(["generate", str(trained_run), "--prompt", "x", "-n", "1", "--quantize", "int3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown quantization scheme 'int3'") and err.count("\n") == 1


# ---- quantized embeddings ----------------------------------------------------------------------
# |lookup - float row| per element, as a fraction of the row's max |w| (int8: half a step of max/127;
# nf4: half the widest NF4 gap; int4: half a step of (max - min)/15 <= 2 max/15, plus bf16 rounding)
EMBEDDING_BOUND = {"int8": 0.5 / 127 + 1e-6, "nf4": 0.5 * 0.3039 + 1e-6, "int4": 1 / 15 + 0.01}


@pytest.mark.parametrize("scheme", ["int8", "nf4", "int4"])
def test_quantized_embedding_rows_stay_within_the_format_bound(scheme):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 64)
    quantized = QuantizedEmbedding.from_embedding(embedding, scheme, 32)
    ids = torch.tensor([[3, 0, 49, 3], [7, 7, 1, 2]])
    rows = quantized(ids)
    assert rows.shape == (2, 4, 64) and rows.dtype == torch.float32
    assert torch.equal(rows, quantized.dequantize()[ids])  # a lookup dequantizes exactly the table's rows
    reference = embedding(ids).detach()
    bound = EMBEDDING_BOUND[scheme] * reference.abs().amax(-1, keepdim=True)
    assert ((rows - reference).abs() <= bound).all()
    assert not list(quantized.parameters()) and sum(t.numel() * t.element_size() for t in quantized.buffers()) == \
        weight_bytes_of(scheme, 50, 64, 32)


def weight_bytes_of(scheme, rows, width, group):
    return rows * width + 4 * rows if scheme == "int8" else rows * width // 2 + 4 * rows * width // group


@pytest.mark.parametrize("scheme,group", [("int8", None), ("nf4", 32), ("int4", 32)])
def test_quantized_embeddings_and_tied_head_round_trip_and_generate(tmp_path, scheme, group):
    torch.manual_seed(0)
    model = build_model("nima-debug").eval()  # tied head
    path = save_checkpoint(tmp_path / "ck", 1, model)
    written, quantized, config = quantize_checkpoint(path, tmp_path / "q", scheme, group, skip=())
    assert isinstance(quantized.embed.tokens, QuantizedEmbedding) and quantized.lm_head.qweight is quantized.embed.tokens.qweight
    loaded, _, config = load_checkpoint(tmp_path / "q")
    assert config["quantization"]["embeddings"] == ["embed.tokens"] and config["quantization"]["tied"] == {"lm_head": "embed.tokens"}
    assert isinstance(loaded.embed.tokens, QuantizedEmbedding) and loaded.lm_head.qweight is loaded.embed.tokens.qweight
    saved, again = quantized.state_dict(), loaded.state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    planned = weight_bytes(model.config, scheme, group_size=group or 64, float_bytes=4, embeddings=True)
    assert tensor_bytes(written) == planned < weight_bytes(model.config, scheme, group_size=group or 64, float_bytes=4)
    x = torch.randint(1, 128, (2, 8))
    with torch.no_grad():
        ref = model(x)[0]
        got = loaded(x)[0]
        assert torch.equal(quantized(x)[0], got)
        assert (got - ref).abs().max() <= 2 * LOGIT_TOLERANCE[scheme] * ref.abs().max()
    out = generate(loaded, [5, 6, 7], max_new_tokens=5)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, loaded(ids)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_the_embed_skip_word_keeps_embeddings_float():
    model = quantize_model(build_model("nima-debug").eval(), "int8")  # default skip: lm_head, embed
    assert type(model.embed.tokens) is torch.nn.Embedding and model.lm_head.weight is model.embed.tokens.weight
    assert "embeddings" not in model.quantization
