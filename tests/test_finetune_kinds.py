"""neoformer finetune on encoder (masked LM) and encoder-decoder (seq2seq) checkpoints: LoRA and full."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from neoformer import build_model
from neoformer.checkpoint import load_checkpoint, read_config, save_single_checkpoint
from neoformer.cli import main
from neoformer.config import IGNORE_INDEX, ModelConfig
from neoformer.finetune import AdapterModel, LoraConfig, LoraLinear, add_lora, finetune, load_adapter
from neoformer.finetune.tasks import build_task
from neoformer.tokenizer import CharTokenizer
from neoformer.train.run_config import TrainConfig

KINDS = {
    "encoder": dict(kind="encoder", fused_qkv=True, position="learned", learned_pos_offset=1),
    "encoder_decoder": dict(kind="encoder_decoder", n_encoder_layers=1),
}
WORDS = "cat dog sun hello world".split()


@pytest.fixture
def tokenizer():
    return CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz :"])


def _base(tmp_path, tokenizer, kind):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=64, **KINDS[kind])
    return save_single_checkpoint(tmp_path / f"base-{kind}", build_model(config), {}, tokenizer)


def _data(tmp_path, kind):
    """Encoder: text lines; encoder-decoder: "reverse" pairs, half as Alpaca records."""
    pairs = [(f"{a} {b}", f"{b} {a}") for a in WORDS for b in WORDS if a != b]
    if kind == "encoder":
        path = tmp_path / "text.jsonl"
        records = [{"text": f"{s} : {t}"} for s, t in pairs]
    else:
        path = tmp_path / "pairs.jsonl"
        records = [{"source": s, "target": t} if i % 2 else {"instruction": s, "output": t}
                   for i, (s, t) in enumerate(pairs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _train(steps, lr=1e-2):
    return TrainConfig(max_steps=steps, lr=lr, batch_size=4, eval_every=0, save_every=0, progress=False, log_every=1,
                       plot=False, device="cpu", precision="fp32", threads=1, warmup_steps=0, weight_decay=0.0)


def _fixed_batch(kind, data, model, tokenizer):
    task = build_task(kind, data, model, tokenizer, {}, seq_len=32, train_on="assistant", pack=True,
                      val_fraction=0.0, batch_size=8, seed=123, mask_prob=0.3)
    return task.objective, next(task.train)


def _base_data_and_batch(tmp_path, tokenizer, kind):
    """A tiny base checkpoint of this kind, its fine-tuning data, the loaded base
    model, and the objective with one fixed batch to compare losses on."""
    base, data = _base(tmp_path, tokenizer, kind), _data(tmp_path, kind)
    base_model = load_checkpoint(base)[0]
    return (base, data, base_model, *_fixed_batch(kind, data, base_model, tokenizer))


def _loss(objective, model, batch):
    with torch.no_grad():
        return float(objective(model.eval(), batch)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_lora_run_lowers_the_loss_trains_only_the_adapter_and_merges_to_equal_logits(tmp_path, tokenizer, kind):
    base, data, base_model, objective, batch = _base_data_and_batch(tmp_path, tokenizer, kind)
    assert main(["finetune", str(base), "--data", str(data), "--out", str(tmp_path / "run"), "--lora",
                 "r=8,alpha=32,dropout=0", "--targets", "all-linear", "--max-steps", "30", "--lr", "3e-2", "--batch", "4", "--seq", "32",
                 "--val-fraction", "0", "--no-progress", "--threads", "1", "--precision", "fp32"]) == 0
    run = tmp_path / "run" / "latest"
    config = read_config(run)
    assert config["contents"] == "adapter" and config["finetune"]["objective"] == {"encoder": "mlm"}.get(kind, "seq2seq")
    from safetensors.torch import load_file

    assert all(".lora_" in key for key in load_file(run / "model.safetensors"))  # only the adapter is saved
    adapter, _, _ = load_adapter(run)
    # a fixed batch (seeded masks), not one it trained on: a random tiny base with a frozen embedding and head
    # moves slowly (3.47 -> 3.37 encoder, 3.48 -> 3.21 encoder-decoder); an adapter that did not train stays equal
    assert _loss(objective, adapter, batch) < 0.98 * _loss(objective, base_model, batch)
    # merge: a normal checkpoint whose logits equal base + adapter
    assert main(["finetune", "merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = load_checkpoint(tmp_path / "merged")[0]
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    x = torch.randint(5, tokenizer.vocab_size, (2, 11))
    with torch.no_grad():
        args = (x, x) if kind == "encoder_decoder" else (x,)
        unmerged, folded = adapter.eval()(*args), merged.eval()(*args)
        unmerged, folded = [out[0] if isinstance(out, tuple) else out for out in (unmerged, folded)]
    # lr 3e-2 on a random tiny base drives the FFN outputs to ~4e3 (measured), so the fp32 rounding of W x + B A x
    # against (W + B A) x (~1e-7 relative) reaches ~2e-5 at the logits; a wrong merge is off by O(0.1)
    torch.testing.assert_close(folded, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_parameters_get_gradients_from_the_kinds_objective(tmp_path, tokenizer, kind):
    model = load_checkpoint(_base(tmp_path, tokenizer, kind))[0]
    objective, batch = _fixed_batch(kind, _data(tmp_path, kind), model, tokenizer)
    add_lora(model, LoraConfig(r=4, targets=("q", "k", "v", "o", "up", "down")))
    wrapped = AdapterModel(model, LoraConfig(r=4)).train()
    objective(wrapped, batch)[0].backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (".lora_" in name), name
    assert all(m.lora_B.weight.grad.abs().max() > 0 for m in model.modules() if isinstance(m, LoraLinear))
    if kind == "encoder_decoder":  # cross-attention projections are adapted too
        assert any("cross" in n for n, m in model.named_modules() if isinstance(m, LoraLinear))


@pytest.mark.parametrize("kind", KINDS)
def test_full_finetune_writes_a_normal_checkpoint_with_lower_loss(tmp_path, tokenizer, kind):
    base, data, base_model, objective, batch = _base_data_and_batch(tmp_path, tokenizer, kind)
    result = finetune(base, data, tmp_path / "full", train=_train(30, lr=3e-3), seq_len=32, val_fraction=0.0,
                      log=lambda *_: None)
    model, loaded_tokenizer, config = load_checkpoint(result.checkpoint)
    assert config.get("contents", "full") == "full" and loaded_tokenizer is not None
    assert _loss(objective, model, batch) < 0.9 * _loss(objective, base_model, batch)


def test_mlm_batches_mask_only_ordinary_tokens_and_resume_bit_exactly(tmp_path, tokenizer):
    base = _base(tmp_path, tokenizer, "encoder")
    data = _data(tmp_path, "encoder")
    model = load_checkpoint(base)[0]
    _, batch = _fixed_batch("encoder", data, model, tokenizer)
    labelled = batch["labels"] != IGNORE_INDEX
    assert "cu_seqlens" in batch and labelled.any()
    assert not torch.isin(batch["labels"][labelled], torch.tensor(sorted(tokenizer.special_ids))).any()
    quiet = dict(lora=LoraConfig(r=4, dropout=0.1), seq_len=32, val_fraction=0.0, log=lambda *_: None)
    straight = finetune(base, data, tmp_path / "a", train=_train(4), **quiet)

    def stop_at_step_2(event, info):
        if event == "step" and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert finetune(base, data, tmp_path / "b", train=_train(4), callbacks=[stop_at_step_2], **quiet).step == 2
    resumed = finetune(base, data, tmp_path / "b", train=_train(4), resume=True, **quiet)
    from safetensors.torch import load_file

    first, second = (load_file(r.checkpoint / "model.safetensors") for r in (straight, resumed))
    assert resumed.step == 4 and set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("kind, record, message", [
    ("encoder", {"messages": [{"role": "user", "content": "a"}]}, "an encoder fine-tunes with masked-LM on text"),
    ("encoder_decoder", {"text": "abc"}, "pairs.jsonl:1: an encoder-decoder fine-tunes on"),
    ("encoder_decoder", {"source": "abc", "target": " "}, "pairs.jsonl:1: the target is empty"),
])
def test_wrong_data_for_the_kind_is_one_line(tmp_path, tokenizer, capsys, kind, record, message):
    base = _base(tmp_path, tokenizer, kind)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(record) + "\n")
    code = main(["finetune", str(base), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
