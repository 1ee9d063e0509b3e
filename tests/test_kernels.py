"""neoformer.kernels: the CPU decode kernels against float64 recomputations, batch invariance, the packed
linear against nn.Linear, small-query attention against SDPA, and generation with packed / quantized
models (eager and compiled) against the unpacked models."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from neoformer import build_model
from neoformer.generate import generate
from neoformer.kernels import KERNEL_ROWS, TiledLinear, build, ops, pack_linears
from neoformer.quantize import QuantizedLinear, kernels as K, quantize_model

pytestmark = pytest.mark.skipif(not build.load(), reason=f"CPU kernels unavailable: {build.unavailable_reason()}")


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


# ---- the matrix-vector kernels ------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 5, 9])  # 9: two passes of the kernel's 8-row blocks
@pytest.mark.parametrize("out", [64, 72])  # 72: not a whole number of tiles (zero rows padded)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_kernels_match_float64(dtype, out, rows):
    torch.manual_seed(0)
    w = torch.randn(out, 96).to(dtype)
    x = torch.randn(rows, 96)
    y = ops.gemv_float(ops.pack_float(w), x)[:, :out]
    x = x.to(dtype)  # bf16 weights take bf16 activations: the products are exact, the sums fp32
    assert y.dtype == torch.float32 and _relative(y, x.double() @ w.double().t()) < 1e-6
    assert torch.equal(ops.dense_float(ops.pack_float(w), out), w)


@pytest.mark.parametrize("rows", [1, 3, 11])
def test_int8_weight_only_kernel_matches_float64(rows):
    torch.manual_seed(1)
    q = K.quantize_int8(torch.randn(80, 64))
    x = torch.randn(rows, 64)
    tiles, scales = ops.pack_int8(q.qweight, q.scales)
    y = ops.gemv_int8(tiles, scales, x)[:, :80]
    assert _relative(y, x.double() @ K.dequantize_int8(q, torch.float64).t()) < 1e-6


@pytest.mark.parametrize("rows", [1, 4, 10])
def test_int8_vnni_kernel_equals_the_int_mm_path_bit_for_bit(rows):
    """The int32 dot products are exact, and both paths scale them in the same order."""
    torch.manual_seed(2)
    q = K.quantize_int8(torch.randn(48, 96))
    x = torch.randn(rows, 96)
    tiles, scales = ops.pack_int8_vnni(q.qweight, q.scales)
    y = ops.gemv_int8_vnni(tiles, scales, *K.quantize_rows_int8(x))[:, :48]
    assert torch.equal(y, K.int8_dynamic_linear(x, q))
    assert torch.equal(ops.dense_int8_vnni(tiles, 48), q.qweight)
    assert torch.equal(ops.gemv_int8_vnni_f32(tiles, scales, x)[:, :48], y)  # quantized inside the kernel


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e6])
def test_in_kernel_activation_quantizers_equal_the_python_ones_bit_for_bit(scale):
    """Codes land exactly on .5 ties (round half to even), rows of zeros (the 1e-12 floor) and tiny or large
    magnitudes: the kernel's quantizers must give the Python quantizers' outputs exactly."""
    torch.manual_seed(5)
    q = K.quantize_int8(torch.randn(32, 64))
    x = torch.randn(5, 64) * scale
    x[1] = 0.0
    x[2, :] = torch.arange(64) - 31.5  # amax 32.5 -> scale 32.5/127: many x / scale near .5
    x[3, ::2] = x[3, 0] * 0.5
    tiles, scales = ops.pack_int8_vnni(q.qweight, q.scales)
    assert torch.equal(ops.gemv_int8_vnni_f32(tiles, scales, x), ops.gemv_int8_vnni(tiles, scales, *K.quantize_rows_int8(x)))
    q4 = K.quantize_int4(torch.randn(32, 64), 32)
    t4 = ops.pack_int4_vnni(K.unpack_nibbles(q4.qweight), q4.scales, q4.zeros, 32)
    assert torch.equal(ops.gemv_int4_vnni(*t4, x, 32), ops.gemv_int4_vnni_prequantized(*t4, x, 32))


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 6])
def test_int4_vnni_kernel_matches_its_float64_arithmetic(group, rows):
    torch.manual_seed(3)
    q = K.quantize_int4(torch.randn(40, 128), group)
    x = torch.randn(rows, 128)
    codes = K.unpack_nibbles(q.qweight)
    tiles, scales, zeros = ops.pack_int4_vnni(codes, q.scales, q.zeros, group)
    y = ops.gemv_int4_vnni(tiles, scales, zeros, x, group)[:, :40]
    assert _relative(y, ops.gemv_blocks_reference(ops.dense_int4_vnni(tiles, scales, zeros, 40, torch.float64), x)) < 1e-6
    # the layout holds the stored values exactly, and its dequantized weight is the stored one's
    assert torch.equal(ops.codes_int4_vnni(tiles, 40), codes)
    assert torch.equal(ops.untile_groups(scales, 40), q.scales) and torch.equal(ops.untile_groups(zeros, 40), q.zeros)
    torch.testing.assert_close(ops.dense_int4_vnni(tiles, scales, zeros, 40), K.dequantize_int4(q), rtol=0, atol=1e-6)
    # against the float weight, the int8 activations cost about 1% of the output scale
    assert _relative(y, x.double() @ K.dequantize_int4(q, torch.float64).t()) < 2e-2


@pytest.mark.parametrize("rows", [1, 3, 10])
def test_nf4_vnni_kernel_matches_its_float64_arithmetic(rows):
    torch.manual_seed(7)
    q = K.quantize_nf4(torch.randn(48, 128), 64)
    x = torch.randn(rows, 128)
    codes = K.unpack_nibbles(q.qweight)
    tiles, absmax = ops.pack_nf4_vnni(codes, q.absmax, 64)
    table = ops.nf4_table(K.nf4_levels())
    y = ops.gemv_nf4_vnni(tiles, absmax, table, x, 64)[:, :48]
    kernel_levels = (table.double() - 128) / 127  # the levels the kernel multiplies by
    assert (kernel_levels - K.nf4_levels().double()).abs().max() <= 0.5 / 127
    assert _relative(y, ops.gemv_blocks_reference(ops.dense_nf4_vnni(tiles, absmax, kernel_levels, 48, torch.float64), x)) < 1e-6
    # the layout holds the stored values exactly; with the exact levels it is the stored weight
    assert torch.equal(ops.codes_int4_vnni(tiles, 48), codes) and torch.equal(ops.untile_groups(absmax, 48), q.absmax)
    torch.testing.assert_close(ops.dense_nf4_vnni(tiles, absmax, K.nf4_levels(), 48), K.dequantize_nf4(q), rtol=0, atol=0)
    # against the exact nf4 weight, the rounded levels and the int8 activations cost about 1% of the output scale
    assert _relative(y, x.double() @ K.dequantize_nf4(q, torch.float64).t()) < 2e-2


@pytest.mark.parametrize("kind", ["f32", "bf16", "int8", "int8x8", "int4x8", "nf4"])
def test_each_row_is_computed_the_same_whatever_the_batch(kind):
    """Batch invariance: a row's result does not depend on how many rows share the call (serving, speculation)."""
    torch.manual_seed(4)
    w = torch.randn(64, 64)
    q8, q4 = K.quantize_int8(w), K.quantize_int4(w, 32)
    t8, s8 = ops.pack_int8(q8.qweight, q8.scales)
    v8, vs8 = ops.pack_int8_vnni(q8.qweight, q8.scales)
    t4 = ops.pack_int4_vnni(K.unpack_nibbles(q4.qweight), q4.scales, q4.zeros, 32)
    n4 = K.quantize_nf4(w, 32)
    tn = (*ops.pack_nf4_vnni(K.unpack_nibbles(n4.qweight), n4.absmax, 32), ops.nf4_table(K.nf4_levels()))
    run = {"f32": lambda x: ops.gemv_float(ops.pack_float(w), x),
           "bf16": lambda x: ops.gemv_float(ops.pack_float(w.bfloat16()), x),
           "int8": lambda x: ops.gemv_int8(t8, s8, x),
           "int8x8": lambda x: ops.gemv_int8_vnni(v8, vs8, *K.quantize_rows_int8(x)),
           "int4x8": lambda x: ops.gemv_int4_vnni(*t4, x, 32),
           "nf4": lambda x: ops.gemv_nf4_vnni(*tn, x, 32)}[kind]
    x = torch.randn(13, 64)
    whole = run(x)
    for i in (0, 7, 12):
        assert torch.equal(run(x[i:i + 1]), whole[i:i + 1])


