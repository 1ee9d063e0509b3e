"""Half-precision weights for inference: a bf16 copy of a small trained model decodes the fp32
model's greedy tokens (its logits within a stated tolerance, and every step's top-2 margin wider
than that tolerance, so agreement is what the test checks, not luck); the compiled decode step
serves every cache capacity with one graph (no recompiles as generations get longer)."""
import copy

import pytest
import torch

from neoformer import ModelConfig, build_model
from neoformer.generate import generate

# |bf16 logit - fp32 logit| on this model: bf16 keeps 8 mantissa bits, so weights and activations
# are rounded by <= 2^-9 relative; norms, softmax and every matmul accumulate in fp32
LOGIT_TOLERANCE = 0.1  # measured here: bf16 0.045, fp16 0.005 (logits up to ~10)
PATTERN = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]


@pytest.fixture(scope="module")
def trained():
    """A tiny decoder trained to continue a repeating pattern (large next-token margins)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                    max_seq_len=64))
    data = torch.tensor([(PATTERN * 5)[:40]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        logits = model(data[:, :-1], use_cache=False)[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def step_logits(model, seq):
    with torch.inference_mode():
        return model(torch.tensor([seq]), use_cache=False)[0][0].float()  # (T, V)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_decode_the_fp32_greedy_tokens(trained, dtype):
    half = copy.deepcopy(trained).to(dtype)
    prompt = PATTERN[:4]
    out = generate(trained, prompt, max_new_tokens=24, return_dict=True)
    seq = prompt + out.new_tokens[0]
    ref, got = step_logits(trained, seq), step_logits(half, seq)
    assert (got - ref).abs().max() < LOGIT_TOLERANCE
    top2 = ref[len(prompt) - 1:-1].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 2 * LOGIT_TOLERANCE  # margins the tolerance cannot flip
    assert generate(half, prompt, max_new_tokens=24, return_dict=True).new_tokens == out.new_tokens
    assert next(half.parameters()).dtype == dtype  # weights stayed half precision


@pytest.mark.slow
def test_compiled_bf16_decode_and_no_recompiles_as_the_cache_grows(trained):
    from torch._dynamo.utils import counters

    half = copy.deepcopy(trained).to(torch.bfloat16)
    prompt = PATTERN[:4]
    counters.clear()
    for n in (10, 70, 130):  # cache capacities 64, 128, 192: one compiled step for all
        expected = generate(half, prompt, max_new_tokens=n)
        assert torch.equal(generate(half, prompt, max_new_tokens=n, compile=True), expected)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_a_compiled_step_follows_a_model_that_changed_since(trained):
    """The compiled step skips dynamo's guards on module attributes (its tensor guards stay, and the engine
    compares a fingerprint of the model once per call): a model changed between calls -- new dtypes, new
    values, swapped modules -- must never run a stale graph."""
    model = copy.deepcopy(trained)
    prompt = PATTERN[:4]
    assert torch.equal(generate(model, prompt, max_new_tokens=12, compile=True), generate(model, prompt, max_new_tokens=12))
    model.to(torch.bfloat16)  # same Parameter objects, new dtype
    assert torch.equal(generate(model, prompt, max_new_tokens=12, compile=True), generate(model, prompt, max_new_tokens=12))
    with torch.no_grad():  # new values in the same storage: read at call time, no recompile needed
        for p in model.parameters():
            p.mul_(0.5)
    assert torch.equal(generate(model, prompt, max_new_tokens=12, compile=True), generate(model, prompt, max_new_tokens=12))
    from neoformer.kernels import pack_linears

    if pack_linears(model):  # modules swapped for others (dynamo's module guards are the ones skipped)
        assert torch.equal(generate(model, prompt, max_new_tokens=12, compile=True),
                           generate(model, prompt, max_new_tokens=12))
