"""--format aoti: the AOTInductor package reproduces neoformer's logits (compiling is slow: slow-marked)."""
from __future__ import annotations

import pytest
import torch

from neoformer.export import ExportError, export


@pytest.mark.slow
def test_aoti_package_matches_neoformer_at_batch_one_and_one_token_prompt(tmp_path):
    from neoformer import build_model
    from neoformer.export.aoti_format import AotiDecoder
    from neoformer.export.common import probe_ids

    torch.manual_seed(0)
    model = build_model("nexus-debug", vocab_size=96, n_layers=1).eval()
    result = export(model, tmp_path / "aoti", "aoti")  # verification: batch 2, prefill 5 + 3 cached steps
    assert result.max_diff <= 1e-5 and result.files == ["model.pt2", "neoformer_export.json"]
    package = AotiDecoder(tmp_path / "aoti")
    ids = probe_ids(96, 4, seed=7)[:1]  # batch 1, a one-token prefill, then 3 one-token steps
    cfg = model.config
    past = [torch.zeros(1, cfg.resolved_n_kv_heads, 0, cfg.resolved_head_dim) for _ in range(2 * cfg.n_layers)]
    logits, present, _ = model(ids[:, :1], use_cache=True)
    reference = [logits]
    for t in range(1, 4):
        logits, present, _ = model(ids[:, t:t + 1], present, use_cache=True)
        reference.append(logits)
    for t in range(4):
        logits, *past = package(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), *past)
        torch.testing.assert_close(logits, reference[t], atol=1e-5, rtol=1e-5)


def test_aoti_refuses_encoders(tmp_path):
    from neoformer import build_model

    with pytest.raises(ExportError, match="aoti packages a decoder"):
        export(build_model("neobert-debug", vocab_size=96), tmp_path / "a", "aoti")
    assert not (tmp_path / "a").exists()