# ---- attention for a few queries ---------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    dict(B=1, H=6, Hkv=6, L=1, S=40, D=64, mask=True, causal=False),
    dict(B=2, H=8, Hkv=2, L=3, S=37, D=32, mask=True, causal=False),  # GQA, a mask per row
    dict(B=1, H=4, Hkv=4, L=5, S=5, D=16, mask=False, causal=True),  # a short causal prefill
    dict(B=2, H=4, Hkv=2, L=1, S=21, D=48, mask=False, causal=False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_query_attention_matches_sdpa_in_float64(case, dtype):
    torch.manual_seed(5)
    B, H, Hkv, L, S, D = (case[k] for k in ("B", "H", "Hkv", "L", "S", "D"))
    q, k, v = torch.randn(B, H, L, D).to(dtype), torch.randn(B, Hkv, S, D).to(dtype), torch.randn(B, Hkv, S, D).to(dtype)
    mask = None
    if case["mask"]:
        mask = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(0)) > 0.4
        mask[..., 0] = True
    out = ops.small_query_attention(q, k, v, mask, case["causal"], D ** -0.5)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=case["causal"],
                                         scale=D ** -0.5, enable_gqa=True)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("valid", [5, 16, 29, 57])
def test_small_query_attention_row_does_not_depend_on_keys_past_it(valid):
    """A decode step sees `valid` keys, a verification or a static-capacity cache sees more (masked): the row
    must come out bit-identical, else greedy speculative output drifts from the target's."""
    torch.manual_seed(6)
    q = torch.randn(1, 4, 1, 32)
    k, v = torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    alone = ops.small_query_attention(q, k[:, :, :valid], v[:, :, :valid], None, False, 0.2)
    for total in (valid + 1, valid + 7, 64):
        mask = (torch.arange(total) < valid).view(1, 1, 1, total)
        more = ops.small_query_attention(q, k[:, :, :total], v[:, :, :total], mask, False, 0.2)
        assert torch.equal(more, alone), total


