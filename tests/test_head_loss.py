"""The chunked head loss (model/head_loss.py) equals the plain full-logits loss, values and gradients
in float64, for every objective; and it never builds a tensor of B x T x V elements."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from neoformer import ModelConfig
from neoformer.model import build_model
from neoformer.model.head_loss import chunked_head_loss
from neoformer.train.objectives import causal_lm, masked_lm, seq2seq

V = 97
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=32)


def _model(**changes):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**BASE, **changes}), dtype=torch.float64).train()


def _batch(kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 11), generator=g)
    targets = torch.randint(0, V, (3, 11), generator=g)
    targets[0, :4] = -100  # ignored positions (prompt masks, MLM's unmasked tokens)
    if kind == "decoder":
        return causal_lm, (ids, targets)
    if kind == "encoder":
        mask = torch.ones(3, 11, dtype=torch.long)
        mask[1, -3:] = 0
        return masked_lm, {"input_ids": ids, "labels": targets, "attention_mask": mask}
    src = torch.randint(1, V, (3, 7), generator=g)
    return seq2seq, {"src_ids": src, "src_mask": torch.ones_like(src), "tgt_in": ids, "tgt_out": targets}


def _loss_and_grads(model, objective, batch, rows):
    model.loss_chunk_rows = rows
    model.zero_grad(set_to_none=True)
    loss, _ = objective(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [
    ("decoder", {}),
    ("decoder", {"tie_embeddings": True}),
    ("decoder", {"ngpt": True, "norm": "rmsnorm", "tie_embeddings": False}),
    ("decoder", {"moe_experts": 4, "moe_top_k": 2, "moe_aux_weight": 0.1}),
    ("decoder", {"rmc": True, "rmc_mem_size": 4, "nsb": True, "nsb_rules": 4, "nsb_rule_dim": 8}),
    ("decoder", {"logit_softcap": 3.0}),  # the cap runs inside each chunk
    ("encoder", {"tie_embeddings": True}),
    ("encoder_decoder", {"n_encoder_layers": 1, "tie_embeddings": True}),
]


@pytest.mark.parametrize("kind,changes", CASES, ids=[f"{k}-{'-'.join(c) or 'plain'}" for k, c in CASES])
def test_chunked_loss_equals_plain_loss_and_gradients_fp64(kind, changes):
    model = _model(kind=kind, **changes)
    objective, batch = _batch(kind)
    plain_loss, plain_grads = _loss_and_grads(model, objective, batch, rows=0)
    chunk_loss, chunk_grads = _loss_and_grads(model, objective, batch, rows=4)  # 33 rows -> 9 chunks, a ragged last
    torch.testing.assert_close(chunk_loss, plain_loss, rtol=1e-12, atol=1e-12)
    assert chunk_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(chunk_grads[name], plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    if changes.get("ngpt"):
        assert plain_grads["logit_scale"].abs().sum() > 0  # the nGPT scale is trained through the chunks


def test_generic_chunk_loss_serves_a_distillation_kl():
    """Any per-chunk loss works: a KL to teacher logits (what distillation needs) matches autograd on full logits."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(V, 8, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, V, dtype=torch.float64, generator=g)

    def kl_sum(logits, teacher_logits):
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="sum")

    chunked = chunked_head_loss(hidden, weight, (teacher,), kl_sum, rows=3)
    grads = torch.autograd.grad(chunked * 0.5, (hidden, weight))  # grad_output other than 1 is applied
    plain = kl_sum((hidden @ weight.t()).reshape(10, V), teacher.reshape(10, V))
    expected = torch.autograd.grad(plain * 0.5, (hidden, weight))
    torch.testing.assert_close(chunked, plain)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_grows_with_the_chunk_not_with_batch_times_vocab():
    model = _model(vocab_size=1000)
    ids = torch.randint(0, 1000, (4, 32))
    for rows, expect_full in ((0, True), (16, False)):
        model.loss_chunk_rows = rows
        with _LargestOutput() as probe:
            loss, _ = causal_lm(model, (ids, ids))
            loss.backward()
        assert (probe.largest >= 4 * 32 * 1000) is expect_full, (rows, probe.largest)
    assert probe.largest <= max(16 * 1000, 1000 * 32)  # a chunk's logits, or the head's weight


