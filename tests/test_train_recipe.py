"""The modern-recipe switches (QK-norm, ReLU^2 FFN, logit soft-capping, zero-init output projections)
against float64 recomputations, and off = the model as it was."""
import pytest
import torch
import torch.nn.functional as F

from neoformer import ModelConfig
from neoformer.config import ConfigError
from neoformer.model import build_model
from neoformer.model.attention import Attention, AttnContext
from neoformer.model.ffn import FeedForward

BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=32)


def _cfg(**changes):
    return ModelConfig(**{**BASE, **changes})


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_qk_norm_equals_manual_attention_and_ignores_query_key_scale():
    cfg = _cfg(qk_norm=True, position="none")
    torch.manual_seed(0)
    attn = Attention(cfg, 0).double()
    x = _x(2, 9, 32)
    pos = torch.arange(9)[None]
    out = attn(x, AttnContext(pos, pos, causal=True))
    split = lambda t: t.view(2, 9, 4, 8).transpose(1, 2)  # noqa: E731
    rms = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(t.dtype).eps).sqrt()  # noqa: E731
    q, k, v = rms(split(attn.q_proj(x))), rms(split(attn.k_proj(x))), split(attn.v_proj(x))
    scores = (q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # normalised queries and keys: their projections' scale does not matter
        attn.q_proj.weight.mul_(7.0)
        attn.k_proj.weight.mul_(0.3)
    torch.testing.assert_close(attn(x, AttnContext(pos, pos, causal=True)), out, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="qk_norm"):
        _cfg(qk_norm=True, ngpt=True)


def test_relu2_ffn_equals_manual():
    torch.manual_seed(0)
    ffn = FeedForward(_cfg(activation="relu2")).double()
    x = _x(3, 5, 32)
    out, _ = ffn(x)
    torch.testing.assert_close(out, ffn.down(F.relu(ffn.up(x)) ** 2), rtol=1e-12, atol=1e-12)


def test_logit_softcap_bounds_logits_and_trains_through_the_chunked_loss():
    torch.manual_seed(0)
    model = build_model(_cfg(logit_softcap=2.0, tie_embeddings=False), dtype=torch.float64).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # raw logits far beyond the cap
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    hidden = model.forward_hidden(ids, use_cache=False).hidden
    logits = model.logits(hidden)
    raw = model.lm_head(hidden)
    assert raw.abs().max() > 4.0 and logits.abs().max() < 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0), rtol=1e-12, atol=1e-12)
    model.loss_chunk_rows = 5
    loss, _ = model.loss(ids, ids)
    ref = F.cross_entropy((2.0 * torch.tanh(raw / 2.0)).reshape(-1, 61), ids.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="logit_softcap"):
        _cfg(logit_softcap=0.0)


def test_zero_init_residual_starts_blocks_as_identity_and_still_learns():
    torch.manual_seed(0)
    model = build_model(_cfg(zero_init_residual=True, scaled_residual_init=True), dtype=torch.float64).train()
    zeroed = [n for n, p in model.named_parameters() if p.ndim == 2 and not p.abs().sum()]
    assert sorted(zeroed) == sorted(f"decoder.blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.o_proj", "ffn.down"))
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    hidden = model.forward_hidden(ids, use_cache=False).hidden
    torch.testing.assert_close(hidden, model.decoder.norm(model.embed.tokens(ids)))  # every block is the identity
    loss, _ = model.loss(ids, ids)
    loss.backward()
    assert model.decoder.blocks[0].ffn.down.weight.grad.abs().sum() > 0


def test_switches_off_leave_the_model_unchanged():
    """A config without the new fields (an old checkpoint's) builds the same weights and outputs."""
    old = {k: v for k, v in _cfg().to_dict().items() if k not in ("qk_norm", "logit_softcap", "zero_init_residual")}
    outs = []
    for cfg in (ModelConfig.from_dict(old), _cfg(qk_norm=False, logit_softcap=None, zero_init_residual=False)):
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        outs.append(model(torch.arange(10)[None])[0])
    assert torch.equal(*outs)


@pytest.mark.parametrize("changes", [dict(qk_norm=True), dict(logit_softcap=30.0), dict(activation="relu2")])
def test_hf_export_refuses_what_llama_cannot_express(changes):
    from neoformer.hf import stock_export_family

    with pytest.raises(ValueError, match="not supported"):
        stock_export_family(_cfg(**changes))
