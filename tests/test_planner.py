"""The planner's analytic counts and memory formulas against real (or meta-device) models."""
import json
import math

import pytest
import torch
from torch import nn

from neoformer import ModelConfig, build_model
from neoformer.cli import main
from neoformer.planner import (buffer_specs, count_parameters, kv_cache_bytes, load_config, num_parameters,
                               param_specs, per_rank_bytes, plan, training_bytes, weight_bytes)
from neoformer.presets import PRESET_CLAIMS, PRESETS

DEBUG_PRESETS = [name for name in PRESETS if name.endswith("-debug")]
TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=16)

OPTIONS = {
    "plain": {},
    "fused_qkv_bias_layernorm": dict(fused_qkv=True, bias=True, norm="layernorm"),
    "layernorm_no_bias": dict(norm="layernorm"),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1, fused_qkv=True),
    "plain_ffn_bias": dict(activation="gelu", bias=True),
    "glu": dict(activation="glu"),
    "head_dim": dict(head_dim=12, n_kv_heads=2),
    "moe": dict(moe_experts=4, moe_top_k=2),
    "moe_plain_bias": dict(moe_experts=3, moe_top_k=1, activation="relu", bias=True),
    "rmc": dict(rmc=True, rmc_mem_size=5),
    "nsb": dict(nsb=True, nsb_rules=6, nsb_rule_dim=10),
    "rmc_nsb_untied": dict(rmc=True, nsb=True, tie_embeddings=False),
    "ngpt": dict(ngpt=True),
    "ngpt_plain_ffn_fused_untied": dict(ngpt=True, activation="relu", fused_qkv=True, tie_embeddings=False),
    "relative": dict(position="relative", relative_buckets=8),
    "alibi": dict(position="alibi"),
    "sinusoidal": dict(position="sinusoidal"),
    "learned_offset": dict(position="learned", learned_pos_offset=1),
    "untied": dict(tie_embeddings=False),
    "post_norm_bias": dict(norm_position="post", norm="layernorm", bias=True),
    "sliding_window": dict(sliding_window=4, sliding_window_pattern="LG"),
    "encoder": dict(kind="encoder", fused_qkv=True, position="learned", learned_pos_offset=1, pad_token_id=0),
    "encoder_relative_ngpt": dict(kind="encoder", position="relative", ngpt=True),
    "enc_dec": dict(kind="encoder_decoder", n_encoder_layers=3, norm="layernorm", bias=True, position="learned"),
    "enc_dec_relative_untied": dict(kind="encoder_decoder", n_encoder_layers=1, position="relative",
                                    tie_embeddings=False, fused_qkv=True),
    "enc_dec_ngpt": dict(kind="encoder_decoder", n_encoder_layers=2, ngpt=True),
    "enc_dec_moe_post": dict(kind="encoder_decoder", n_encoder_layers=2, moe_experts=2, moe_top_k=1,
                             norm_position="post"),
}


def tiny(**changes) -> ModelConfig:
    return ModelConfig(name="tiny", **{**TINY, **changes})


