"""fit(), optimizers, schedule and objectives on tiny models."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from helpers import pattern_batches

from neoformer import build_model
from neoformer.train import (
    Lion, TrainConfig, TrainingDiverged, WarmupCosine, build_optimizer, causal_lm, fit, list_checkpoints,
    load_model, masked_lm, objective_for, seq2seq,
)
from neoformer.checkpoint import read_config
from neoformer.train.fit import move_batch



QUIET = dict(progress=False, plot=False, log_every=1, eval_every=0, save_every=0)


def quiet(_msg):
    pass


def tiny(preset="neoformer-x-debug", **overrides):
    torch.manual_seed(0)
    return build_model(preset, vocab_size=32, max_seq_len=32, **overrides)


def test_fit_lowers_loss_with_rmc_and_nsb():
    model = tiny()
    episodic = model.rmc.episodic.clone()
    cfg = TrainConfig(max_steps=40, lr=3e-3, warmup_steps=4, **QUIET)
    val = [next(pattern_batches(seed=99)) for _ in range(2)]
    result = fit(model, causal_lm, pattern_batches(), cfg, val_batches=val, log=quiet)
    assert result.stop_reason == "max_steps" and result.step == 40
    assert result.val_loss < math.log(32) - 1.0, result
    assert not torch.equal(model.rmc.episodic, episodic), "RMC update after each step was not applied"


def test_grad_accumulation_equals_big_batch():
    exact = dict(QUIET, precision="fp32")  # an fp32 identity: `auto` is bf16 on CPUs with native bf16

    def run(batch, accum):
        model = tiny("nexus-debug")
        data = pattern_batches(batch=batch, seed=1)
        cfg = TrainConfig(max_steps=3, batch_size=batch, grad_accum=accum, lr=1e-2, warmup_steps=0, **exact)
        fit(model, causal_lm, data, cfg, log=quiet)
        return model

    big = run(8, 1)
    # the same 8 rows, split in two micro-batches of 4
    def halves():
        for x, y in pattern_batches(batch=8, seed=1):
            yield x[:4], y[:4]
            yield x[4:], y[4:]

    model = tiny("nexus-debug")
    cfg = TrainConfig(max_steps=3, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=0, **exact)
    fit(model, causal_lm, halves(), cfg, log=quiet)
    for (name, a), b in zip(big.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_warmup_cosine_schedule_values():
    s = WarmupCosine(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert s(0) == pytest.approx(0.1)  # first step: lr * 1/10
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # half way: min + (max - min) / 2
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)
    assert s(10, time_fraction=0.5) == pytest.approx(0.55)  # a time budget drives the cosine too
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert TrainConfig(max_steps=30).warmup == 3 and TrainConfig(max_steps=5000).warmup == 100


def lion_reference(p, grads, lr, betas, wd):
    """The update rule of Chen et al. 2023 in float64."""
    p, m = p.double().clone(), torch.zeros_like(p, dtype=torch.float64)
    for g in grads:
        g = g.double()
        c = betas[0] * m + (1 - betas[0]) * g
        p = p - lr * (torch.sign(c) + wd * p)
        m = betas[1] * m + (1 - betas[1]) * g
    return p


def test_lion_matches_float64_reference():
    torch.manual_seed(0)
    start = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(6)]
    param = torch.nn.Parameter(start.clone())
    opt = Lion([param], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = lion_reference(start, grads, 1e-2, (0.9, 0.99), 0.1)
    torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=1e-5)


def test_optimizer_groups_and_kernels():
    model = tiny()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(model.embed.tokens.weight) in decayed
    assert all(id(p) not in decayed for n, p in model.named_parameters() if p.ndim < 2)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))  # tied head counted once
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="lion")), Lion)
    ngpt = tiny("nexus-debug", ngpt=True)
    assert all(g["weight_decay"] == 0.0 for g in build_optimizer(ngpt, TrainConfig()).param_groups)


def test_lion_trains():
    model = tiny("nexus-debug")
    cfg = TrainConfig(max_steps=30, optimizer="lion", lr=1e-3, beta2=0.99, warmup_steps=3, **QUIET)
    result = fit(model, causal_lm, pattern_batches(), cfg, val_batches=[next(pattern_batches(seed=5))], log=quiet)
    assert result.val_loss < math.log(32) - 0.5


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny("nexus-debug")

    def exploding(model, batch):
        loss, stats = causal_lm(model, batch)
        if exploding.calls >= 7:
            loss = loss * float("nan")
        exploding.calls += 1
        return loss, stats

    exploding.calls = 0
    cfg = TrainConfig(max_steps=20, **{**QUIET, "save_every": 5})
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 8.*step-000005"):
        fit(model, exploding, pattern_batches(), cfg, out_dir=tmp_path, log=quiet)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000005"]
    assert read_config(tmp_path)["step"] == 5
    reloaded, _ = load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


@pytest.mark.parametrize("signum, reason", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_signal_saves_checkpoint_and_returns(tmp_path, signum, reason):
    model = tiny("nexus-debug")

    def send_at_step_3(event, info):
        if event == "step" and info["step"] == 3:
            os.kill(os.getpid(), signum)

    cfg = TrainConfig(max_steps=50, **QUIET)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    result = fit(model, causal_lm, pattern_batches(), cfg, out_dir=tmp_path, callbacks=[send_at_step_3], log=quiet)
    assert result.stop_reason == reason and result.step == 3
    assert result.checkpoint.name == "step-000003"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_resume_replays_a_stateless_iterator(tmp_path):
    def run(out, resume=False, stop_at=None):
        model = tiny("nexus-debug")
        cfg = TrainConfig(max_steps=6, **{**QUIET, "save_every": 3})

        def stop(event, info):
            if event == "step" and info["step"] == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

        fit(model, causal_lm, pattern_batches(), cfg, out_dir=out, resume=resume, callbacks=[stop], log=quiet)
        return model

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=4)  # checkpoints at 3 (periodic) and 4 (on the signal)
    resumed = run(tmp_path / "b", resume=tmp_path / "b" / "checkpoints" / "step-000003")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_limits_max_tokens_and_time_budget():
    cfg = TrainConfig(max_steps=100, batch_size=8, max_tokens=8 * 16 * 5, **QUIET)
    assert fit(tiny("nexus-debug"), causal_lm, pattern_batches(), cfg, log=quiet).step == 5
    cfg = TrainConfig(max_steps=10**6, time_budget=0.3, **QUIET)
    result = fit(tiny("nexus-debug"), causal_lm, pattern_batches(), cfg, log=quiet)
    assert result.stop_reason == "time_budget" and 0 < result.step < 10**6


def test_gradient_checkpointing_and_bf16_autocast():
    batch = next(pattern_batches())
    losses = {}
    for checkpointing in (False, True):
        model = tiny("lumi-debug")
        cfg = TrainConfig(max_steps=2, gradient_checkpointing=checkpointing, warmup_steps=0, **QUIET)
        losses[checkpointing] = fit(model, causal_lm, iter([batch] * 2), cfg, log=quiet).train_loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    cfg = TrainConfig(max_steps=2, precision="bf16", **QUIET)
    assert math.isfinite(fit(tiny("lumi-debug"), causal_lm, pattern_batches(), cfg, log=quiet).train_loss)


def test_ngpt_weights_stay_normalized():
    model = tiny("nexus-debug", ngpt=True)
    fit(model, causal_lm, pattern_batches(), TrainConfig(max_steps=3, lr=1e-2, **QUIET), log=quiet)
    w = model.decoder.blocks[0].attn.q_proj.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]), rtol=0, atol=1e-4)


def test_mlm_objective_trains_a_step():
    torch.manual_seed(0)
    model = build_model("neobert-debug", vocab_size=32, max_seq_len=32)
    ids = torch.randint(4, 32, (4, 16))
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    inputs = ids.clone()
    inputs[:, ::4] = 3
    batch = {"input_ids": inputs, "labels": labels, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    assert objective_for(model) is masked_lm
    loss, stats = masked_lm(model, batch)
    assert int(stats["targets"]) == 16 and math.isfinite(loss.item())
    before = [p.clone() for p in model.parameters()]
    result = fit(model, masked_lm, iter([batch] * 3), TrainConfig(max_steps=3, lr=1e-2, **QUIET), log=quiet)
    assert result.step == 3 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_seq2seq_objective_trains_a_step():
    from neoformer.data import Seq2SeqBatch

    torch.manual_seed(0)
    model = build_model("nima-transformer-debug", vocab_size=32, max_seq_len=32)
    src = torch.randint(4, 32, (4, 10))
    batch = Seq2SeqBatch(src, torch.ones_like(src, dtype=torch.bool), torch.cat([torch.ones(4, 1, dtype=torch.long),
                         src.flip(1)[:, :-1]], 1), src.flip(1))
    assert objective_for(model) is seq2seq
    first, _ = seq2seq(model, batch)
    cfg = TrainConfig(max_steps=15, lr=3e-3, warmup_steps=1, **QUIET)
    fit(model, seq2seq, iter([batch] * 15), cfg, log=quiet)
    model.eval()
    with torch.no_grad():
        assert seq2seq(model, batch)[0].item() < first.item() - 0.5


def test_move_batch_handles_containers():
    from neoformer.data import Seq2SeqBatch

    t = torch.zeros(2)
    moved = move_batch({"a": (t, [t]), "b": Seq2SeqBatch(t, t, t, t), "c": 3}, torch.device("cpu"))
    assert isinstance(moved["b"], Seq2SeqBatch) and moved["c"] == 3


def test_thread_tuner_drops_to_one_thread_when_two_are_slower_and_comes_back():
    from neoformer.train.monitor import ThreadTuner

    torch.set_num_threads(2)
    notes = []
    tuner = ThreadTuner(notes.append, every=0.0, probe=3, warmup=2)
    for seconds in [5, 5, 1.0, 1.0, 1.0]:  # warm-up, then 3 steps with 2 threads
        tuner.after_step(seconds)
    assert torch.get_num_threads() == 1  # now probing 1 thread
    for seconds in [0.1, 0.1, 0.1]:
        tuner.after_step(seconds)
    assert torch.get_num_threads() == 1 and "1 CPU thread now" in notes[-1]
    tuner.after_step(0.1)  # idle period over (every=0): re-measure 1 thread ...
    for seconds in [0.1, 0.1, 0.1, 0.05, 0.05, 0.05]:  # ... then 2 threads, which are faster again
        tuner.after_step(seconds)
    assert torch.get_num_threads() == 2 and "2 CPU threads now" in notes[-1]
    for seconds in [0.05] + [0.05] * 3 + [0.06] * 3:  # idle over; 1 thread not faster: stay at 2
        tuner.after_step(seconds)
    assert torch.get_num_threads() == 2 and len(notes) == 2