def test_small_query_attention_declines_what_it_does_not_cover():
    q = torch.randn(1, 2, 1, 24)  # head dim not a multiple of 16
    assert ops.small_query_attention(q, q, q, None, False, 0.2) is None
    q = torch.randn(1, 2, KERNEL_ROWS + 1, 16)
    assert ops.small_query_attention(q, q, q, None, True, 0.2) is None


# ---- the packed linear and whole models ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_linear_equals_the_linear_it_replaces(dtype):
    torch.manual_seed(6)
    linear = torch.nn.Linear(64, 40).to(dtype)
    tiled = TiledLinear.from_linear(linear)
    assert list(tiled.parameters()) == []
    with torch.no_grad():
        for rows in (1, KERNEL_ROWS, KERNEL_ROWS + 5):  # kernel, kernel, rebuilt weight + GEMM
            x = torch.randn(rows, 64).to(dtype)
            torch.testing.assert_close(tiled(x), linear(x), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    state = tiled.state_dict()
    assert state.keys() == linear.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in linear.state_dict().items())
    other = TiledLinear.from_linear(torch.nn.Linear(64, 40).to(dtype))
    other.load_state_dict(linear.state_dict())
    assert torch.equal(other.tiles, tiled.tiles)


@pytest.mark.parametrize("preset", ["lumi-debug", "neoformer-x-debug"])
def test_packed_model_generates_what_the_unpacked_one_does(preset):
    torch.manual_seed(0)
    model = build_model(preset).eval()
    packed = copy.deepcopy(model)
    assert pack_linears(packed) == sum(type(m) is torch.nn.Linear for m in model.modules())
    x = torch.randint(1, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        a, b = model(x), packed(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.equal(generate(packed, prompt, max_new_tokens=12), generate(model, prompt, max_new_tokens=12))
    assert packed.state_dict().keys() == model.state_dict().keys()


def test_pack_linears_does_nothing_without_the_kernels(monkeypatch):
    monkeypatch.setitem(build._state, "loaded", False)
    model = build_model("lumi-debug")
    assert pack_linears(model) == 0 and not any(isinstance(m, TiledLinear) for m in model.modules())


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int4", "nf4"])
def test_quantized_decode_runs_the_kernels_and_generates_as_the_reference(scheme):
    """A prompt longer than the kernel's row limit: prefill takes the GEMM path, decoding the kernels; the
    tokens equal those of a cache-free greedy loop through the dequantize-then-F.linear reference."""
    torch.manual_seed(0)
    model = quantize_model(build_model("lumi-debug").eval(), scheme)
    prompt = list(range(1, KERNEL_ROWS + 8))
    out = generate(model, prompt, max_new_tokens=6)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert all(m._kernel is not None and m.qweight is None for m in layers)
    for m in layers:  # the reference path: dequantize, then F.linear
        m.forward = m.forward_reference
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.slow
@pytest.mark.parametrize("make", ["packed bf16", "int4"])
def test_compiled_decode_with_kernels_matches_eager(make):
    torch.manual_seed(0)
    model = build_model("lumi-debug").eval()
    if make == "int4":
        quantize_model(model, "int4")
    else:
        model = model.to(torch.bfloat16)
        pack_linears(model)
    prompt = list(range(1, KERNEL_ROWS + 4))  # longer than the kernel's rows: the first layouts come from prefill
    expected = generate(model, prompt, max_new_tokens=10)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, compile=True), expected)