def assert_matches_model(cfg: ModelConfig, model: nn.Module) -> None:
    """Same parameter names and shapes as named_parameters() (tied weights once), same total."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {p.name: p.shape for p in param_specs(cfg)} == expected
    assert num_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg).total == model.num_parameters()


@pytest.mark.parametrize("name", DEBUG_PRESETS)
def test_debug_presets_count_exactly(name):
    assert_matches_model(PRESETS[name], build_model(name))


@pytest.mark.parametrize("option", OPTIONS)
def test_option_combinations_count_exactly(option):
    cfg = tiny(**OPTIONS[option])
    model = build_model(cfg)
    assert_matches_model(cfg, model)
    # the quantisable weights are exactly the nn.Linear weights (a tied head is the embedding)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if cfg.tie_embeddings:
        linear.discard("lm_head.weight")
    assert {p.name for p in param_specs(cfg) if p.linear} == linear
    # the components add up
    counts = count_parameters(cfg)
    assert sum(counts.by_component.values()) == counts.total
    assert counts.root + sum(n for n in _block_sizes(model)) == counts.total
    assert counts.largest_block == max(_block_sizes(model))
    for key, each in counts.per_block.items():
        assert each is None or each * counts.blocks_per_component[key] == counts.by_component[key]


def _block_sizes(model):
    return [sum(p.numel() for p in m.parameters()) for n, m in model.named_modules() if n.count(".") == 2
            and ".blocks." in n]


@pytest.mark.parametrize("name", ["nexus-base", "nexus-standard", "neoformer-x-760m", "lumi-base",
                                  "neobert-base", "nima-transformer", "nima-medium"])
def test_large_presets_match_meta_build(name):
    assert_matches_model(PRESETS[name], build_model(name, device="meta"))


def test_nexus_base_is_93b_not_405b():
    total = num_parameters(PRESETS["nexus-base"])
    assert 92e9 < total < 94e9
    assert PRESET_CLAIMS["nexus-base"] == 405e9
    result = plan(PRESETS["nexus-base"])
    assert result["claim"]["stated"] == 405_000_000_000 and result["claim"]["true"] == total
    assert "93B" in result["claim"]["note"] and "not 405B" in result["claim"]["note"]


def test_moe_active_parameters_count_top_k_experts():
    cfg = tiny(moe_experts=4, moe_top_k=1, n_layers=3)
    model = build_model(cfg)
    expert = sum(p.numel() for p in model.decoder.blocks[0].ffn.experts[0].parameters())
    assert count_parameters(cfg).active_per_token == model.num_parameters() - 3 * 3 * expert
    assert count_parameters(tiny()).active_per_token == num_parameters(tiny())


def _unique_state_bytes(model):
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("name", ["neoformer-x-debug", "nima-transformer-debug", "lumi-debug"])
def test_fp32_and_bf16_weights_equal_state_dict_bytes(name):
    model = build_model(name)
    assert weight_bytes(PRESETS[name], "fp32") == _unique_state_bytes(model)
    assert weight_bytes(PRESETS[name], "bf16") == _unique_state_bytes(model.to(torch.bfloat16))
    assert sum(b.numel for b in buffer_specs(PRESETS[name])) == sum(b.numel() for b in model.buffers())


def test_quantised_weight_bytes_from_the_module_tree():
    cfg = tiny(tie_embeddings=False, bias=True, rmc=True, ffn_hidden=40)  # 32 * 40 = 1280 = 20 NF4 blocks
    model = build_model(cfg)
    int8 = nf4 = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and pname == "weight":
                int8 += p.numel() + 4 * p.shape[0]
                nf4 += p.numel() // 2 + 4 * math.ceil(p.numel() / 64)
            else:
                int8 += 2 * p.numel()
                nf4 += 2 * p.numel()
    buffers = 2 * sum(b.numel() for b in model.buffers())
    assert weight_bytes(cfg, "int8") == int8 + buffers
    assert weight_bytes(cfg, "nf4") == nf4 + buffers
    with pytest.raises(ValueError, match="weight format"):
        weight_bytes(cfg, "fp8")


def test_training_state_is_16_bytes_per_parameter():
    cfg = PRESETS["lumi-debug"]
    n = num_parameters(cfg)
    fp32, mixed = training_bytes(cfg, "fp32"), training_bytes(cfg, "bf16_mixed")
    assert fp32["total"] == mixed["total"] == 16 * n
    assert mixed["master"] == 4 * n and fp32["master"] == 0 and mixed["weights"] == 2 * n


def _past_bytes(past):
    return sum(t.numel() * t.element_size() for kv in past for t in kv)


@pytest.mark.parametrize("name", ["neoformer-x-debug", "nexus-debug", "nima-debug"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_formula_equals_real_cache(name, dtype):
    cfg = PRESETS[name]
    model = build_model(name, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with torch.no_grad():
        _, past, _ = model(ids)
    assert _past_bytes(past) == kv_cache_bytes(cfg, batch=2, dtype_bytes=dtype.itemsize)


def test_per_block_counts():
    counts = count_parameters(PRESETS["nima-transformer-debug"])
    assert counts.per_block["norms"] is None  # decoder blocks have a third (cross-attention) norm
    assert counts.blocks_per_component == {"attention": 4, "cross_attention": 2, "ffn": 4, "norms": 4}
    model = build_model("nima-transformer-debug", device="meta")
    assert counts.per_block["attention"] == sum(p.numel() for p in model.encoder.blocks[0].attn.parameters())


def test_kv_formula_encoder_decoder_and_windowed():
    cfg = PRESETS["nima-transformer-debug"]
    model = build_model(cfg).eval()
    src = torch.randint(0, cfg.vocab_size, (1, 10))
    tgt = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len))
    with torch.no_grad():
        _, past = model(src, tgt)
    assert _past_bytes(past) == kv_cache_bytes(cfg, dtype_bytes=4)
    assert kv_cache_bytes(PRESETS["neobert-debug"]) is None

    cfg = tiny(n_layers=4, sliding_window=5, sliding_window_pattern="LLG", n_kv_heads=2)  # L L G L
    per_token = 2 * 2 * 8 * 4  # K+V * kv_heads * head_dim * fp32
    assert kv_cache_bytes(cfg, seq=16, dtype_bytes=4) == per_token * 16 * 4
    assert kv_cache_bytes(cfg, seq=16, dtype_bytes=4, windowed=True) == per_token * (5 + 5 + 16 + 5)
    assert kv_cache_bytes(cfg, seq=3, dtype_bytes=4, windowed=True) == per_token * 3 * 4
    result = plan(cfg, batch=3, seq=16)
    assert result["kv_cache_bytes"]["windowed"]["bf16"] == 3 * per_token // 2 * 31


def test_per_rank_ddp_replicates_fsdp_shards_like_torch_chunk():
    cfg = PRESETS["neoformer-x-debug"]
    full = training_bytes(cfg, "fp32")
    ddp = per_rank_bytes(cfg, 4, "ddp", "fp32")
    assert ddp["total"] == full["total"]
    assert per_rank_bytes(cfg, 1, "fsdp", "fp32")["total"] == full["total"]

    model = build_model(cfg, device="meta")
    shard = sum(torch.chunk(p, 3, dim=0)[0].numel() for p in model.parameters())  # rank 0's (largest) shard
    counts = count_parameters(cfg)
    for precision, compute in (("fp32", 4), ("bf16_mixed", 2)):
        fsdp = per_rank_bytes(cfg, 3, "fsdp", precision)
        assert fsdp["moments"] == 8 * shard
        assert fsdp["gathered_block"] == compute * counts.largest_block
        assert fsdp["gathered_root"] == compute * counts.root
        assert fsdp["total"] == 16 * shard + compute * (counts.root + counts.largest_block + counts.buffers)
    with pytest.raises(ValueError, match="parallel"):
        per_rank_bytes(cfg, 2, "zero3")


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_preset_table(capsys):
    assert main(["info", "nexus-base"]) == 0
    out = capsys.readouterr().out
    assert f"{num_parameters(PRESETS['nexus-base']):,}" in out
    assert "seed states 405B, true 93.1B" in out and "not 405B" in out
    for word in ("fp32", "bf16", "int8", "nf4", "KV cache", "bf16 mixed", "Assumptions"):
        assert word in out


def test_cli_json_with_fsdp(capsys):
    assert main(["info", "lumi-debug", "--json", "--world-size", "4", "--parallel", "fsdp", "--batch", "2",
                 "--seq", "32"]) == 0
    data = json.loads(capsys.readouterr().out)
    cfg = PRESETS["lumi-debug"]
    assert data["parameters"]["total"] == num_parameters(cfg)
    assert data["kv_cache_bytes"]["full"]["bf16"] == kv_cache_bytes(cfg, 2, 32, 2)
    assert data["per_rank_bytes"]["fp32"] == per_rank_bytes(cfg, 4, "fsdp", "fp32")
    assert data["weights_bytes"]["nf4"] == weight_bytes(cfg, "nf4")


def test_cli_list(capsys):
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert f"{num_parameters(PRESETS['nexus-base']):,}" in out
    assert main(["info", "--list", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert {i["name"]: i["parameters"] for i in items} == {n: num_parameters(c) for n, c in PRESETS.items()}


@pytest.mark.parametrize("wrapped", [False, True])
def test_cli_checkpoint_dir_and_config_file(tmp_path, capsys, wrapped):
    cfg = tiny(moe_experts=4, moe_top_k=2)
    data = {"model": cfg.to_dict(), "train": {"lr": 1e-3}} if wrapped else cfg.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_config(str(tmp_path)) == cfg
    assert main(["info", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"]["total"] == build_model(cfg).num_parameters()
    assert main(["info", str(tmp_path / "config.json")]) == 0
    assert "active per token" in capsys.readouterr().out


def test_cli_yaml_config(tmp_path, capsys):
    import yaml

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": tiny().to_dict()}))
    assert main(["info", str(path)]) == 0
    assert f"{num_parameters(tiny()):,}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["info", "nexus-bse"], "unknown preset 'nexus-bse' (did you mean 'nexus-base'?)"),
    (["info", "missing/config.json"], "no such file or directory: missing/config.json"),
    (["info"], "give a preset name"),
    (["info", "lumi-debug", "--batch", "0"], "batch (0) must be >= 1"),
])
def test_cli_user_errors_are_one_line(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


def test_cli_checkpoint_dir_without_config(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


# ---- the module tree comes from the model; claims need no special case -------------------------
def test_planner_follows_a_model_change_without_an_edit(monkeypatch):
    """A parameter added to the attention module is counted where it lives (the planner reads the
    meta-device model instead of a copy of the architecture)."""
    from neoformer.model.attention import Attention

    original = Attention.__init__

    def with_gate(self, cfg, layer_idx, cross=False):
        original(self, cfg, layer_idx, cross)
        self.head_gate = nn.Parameter(torch.ones(cfg.n_heads))

    monkeypatch.setattr(Attention, "__init__", with_gate)
    cfg = ModelConfig(**{**TINY, "n_layers": 3, "name": "tiny-gated"})  # a config not planned before (cached)
    model = build_model(cfg)
    assert_matches_model(cfg, model)
    assert count_parameters(cfg).by_component["attention"] == sum(
        p.numel() for n, p in model.named_parameters() if ".attn." in n)


def test_claim_notes_come_from_the_architecture_not_the_preset_name(monkeypatch):
    import neoformer.planner as planner

    monkeypatch.setattr(planner, "PRESET_CLAIM_HINTS", {})
    total = num_parameters(PRESETS["nexus-base"])
    assert planner.claim("nexus-base", total)["note"] == "96 layers x 8192 wide is ~93B parameters, not 405B"
    lumi = planner.claim("lumi-base", num_parameters(PRESETS["lumi-base"]))
    assert lumi["note"] == "24 layers x 768 wide is ~277M parameters, not 124M"
    assert planner.claim("nima-small", num_parameters(PRESETS["nima-small"]))["note"] == ""
