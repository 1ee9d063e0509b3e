"""What training saves for backward: the recomputing RMSNorm and gated FFN, one autocast cast per shared
input, bf16 inputs of the chunked attention. Each equals the plain path and saves the bytes it claims."""
import copy

import pytest
import torch
import torch.nn.functional as F

from neoformer.config import ModelConfig
from neoformer.model import build_model
from neoformer.model.attention import Attention, AttnContext
from neoformer.model.chunked_attention import chunked_attention
from neoformer.model.ffn import FeedForward
from neoformer.model.norms import RMSNorm, _RMSNormFunction
from neoformer.train import causal_lm


def _saved_storages(fn):
    """{data_ptr: (nbytes, dtype)} of the non-parameter storages autograd saves while ``fn()`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def _without(params, seen):
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    return {k: v for k, v in seen.items() if k not in ptrs}


def test_rmsnorm_gradients_match_fp64_finite_differences_and_the_plain_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(16, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, w))
    norm = RMSNorm(16)
    norm.weight.data.uniform_(0.5, 1.5, generator=g)
    x32 = torch.randn(4, 7, 16, generator=g, requires_grad=True)
    grad = torch.randn(4, 7, 16, generator=g)
    out = norm(x32)
    gx, gw = torch.autograd.grad(out, (x32, norm.weight), grad)
    plain = norm.weight * F.rms_norm(x32, (16,), eps=norm.eps)
    px, pw = torch.autograd.grad(plain, (x32, norm.weight), grad)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(gx, px, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, pw, rtol=1e-5, atol=1e-6)


def test_rmsnorm_saves_its_input_and_one_statistic_per_row():
    norm = RMSNorm(32)
    x = torch.randn(6, 32, requires_grad=True)
    _, seen = _saved_storages(lambda: norm(x))
    assert sorted(n for n, _ in _without(norm.parameters(), seen).values()) == [6 * 4, 6 * 32 * 4]


def _ffn(activation, bias):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, ffn_hidden=64, activation=activation, bias=bias, vocab_size=50, n_layers=1, n_heads=2)
    return FeedForward(cfg)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "glu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_recomputing_gated_ffn_equals_the_plain_path_bit_for_bit(activation, bias, amp):
    ffn = _ffn(activation, bias)
    plain = copy.deepcopy(ffn)
    plain.down.register_forward_hook(lambda *args: None)  # a hook on `down` keeps the plain path
    assert ffn._recompute_gated() and not plain._recompute_gated()
    x = torch.randn(2, 7, 32, requires_grad=True)
    grad = torch.randn(2, 7, 32)
    results = []
    for module in (ffn, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out, _ = module(x)
        results.append((out, *torch.autograd.grad(out, (x, *module.parameters()), grad.to(out.dtype))))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_gated_ffn_under_autocast_saves_one_input_copy_gate_and_up():
    ffn = _ffn("swiglu", False)
    x = torch.randn(100, 32, requires_grad=True) * 1.0  # not a leaf: autocast caches only leaves' casts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, seen = _saved_storages(lambda: ffn(x))
    activations = [n for n, dtype in _without(ffn.parameters(), seen).values() if n > 64 * 32 * 2]  # not weight casts
    # one bf16 copy of x (100 x 32), gate and up (100 x 64 each); not silu(gate), the product or a second x copy
    assert sorted(activations) == sorted([100 * 32 * 2, 100 * 64 * 2, 100 * 64 * 2])


def test_gated_ffn_without_grad_or_through_a_replaced_down_runs_the_plain_path():
    ffn = _ffn("swiglu", False)
    with torch.no_grad():
        assert not ffn._recompute_gated()
    assert ffn._recompute_gated()

    class Wrapped(torch.nn.Linear):
        pass

    ffn.down = Wrapped(64, 32, bias=False)
    assert not ffn._recompute_gated()


def test_attention_projections_share_one_autocast_copy_of_their_input():
    # heads 4 wide: q, k, v and the output projection's input are 16 wide, so only copies of x are 6 x 32
    cfg = ModelConfig(d_model=32, n_heads=4, head_dim=4, vocab_size=50, n_layers=1, position="none")
    attn = Attention(cfg, 0)
    x = torch.randn(1, 6, 32, requires_grad=True) * 1.0  # not a leaf: autocast caches only leaves' casts
    ctx = AttnContext(q_pos=torch.arange(6)[None], k_pos=torch.arange(6)[None], causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, seen = _saved_storages(lambda: attn(x, ctx))
    input_copies = [n for n, dtype in _without(attn.parameters(), seen).values()
                    if dtype == torch.bfloat16 and n == 6 * 32 * 2]
    assert len(input_copies) == 1  # one copy shared by the q, k and v projections (three without cast_once)


def test_chunked_attention_keeps_bf16_inputs_and_matches_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g) for _ in range(3))
    halves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    fulls = [t.bfloat16().float().requires_grad_() for t in (q, k, v)]
    out_half, seen = _saved_storages(lambda: chunked_attention(*halves, None, True, 0.25, 0.2, chunk=8, seed=7))
    out_full = chunked_attention(*fulls, None, True, 0.25, 0.2, chunk=8, seed=7)
    assert out_half.dtype == torch.bfloat16
    saved_dtypes = sorted(str(dtype) for _, dtype in seen.values())
    assert saved_dtypes == ["torch.bfloat16"] * 4 + ["torch.float32"]  # q, k, v, out and the fp32 log-sum-exp
    torch.testing.assert_close(out_half.float(), out_full, rtol=2e-2, atol=2e-2)
    grad = torch.randn(out_full.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out_half, halves, grad.bfloat16()), torch.autograd.grad(out_full, fulls, grad)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_lumi_like_training_step_equals_the_plain_path():
    """A whole model (RMSNorm, SwiGLU, dropout attention) against the same model with every recomputation off."""
    cfg = dict(norm="rmsnorm", activation="swiglu", attn_dropout=0.1, hidden_dropout=0.1, d_model=32, n_layers=2,
               n_heads=4, ffn_hidden=64, vocab_size=64, max_seq_len=16)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg))
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, FeedForward):
            module.down.register_forward_hook(lambda *args: None)
        if isinstance(module, RMSNorm):
            module.forward = lambda x, m=module: m.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=m.eps).to(x.dtype)
    ids = torch.randint(0, 64, (2, 17))
    losses, grads = [], []
    for m in (model, plain):
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = causal_lm(m, (ids[:, :-1], ids[:, 1:]))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-4)
