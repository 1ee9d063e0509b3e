"""neoformer.compress: each reduction is exact where it should be (nothing removed, zeroed parts removed,
full-width rotation), yields a model that trains, and the KD objective / distillation resume are right."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from neoformer.checkpoint import load_checkpoint, save_checkpoint
from neoformer.config import ConfigError
from neoformer.cli import main
from neoformer.compress import (
    CompressError, CompressPlan, Distillation, block_influence, choose_layers, keep_layers, kd_loss, prune_ffn,
    prune_heads, recipe_plan, reduce, reduce_tokenizer, rotate_width, slice_vocab,
)
from neoformer.compress.heads import entropy_importance, head_importance
from neoformer.compress.logit_cache import build_logit_cache, open_logit_cache, teacher_fingerprint
from neoformer.compress.vocab import token_counts
from neoformer.model import build_model
from neoformer.tokenizer import train_bpe
from neoformer.train import TrainConfig, causal_lm, fit
from neoformer.train.distill import sparse_kd_loss

TEXT = ("the cat sat on a mat while dogs ran past small red houses; "
        "über café naïve — 東京 and emoji 🙂 appear rarely\n") * 40


def _teacher(**changes) -> torch.nn.Module:
    """A tiny Llama-shaped GQA decoder whose norm gains are not 1 (so folding them matters)."""
    torch.manual_seed(0)
    model = build_model("nexus-debug", n_layers=4, **changes).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _batches(vocab=128, n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, vocab, (2, 16), generator=g), torch.randint(0, vocab, (2, 16), generator=g))
            for _ in range(n)]


def _logits(model, x):
    return model(x, use_cache=False)[0]


def _trains(model, batches) -> None:
    cfg = TrainConfig(max_steps=3, lr=1e-2, eval_every=0, save_every=0, progress=False, plot=False, precision="fp32",
                      device="cpu", warmup_steps=0)
    before = _logits(model, batches[0][0]).detach()
    result = fit(model, causal_lm, iter(batches * 3), cfg, log=lambda *_: None)
    assert result.step == 3 and torch.isfinite(torch.tensor(result.train_loss))
    assert not torch.allclose(before, _logits(model.eval(), batches[0][0]))


def test_nothing_removed_reproduces_the_teacher_exactly():
    teacher, batches = _teacher(), _batches()
    student = reduce(teacher, None, CompressPlan(), batches, log=lambda *_: None).model
    assert student is not teacher
    assert torch.equal(_logits(student, batches[0][0]), _logits(teacher, batches[0][0]))
    full = CompressPlan(layers="4", heads=4, ffn_dim=128, d_model=64, width_method="channels")
    student = reduce(teacher, None, full, batches, log=lambda *_: None).model
    torch.testing.assert_close(_logits(student, batches[0][0]), _logits(teacher, batches[0][0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_pca_rotation_at_full_width_is_lossless(tied):
    teacher, batches = _teacher(tie_embeddings=tied), _batches()
    student = rotate_width(teacher, 64, batches)
    assert student.config.d_model == 64 and not student.config.tie_embeddings  # final gain folded into the head
    torch.testing.assert_close(_logits(student, batches[0][0]), _logits(teacher, batches[0][0]), rtol=0, atol=1e-5)


def test_pca_keeps_the_principal_subspace():
    """Residual activations confined to a 24-dim subspace: PCA to 24 channels loses nothing, in float64."""
    teacher = _teacher().double()
    basis = torch.linalg.qr(torch.randn(64, 24, dtype=torch.float64))[0]  # (D, 24)
    project = basis @ basis.T
    with torch.no_grad():  # everything written to the residual stream lies in span(basis)
        teacher.embed.tokens.weight.copy_(teacher.embed.tokens.weight @ project)
        for block in teacher.decoder.blocks:
            block.attn.o_proj.weight.copy_(project @ block.attn.o_proj.weight)
            block.ffn.down.weight.copy_(project @ block.ffn.down.weight)
    batches = _batches()
    student = rotate_width(teacher.float(), 24, batches)
    teacher_logits = _logits(teacher.float(), batches[0][0])
    torch.testing.assert_close(_logits(student, batches[0][0]), teacher_logits, rtol=0, atol=2e-4)


def test_removing_an_identity_block_leaves_logits_unchanged_and_influence_finds_it():
    teacher, batches = _teacher(), _batches()
    with torch.no_grad():  # block 2 adds nothing to the residual stream
        teacher.decoder.blocks[2].attn.o_proj.weight.zero_()
        teacher.decoder.blocks[2].ffn.down.weight.zero_()
    scores = block_influence(teacher, batches)
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and min(scores[:2] + scores[3:]) > 1e-3
    keep, used = choose_layers(CompressPlan(layers="3"), teacher, batches)
    assert keep == [0, 1, 3] and used == scores
    student = keep_layers(teacher, keep)
    assert student.config.n_layers == 3
    torch.testing.assert_close(_logits(student, batches[0][0]), _logits(teacher, batches[0][0]), rtol=0, atol=1e-6)
    assert choose_layers(CompressPlan(layers="every-2nd"), teacher, batches)[0] == [0, 2]
    assert choose_layers(CompressPlan(layers="2", by="uniform"), teacher, batches)[0] == [0, 3]


def test_head_pruning_respects_gqa_groups_and_removes_dead_heads_exactly():
    teacher, batches = _teacher(), _batches()  # 4 query heads, 2 KV groups of 2
    Dh = teacher.config.resolved_head_dim
    with torch.no_grad():  # head 1 (group 0) and head 2 (group 1) contribute nothing
        for block in teacher.decoder.blocks:
            block.attn.o_proj.weight[:, Dh:3 * Dh].zero_()
    scores = head_importance(teacher, batches)
    assert all(s[1] == 0 and s[2] == 0 and s[0] > 0 and s[3] > 0 for s in scores)
    student, kept = prune_heads(teacher, CompressPlan(heads=2), scores)
    assert kept == [[0, 3]] * 4 and student.config.n_heads == 2 and student.config.n_kv_heads == 2
    torch.testing.assert_close(_logits(student, batches[0][0]), _logits(teacher, batches[0][0]), rtol=0, atol=1e-6)
    one_group, _ = prune_heads(teacher, CompressPlan(heads=2, kv_heads=1), scores)  # a whole KV group removed
    assert one_group.config.n_kv_heads == 1 and one_group.config.head_dim == Dh


def test_entropy_importance_ranks_a_uniform_head_last_and_restores_the_backends():
    teacher, batches = _teacher(), _batches()
    Dh = teacher.config.resolved_head_dim
    with torch.no_grad():  # head 3's queries are zero: it attends uniformly (normalised entropy 1)
        for block in teacher.decoder.blocks:
            block.attn.q_proj.weight.mul_(40)  # the others attend sharply
            block.attn.q_proj.weight[3 * Dh:].zero_()
    before = _logits(teacher, batches[0][0])
    scores = entropy_importance(teacher, batches)
    assert all(s[3] == pytest.approx(0.0, abs=1e-5) and min(s[:3]) > 1e-3 for s in scores)
    assert {b.attn.backend for b in teacher.decoder.blocks} == {"auto"}
    torch.testing.assert_close(_logits(teacher, batches[0][0]), before, rtol=0, atol=0)
    student = reduce(teacher, None, CompressPlan(heads=2, kv_heads=1, head_score="entropy"), batches,
                     log=lambda *_: None).model
    assert student.config.n_heads == 2


def test_ffn_pruning_removes_dead_neurons_exactly():
    teacher, batches = _teacher(), _batches()
    with torch.no_grad():
        for block in teacher.decoder.blocks:
            block.ffn.up.weight[64:].zero_()  # those neurons never fire
    student = prune_ffn(teacher, 64, batches)
    assert student.config.ffn_hidden == 64
    torch.testing.assert_close(_logits(student, batches[0][0]), _logits(teacher, batches[0][0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", ["layers", "heads", "ffn", "pca", "channels"])
def test_each_reduction_gives_a_valid_model_that_trains(reduction):
    teacher, batches = _teacher(), _batches()
    plan = {"layers": CompressPlan(layers="2"), "heads": CompressPlan(heads=2, kv_heads=1),
            "ffn": CompressPlan(ffn_dim=48), "pca": CompressPlan(width=0.5),
            "channels": CompressPlan(d_model=32, width_method="channels")}[reduction]
    student = reduce(teacher, None, plan, batches, log=lambda *_: None).model
    student.config.validate()
    assert student.num_parameters() < teacher.num_parameters()
    assert type(student.config).from_dict(student.config.to_dict()) == student.config
    _trains(student.train(), batches)


def _bpe_and_counts():
    tokenizer = train_bpe([TEXT], 400)
    return tokenizer, token_counts(tokenizer, [tokenizer.encode(TEXT[:600])])


def test_vocab_reduction_round_trips_kept_strings_and_falls_back_to_bytes():
    tokenizer, counts = _bpe_and_counts()
    reduction = reduce_tokenizer(tokenizer, counts, 320)
    small = reduction.tokenizer
    assert small.vocab_size == 320 and len(reduction.kept) == 320 < tokenizer.vocab_size
    assert small.decode(small.encode(TEXT)) == TEXT  # every string stays encodable
    for new_id, old_id in enumerate(reduction.kept.tolist()):  # kept tokens keep their text
        assert small.decode([new_id]) == tokenizer.decode([old_id])
    common = TEXT[:60]  # made of the most frequent tokens: split exactly as the teacher splits it
    old_ids = tokenizer.encode(common)
    assert set(old_ids) <= set(reduction.kept.tolist())
    assert reduction.to_teacher(torch.tensor(small.encode(common))).tolist() == old_ids
    removed = [i for i in range(tokenizer.vocab_size) if i not in set(reduction.kept.tolist())]
    for old_id in removed[:40]:
        text = tokenizer.decode([old_id])
        pieces = small.encode(text)
        assert small.decode(pieces) == text and len(pieces) > 1
    assert small.eos_id == reduction.kept.tolist().index(tokenizer.eos_id)


def test_vocab_reduced_model_keeps_the_kept_rows():
    tokenizer, counts = _bpe_and_counts()
    teacher = _teacher(vocab_size=tokenizer.vocab_size)
    reduction = reduce_tokenizer(tokenizer, counts, 300)
    student = slice_vocab(teacher, reduction)
    x = torch.tensor([reduction.tokenizer.encode(TEXT[:40])])
    teacher_logits = _logits(teacher, reduction.to_teacher(x))[..., reduction.kept]
    torch.testing.assert_close(_logits(student, x), teacher_logits, rtol=0, atol=1e-6)
    _trains(student.train(), [(x[:, :-1], x[:, 1:])])


def test_kd_loss_matches_float64_and_is_zero_for_the_teacher_itself():
    torch.manual_seed(0)
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    y[0, 0] = -100
    T = 2.0
    keep = y != -100
    p = F.softmax(t.double() / T, -1)[keep]
    expected = (p * (p.log() - F.log_softmax(s.double() / T, -1)[keep])).sum(-1).mean() * T * T
    assert float(kd_loss(s, t, y, T)) == pytest.approx(float(expected), rel=1e-5)

    teacher, batches = _teacher(), _batches()
    student = reduce(teacher, None, CompressPlan(), batches, log=lambda *_: None).model.train()
    loss, stats = Distillation(teacher, alpha=1.0)(student, batches[0])
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and float(stats["kd"]) == pytest.approx(0.0, abs=1e-6)
    ce, _ = Distillation(teacher, alpha=0.0)(student.eval(), batches[0])  # eval: plain CE (validation)
    assert float(ce) == pytest.approx(float(teacher.loss(*batches[0])[0]), rel=1e-6)


@pytest.mark.parametrize("cached", [False, True], ids=["live-teacher", "logit-cache"])
def test_distillation_resumes_bit_exactly(tmp_path, cached):
    teacher, batches = _teacher(), _batches(n=3)
    cfg = TrainConfig(max_steps=4, lr=1e-2, eval_every=0, save_every=2, progress=False, plot=False,
                      precision="fp32", device="cpu", warmup_steps=1, threads=1)
    cache = None
    if cached:
        live = Distillation(teacher)
        cache = build_logit_cache(tmp_path / "logits", {"data": "t"}, live.teacher_logits, batches, 3, top_k=8,
                                  temperature=2.0, log=lambda *_: None).lookup

    def run(out, resume=None, steps=4):
        torch.manual_seed(0)
        student = keep_layers(teacher, [0, 3]).train()
        objective = Distillation(teacher, alpha=0.7, temperature=2.0, cached_logits=cache)
        fit(student, objective, iter(batches * 4), cfg.replace(max_steps=steps), out_dir=out, resume=resume,
            log=lambda *_: None)
        return student

    straight = run(tmp_path / "a")
    run(tmp_path / "b", steps=2)
    resumed = run(tmp_path / "b", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_sparse_kd_loss_matches_its_float64_definitions():
    torch.manual_seed(0)
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    y[1, 2] = -100
    T, keep = 2.0, y != -100
    values, indices = t.topk(4, dim=-1)
    log_norm = torch.logsumexp(t / T, dim=-1)
    q = F.log_softmax(s.double() / T, -1)
    q_top = q.gather(-1, indices)[keep]
    p = F.softmax(values.double() / T, -1)[keep]  # renormalised over the top 4
    renormalised = (p * (p.log() - q_top)).sum(-1).mean() * T * T
    assert float(sparse_kd_loss(s, values, indices, None, y, T)) == pytest.approx(float(renormalised), rel=1e-5)
    p = (F.softmax(t.double() / T, -1)).gather(-1, indices)[keep]  # exact probabilities + one tail bucket
    p_tail, q_tail = 1 - p.sum(-1), 1 - q_top.exp().sum(-1)
    tail = ((p * (p.log() - q_top)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())).mean() * T * T
    got = float(sparse_kd_loss(s, values, indices, log_norm, y, T))
    assert got == pytest.approx(float(tail), rel=1e-5)
    assert got <= float(kd_loss(s, t, y, T)) + 1e-6  # coarse-graining never raises a KL
    everything = t.topk(11, dim=-1)
    for norm in (None, log_norm):
        assert float(sparse_kd_loss(s, *everything, norm, y, T)) == pytest.approx(float(kd_loss(s, t, y, T)), rel=1e-5)


@pytest.mark.parametrize("vocab", [None, 96], ids=["full-vocab", "reduced-vocab"])
def test_cached_logits_at_full_vocab_give_the_live_teacher_kd_loss(tmp_path, vocab):
    teacher, batches = _teacher(), _batches()
    kept = None if vocab is None else torch.randperm(128, generator=torch.Generator().manual_seed(2))[:vocab]
    student_batches = batches if kept is None else [(x % vocab, y % vocab) for x, y in batches]
    student = reduce(teacher, None, CompressPlan(layers="keep=0,2"), batches, log=lambda *_: None).model.train()
    if kept is not None:
        student = slice_vocab(student, type("Reduction", (), {"kept": kept})()).train()
    live = Distillation(teacher, alpha=1.0, teacher_ids=kept)
    k = vocab or 128
    for dtype, tolerance in (("float32", 1e-6), ("float16", 1e-4)):  # nats; measured 2e-7 / 3e-7
        cache = build_logit_cache(tmp_path / dtype, {"data": "t"}, live.teacher_logits, student_batches, 2, top_k=k,
                                  dtype=dtype, temperature=live.temperature, log=lambda *_: None)
        cached = Distillation(teacher, alpha=1.0, teacher_ids=kept, cached_logits=cache.lookup)
        for batch in student_batches:
            expected, got = live(student, batch)[0].detach(), cached(student, batch)[0].detach()
            assert float(got) == pytest.approx(float(expected), abs=tolerance), dtype


def test_a_stale_or_short_logit_cache_is_refused_with_one_line(tmp_path):
    teacher, batches = _teacher(), _batches(n=3)
    key = {"teacher": teacher_fingerprint(teacher), "data": {"source": "a"}}
    build_logit_cache(tmp_path, key, Distillation(teacher).teacher_logits, batches, 2, top_k=8, log=lambda *_: None)
    other = _teacher()
    with torch.no_grad():
        other.embed.tokens.weight[0, 0] += 1e-3
    for wrong, message in (({**key, "teacher": teacher_fingerprint(other)}, "another teacher"),
                           ({**key, "data": {"source": "b"}}, "another data")):
        with pytest.raises(ConfigError, match=message) as err:
            open_logit_cache(tmp_path, wrong, 1.0)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="another temperature"):
        open_logit_cache(tmp_path, key, 2.0)
    with pytest.raises(ConfigError, match="another top_k"):
        build_logit_cache(tmp_path, key, None, batches, 3, top_k=4, log=lambda *_: None)
    cache = open_logit_cache(tmp_path, key, 1.0)
    values, indices, log_norm = cache.lookup(batches[1][0])
    assert len(cache) == 2 and indices.shape == (2, 16, 8) and log_norm.shape == (2, 16)
    with pytest.raises(ConfigError, match="no teacher logits for this batch"):
        cache.lookup(batches[2][0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())  # a stranger's cache naming outside files
    manifest["batches"] = {k: "../outside.safetensors" for k in manifest["batches"]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="logit-cache shard .* refused"):
        open_logit_cache(tmp_path, key, 1.0).lookup(batches[1][0])


def test_bad_requests_get_one_line():
    cfg = _teacher().config
    for plan, message in ((CompressPlan(heads=9), "only 4 attention heads"),
                          (CompressPlan(heads=3), "multiple of the KV heads"),
                          (CompressPlan(d_model=30), "divisible by the number of heads"),
                          (CompressPlan(d_model=128), "wider than the teacher"),
                          (CompressPlan(layers="keep=0,7"), "layers must be in 0..3")):
        with pytest.raises(CompressError, match=message):
            reduce(_teacher(), None, plan, _batches(), log=lambda *_: None)
    with pytest.raises(CompressError, match="--width"):
        CompressPlan(width=1.5)
    tokenizer, counts = _bpe_and_counts()
    with pytest.raises(CompressError, match="smaller than the special tokens"):
        reduce_tokenizer(tokenizer, counts, 100)
    assert cfg.n_heads == 4


def test_recipes_map_a_nexus_teacher_to_smaller_valid_shapes():
    cfg = _teacher().config.replace(n_layers=6, d_model=128, n_heads=8, n_kv_heads=2, ffn_hidden=512, vocab_size=512)
    standard, nano = recipe_plan("nexus-standard", cfg), recipe_plan("nexus-nano", cfg)
    assert standard.layers == "2" and nano.layers == "1"  # 32/96 and 12/96 of the layers
    assert nano.d_model < standard.d_model <= cfg.d_model and nano.heads % 2 == 0 and nano.vocab == 128


@pytest.fixture
def teacher_checkpoint(tmp_path, word_corpus):
    corpus = word_corpus(tmp_path / "corpus", docs=3, lines=60, words_per_line=7)
    tokenizer = train_bpe([p.read_text() for p in sorted(corpus.iterdir())], 300)
    teacher = _teacher(vocab_size=tokenizer.vocab_size)
    save_checkpoint(tmp_path / "teacher" / "checkpoints", 1, teacher, tokenizer=tokenizer,
                    config={"data": {"source": str(corpus)}, "train": {"batch_size": 2, "seq_len": 16}})
    return tmp_path / "teacher" / "checkpoints" / "step-000001"


def test_cli_compress_writes_a_normal_student_with_provenance(tmp_path, teacher_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "student"
    args = ["compress", str(teacher_checkpoint), "--out", str(out), "--layers", "2", "--width", "0.5", "--vocab",
            "280", "--distill-steps", "2", "--seq", "16", "--batch", "2", "--threads", "1", "--calibration-batches",
            "1", "--precision", "fp32", "--logit-cache", str(tmp_path / "logits"), "--logit-top-k", "16"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "distilled" in printed and "pruned (before KD)" in printed
    model, tokenizer, config = load_checkpoint(out)
    assert config["contents"] == "full" and config["distilled_from"]["plan"]["layers"] == "2"
    assert model.config.n_layers == 2 and model.config.d_model == 32 and tokenizer.vocab_size == 280
    report = json.loads((out / "compress_report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "pruned (before KD)", "distilled"]
    assert main(["generate", str(out), "--prompt", "the cat", "--max-new", "3"]) == 0
    resumed = [a if a != "2" or i != args.index("--distill-steps") + 1 else "3" for i, a in enumerate(args)]
    assert main([*resumed, "--resume"]) == 0  # the pruned student is reloaded, fit() continues at step 2
    printed = capsys.readouterr().out
    assert "resuming: the pruned student" in printed and "1 batches added, 3 held (top 16" in printed
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"

    assert main(["compress", str(teacher_checkpoint), "--out", str(tmp_path / "x"), "--heads", "9"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --heads 9: the teacher has only 4 attention heads"]
