"""--optimizer muon: torch.optim.Muon for the blocks' 2-D weights, AdamW for the rest; exact resume."""
import os
import signal

import torch

from neoformer import build_model
from neoformer.train import TrainConfig, causal_lm, fit
from neoformer.train.optim import BatchedMuon, MuonWithAdamW, build_optimizer, muon_param_groups

QUIET = dict(progress=False, plot=False, log_every=1, eval_every=0, save_every=0, optimizer="muon", lr=3e-3)


def _tiny():
    torch.manual_seed(0)
    return build_model("nexus-debug", vocab_size=32, max_seq_len=32)


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        start = torch.randint(0, 28, (8, 1), generator=g)
        ids = (start + torch.arange(17)) % 28 + 4  # learnable: each token is the previous plus one
        yield ids[:, :-1], ids[:, 1:]


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = _tiny()
    muon, adam = muon_param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon for p in g["params"]}
    on_adam = {names[id(p)] for g in adam for p in g["params"]}
    assert on_muon == {n for n, p in model.named_parameters() if n.startswith("decoder.blocks.") and p.ndim == 2}
    assert {"embed.tokens.weight", "lm_head.weight", "decoder.norm.weight"} <= on_adam
    assert on_muon.isdisjoint(on_adam) and len(on_muon | on_adam) == len(list(model.parameters()))
    assert any(n.endswith("attn.q_proj.weight") for n in on_muon) and any(n.endswith("ffn.down.weight") for n in on_muon)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer.muon, BatchedMuon)


def test_muon_trains_and_resumes_bit_exactly(tmp_path):
    def run(out, resume=False, stop_at=None):
        model = _tiny()
        losses = []

        def on_event(event, info):
            if event == "step":
                losses.append(info["loss"])
                if info["step"] == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)

        fit(model, causal_lm, _batches(), TrainConfig(max_steps=6, **{**QUIET, "save_every": 3}), out_dir=out,
            resume=resume, callbacks=[on_event], log=lambda *_: None)
        return model, losses

    straight, losses = run(tmp_path / "a")
    assert losses[-1] < losses[0]
    run(tmp_path / "b", stop_at=4)
    resumed, _ = run(tmp_path / "b", resume=tmp_path / "b" / "checkpoints" / "step-000003")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_batched_muon_matches_torch_muon_and_loads_its_state():
    """Batched Newton-Schulz (neoformer/train/optim.py) against torch.optim.Muon, matrix by matrix."""
    from neoformer.train.optim import BatchedMuon

    g = torch.Generator().manual_seed(0)
    shapes = [(16, 16), (16, 16), (40, 16), (16, 40), (24, 16)]
    make = lambda: [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]  # noqa: E731
    ours = make()
    start = [p.detach().clone() for p in ours]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    a, b = BatchedMuon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, start):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3)  # bit-equal here; bf16 matmuls may round otherwise elsewhere
        assert (p - p0).abs().max() > 0.01
    c = BatchedMuon([torch.nn.Parameter(q.detach().clone()) for q in theirs], **kwargs)
    c.load_state_dict(b.state_dict())  # torch's state dict format
    assert torch.equal(c.state_dict()["state"][0]["momentum_buffer"], b.state_dict()["state"][0]["momentum_buffer"])