def test_chunked_loss_under_bf16_autocast_is_close_to_plain():
    model = _model().float()
    objective, batch = _batch("decoder")
    results = []
    for rows in (0, 5):
        model.loss_chunk_rows = rows
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = objective(model, batch)
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone(), model.embed.tokens.weight.grad.clone()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_frozen_head_and_no_grad_evaluation():
    """Fine-tuning freezes the head (LoRA): the rest still gets exact gradients; evaluation needs none."""
    model = _model()
    model.lm_head.weight.requires_grad_(False)
    objective, batch = _batch("decoder")
    plain_loss, plain_grads = _loss_and_grads(model, objective, batch, rows=0)
    chunk_loss, chunk_grads = _loss_and_grads(model, objective, batch, rows=4)
    assert "lm_head.weight" not in chunk_grads and chunk_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(chunk_grads[name], plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():
        model.loss_chunk_rows = 4
        torch.testing.assert_close(objective(model.eval(), batch)[0], plain_loss.detach(), rtol=1e-12, atol=1e-12)


def _cpu_kernels():
    from neoformer.kernels import kernels_available, unavailable_reason

    if not kernels_available():
        pytest.skip(f"CPU kernels unavailable: {unavailable_reason()}")
    from neoformer.kernels.ops import cross_entropy_rows

    return cross_entropy_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_cross_entropy_equals_float64(dtype):
    """loss_cpu.cpp: loss and in-place gradient (softmax - onehot) of every row, ignored rows zero, a vocabulary
    that is not a multiple of the 16-lane vectors; against F.cross_entropy in float64 on the same inputs."""
    fused = _cpu_kernels()
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 1003, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 1003, (9,), generator=g)
    targets[2] = -100
    targets[5] = 1002  # the last lane of the tail
    exact = logits.double().requires_grad_()
    want = F.cross_entropy(exact, targets, ignore_index=-100, reduction="sum")
    want.backward()
    grad = logits.clone()
    got = fused(grad, targets, True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-5)
    # bf16: within one rounding of the exact gradient (the kernel rounds once, as Tensor.to does)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(grad.double(), exact.grad.to(dtype).double(), **tol)
    assert torch.count_nonzero(grad[2]) == 0
    untouched = logits.clone()
    torch.testing.assert_close(fused(untouched, targets, False), got)  # loss only: logits left as they were
    assert torch.equal(untouched, logits)


def test_fused_cpu_cross_entropy_rejects_and_flags_bad_rows():
    fused = _cpu_kernels()
    logits = torch.randn(3, 40)
    with pytest.raises(RuntimeError, match="out of bounds"):
        fused(logits.clone(), torch.tensor([1, 40, 2]), True)
    logits[1, 7] = float("inf")
    grad = logits.clone()
    loss = fused(grad, torch.tensor([1, 2, 3]), True)
    assert torch.isnan(loss) and torch.isnan(grad[1]).all() and torch.isfinite(grad[0]).all()
    assert fused(torch.randn(2, 8, dtype=torch.float64), torch.tensor([0, 1]), True) is None  # fp64: PyTorch's path


def test_chunked_loss_runs_the_fused_kernel_and_matches_plain_fp32(monkeypatch):
    """An fp32 CPU model's chunked loss goes through the kernel (counted) and equals the full-logits loss."""
    fused = _cpu_kernels()
    from neoformer.model import head_loss

    calls = []
    monkeypatch.setattr(head_loss, "CROSS_ENTROPY_KERNELS", [lambda *a: calls.append(1) or fused(*a)])
    model = _model().float()
    objective, batch = _batch("decoder")
    plain_loss, plain_grads = _loss_and_grads(model, objective, batch, rows=0)
    assert not calls
    chunk_loss, chunk_grads = _loss_and_grads(model, objective, batch, rows=4)
    assert len(calls) == 9  # 33 rows in chunks of 4
    torch.testing.assert_close(chunk_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(chunk_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