@pytest.mark.slow
@pytest.mark.parametrize("draft_layers", [1, 2])  # 2: the target itself, every draft accepted
def test_compiled_bf16_speculative_output_is_the_targets_to_the_token(draft_layers):
    """Random bf16 weights have near ties, so any round computed differently from a plain step (the prompt's last
    token read by a verification, a short last round run eagerly, keys past a row counted) flips tokens; these
    are the cases that differed before (tokens 31 and 56 of 40 new)."""
    torch.manual_seed(0)
    target = build_model("nexus-nano", n_layers=2, vocab_size=4096, max_seq_len=256).eval().to(torch.bfloat16)
    draft = target if draft_layers == 2 else build_model("nexus-nano", n_layers=1, vocab_size=4096).eval().to(torch.bfloat16)
    pack_linears(target), pack_linears(draft)
    prompt = list(range(5, 25))  # longer than the kernels' rows: the prompt runs on BLAS
    expected = generate(target, prompt, max_new_tokens=40)
    assert torch.equal(generate(target, prompt, max_new_tokens=40, compile=True), expected)
    for compiled in (False, True):
        assert torch.equal(generate(target, prompt, max_new_tokens=40, draft_model=draft, num_draft_tokens=4,
                                    compile=compiled), expected)


@pytest.mark.slow
def test_compiled_speculative_decoding_with_packed_models_equals_the_target_alone():
    """Verification reads several query rows through the attention kernel inside a compiled graph (its fake
    shapes and strides must be the kernel's), and the draft's steps run the GEMV kernels."""
    torch.manual_seed(0)
    target = build_model("lumi-debug").eval()
    draft = build_model("lumi-debug", n_layers=1).eval()
    pack_linears(target), pack_linears(draft)
    prompt = [5, 6, 7, 8]
    expected = generate(target, prompt, max_new_tokens=12)
    assert torch.equal(generate(target, prompt, max_new_tokens=12, draft_model=draft, num_draft_tokens=3,
                                compile=True), expected)
