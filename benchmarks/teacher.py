"""One cached, trained teacher for every benchmark where quality matters.

Compression, quantization, speculative decoding, fine-tuning and evaluation must be measured on a
model trained here, never on random weights (random weights make every quantizer look perfect and
every draft useless). This script is the one recipe they all reuse: a Llama-shaped decoder
(Nexus Core's shape: RMSNorm, SwiGLU, RoPE, GQA, no bias, untied head) trained with
`neoformer train` on the embedded, offline stdlib corpus with a byte-level BPE tokenizer.

    python benchmarks/teacher.py                 # train (or find) the "small" teacher, print its path
    python benchmarks/teacher.py --size base     # 15.7M (compression benchmark, serving's ~15M row)
    python benchmarks/teacher.py --size large    # 143.7M, a short run (serving, speculative decoding)
    python benchmarks/teacher.py --size large-draft   # a 4-layer draft distilled from it (speculative decoding)
    python benchmarks/teacher.py --size mixed    # "small" on Python + English (vocabulary reduction to one domain)

    sys.path.insert(0, "benchmarks"); from teacher import teacher_checkpoint
    ckpt = teacher_checkpoint("small")           # a checkpoint directory; trains on first use

Checkpoints are cached under ``$NEOFORMER_TEACHER_CACHE`` (default ``.cache/teachers`` in the
repository), one folder per recipe hash, so a changed recipe trains a new teacher instead of
reusing a stale one. Training uses a fixed step count (not a time budget), so the same recipe
gives the same model on a busy or an idle machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

# the model overrides sit on the nexus-nano preset (Llama-shaped, GQA, untied, no dropout)
RECIPES: dict[str, dict] = {
    # 3.9M parameters; ~4 min on 2 idle cores (12k tokens/s, bf16 autocast)
    "small": {
        "preset": "nexus-nano",
        "model": dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, ffn_hidden=512, max_seq_len=256),
        "train": dict(max_steps=1500, batch_size=16, seq_len=128, lr=2e-3, min_lr=2e-4, warmup_steps=100,
                      weight_decay=0.1, eval_every=250, eval_batches=16, save_every=500, samples=0, seed=0),
        "tokenizer": dict(kind="bpe", vocab_size=4096),
        "data": dict(source="stdlib"),
    },
    # 15.7M parameters; for the compression benchmark's 2x / 4x students and serving's ~15M row
    "base": {
        "preset": "nexus-nano",
        "model": dict(d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_hidden=1024, max_seq_len=256),
        "train": dict(max_steps=2000, batch_size=16, seq_len=128, lr=1.5e-3, min_lr=1.5e-4, warmup_steps=200,
                      weight_decay=0.1, eval_every=500, eval_batches=16, save_every=500, samples=0, seed=0),
        "tokenizer": dict(kind="bpe", vocab_size=4096),
        "data": dict(source="stdlib"),
    },
    # 143.7M parameters (the issues' ~160M class; d_model 1024, 12 layers, GQA 16/4, SwiGLU 2816) on the same
    # tokenizer recipe, so the small teacher can draft for it; a short run (300 steps): trained, not
    # converged, for serving throughput, speculative decoding and quantization at this size
    "large": {
        "preset": "nexus-nano",
        "model": dict(d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4, ffn_hidden=2816, max_seq_len=256),
        "train": dict(max_steps=300, batch_size=16, seq_len=128, lr=1e-3, min_lr=1e-4, warmup_steps=40,
                      weight_decay=0.1, eval_every=100, eval_batches=8, save_every=100, samples=0, seed=0),
        "tokenizer": dict(kind="bpe", vocab_size=4096),
        "data": dict(source="stdlib"),
    },
}
RECIPES["mixed"] = {**RECIPES["small"], "data": dict(source="python-and-english", val_fraction=0.0),
                    "train": {**RECIPES["small"]["train"], "eval_every": 0}}  # source: MIXED_CORPUS, at run time


def cache_root() -> Path:
    return Path(os.environ.get("NEOFORMER_TEACHER_CACHE", REPO / ".cache" / "teachers"))


# ---- two domains, one vocabulary: the vocabulary-reduction benchmark's teacher (issue 10) ------------------
# vocabtrimmer's setting: a vocabulary that covers more than the user's data (there: many languages; here:
# Python and English), reduced to what one domain uses. The English is Tiny Shakespeare's train split only, so
# its validation split (the file's last 2%, as `--data FILE` splits it) stays unseen by the teacher.
SHAKESPEARE = Path(os.environ.get("NEOFORMER_SHAKESPEARE", REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
MIXED_CORPUS = cache_root() / "corpora" / "python-and-english"


def build_mixed_corpus() -> Path:
    """MIXED_CORPUS: code/NNNNN.py (the stdlib corpus's train documents) and english.txt (Shakespeare's train split)."""
    from neoformer.data.sources import load_documents

    if (MIXED_CORPUS / "done").is_file():
        return MIXED_CORPUS
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"the mixed teacher needs Tiny Shakespeare at {SHAKESPEARE}; set NEOFORMER_SHAKESPEARE")
    (MIXED_CORPUS / "code").mkdir(parents=True, exist_ok=True)
    for number, text in enumerate(load_documents("stdlib", "train").documents):
        (MIXED_CORPUS / "code" / f"{number:05d}.py").write_text(text)
    (MIXED_CORPUS / "english.txt").write_text("".join(load_documents(SHAKESPEARE, "train").documents))
    (MIXED_CORPUS / "done").write_text("")
    return MIXED_CORPUS


def recipe_dir(size: str) -> Path:
    digest = hashlib.sha256(json.dumps(RECIPES[size], sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / f"{size}-{digest}"


def teacher_checkpoint(size: str = "small", *, threads: str = "auto", force: bool = False) -> Path:
    """The trained teacher's run directory (``load_checkpoint`` takes it); trains it on first use."""
    if size not in RECIPES:
        raise SystemExit(f"unknown teacher size {size!r}; choose one of {', '.join(RECIPES)}")
    out = recipe_dir(size)
    if (out / "recipe.json").is_file() and not force:  # written only once training has finished
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = RECIPES[size]
    if size == "mixed":  # the recipe names the corpus; its folder is made here (the hash stays machine-independent)
        recipe = {**recipe, "data": {**recipe["data"], "source": str(build_mixed_corpus())}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(recipe, f)
        config = f.name
    cmd = [sys.executable, "-m", "neoformer.cli", "train", "--config", config, "--out", str(out),
           "--threads", threads, "--overwrite"]
    print(f"training the {size} teacher: {' '.join(cmd)}", file=sys.stderr)
    try:
        subprocess.run(cmd, check=True, cwd=REPO)
    finally:
        os.unlink(config)
    (out / "recipe.json").write_text(json.dumps({"size": size, **RECIPES[size]}, indent=2) + "\n")
    return out


# Drafts for speculative decoding, made from a teacher by `neoformer compress` (the Nexus pipeline): a few of its
# layers, a quarter of its width (PCA), pruned heads and FFN, then pure distillation (alpha 1, T 1: the draft
# should propose what the target would say, not what the data says)
DRAFTS: dict[str, dict] = {
    "large-draft": {"teacher": "large", "flags": ["--layers", "keep=0,4,8,11", "--width", "0.25", "--heads", "4",
                                                  "--kv-heads", "1", "--ffn-dim", "704", "--alpha", "1.0",
                                                  "--temperature", "1.0", "--distill-steps", "300", "--lr", "2e-3",
                                                  "--teacher-bf16", "--eval-every", "100", "--save-every", "100"]},
}


def draft_checkpoint(name: str = "large-draft", *, threads: str = "auto", force: bool = False) -> Path:
    """A draft distilled from a cached teacher (run directory); compressed and distilled on first use."""
    recipe = DRAFTS[name]
    digest = hashlib.sha256(json.dumps({**recipe, "teacher_recipe": RECIPES[recipe["teacher"]]},
                                       sort_keys=True).encode()).hexdigest()[:10]
    out = cache_root() / f"{name}-{digest}"
    if (out / "recipe.json").is_file() and not force:
        return out
    teacher = teacher_checkpoint(recipe["teacher"], threads=threads)
    cmd = [sys.executable, "-m", "neoformer.cli", "compress", str(teacher), "--out", str(out), *recipe["flags"],
           "--threads", threads, "--overwrite"]
    print(f"distilling {name}: {' '.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=REPO)
    (out / "recipe.json").write_text(json.dumps({"draft": name, **recipe}, indent=2) + "\n")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(RECIPES) + sorted(DRAFTS), default="small")
    parser.add_argument("--threads", default="auto")
    parser.add_argument("--force", action="store_true", help="train again even if cached")
    args = parser.parse_args()
    make = draft_checkpoint if args.size in DRAFTS else teacher_checkpoint
    print(make(args.size, threads=args.threads, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
