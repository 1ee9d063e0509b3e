"""`fit(compile=True)` (``--compile``) trains every model kind and NeoFormer-X's RMC/NSB, and the compiled
step equals the eager one within fp32 tolerance. The chunked head loss runs eagerly inside the
compiled step (a deliberate graph break: model/head_loss.py)."""
import pytest
import torch

from neoformer import ModelConfig
from neoformer.model import build_model
from neoformer.train import TrainConfig, fit
from neoformer.train.objectives import objective_for

TINY = dict(vocab_size=61, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=16)


def _batches(vocab: int):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(1, vocab, (2, 8), generator=g)
        yield {"input_ids": ids, "targets": ids, "labels": ids, "src_ids": ids, "src_mask": torch.ones_like(ids),
               "tgt_in": ids, "tgt_out": ids}


def _train(cfg: ModelConfig, compile: bool):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.loss_chunk_rows = 5  # several chunks, as a large vocabulary would have
    losses = []
    train = TrainConfig(max_steps=2, batch_size=2, seq_len=8, compile=compile, progress=False, plot=False, eval_every=0,
                        save_every=0, log_every=1, threads=1, precision="fp32", warmup_steps=0)
    fit(model, objective_for(model), _batches(cfg.vocab_size), train, log=lambda *a: None,
        callbacks=[lambda event, info: losses.append(info["loss"]) if event == "step" else None])
    return losses, [p.detach().clone() for p in model.parameters()]


def _assert_compiled_equals_eager(cfg: ModelConfig) -> None:
    torch._dynamo.reset()
    eager_losses, eager_weights = _train(cfg, compile=False)
    compiled_losses, compiled_weights = _train(cfg, compile=True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for got, want in zip(compiled_weights, eager_weights):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~19 s of inductor compiling on 2 cold cores: .ci/run runs it by name after `make test`
def test_compiled_step_equals_eager_decoder():
    _assert_compiled_equals_eager(ModelConfig(**TINY))


@pytest.mark.slow
@pytest.mark.parametrize("changes", [
    {"kind": "encoder", "tie_embeddings": True},
    {"kind": "encoder_decoder", "n_encoder_layers": 1, "tie_embeddings": True},
    {"rmc": True, "rmc_mem_size": 4, "nsb": True, "nsb_rules": 4, "nsb_rule_dim": 8},
], ids=["encoder", "encoder_decoder", "rmc-nsb"])
def test_compiled_step_equals_eager(changes):
    _assert_compiled_equals_eager(ModelConfig(**{**TINY, **changes}))
