"""Char-level Tiny Shakespeare: final val loss and wall time of ~0.8M-parameter models, 2000 steps.

The setting of nanoGPT's ``shakespeare_char`` CPU run (4 layers, 4 heads, 128 wide, context
64, batch 12, 2000 iterations; nanoGPT reports val loss ~1.88 there): first 90% of the text
for training, last 10% for validation, random windows (nanoGPT sampling). Two recipes run side
by side through ``neoformer.train.fit``:

* ``gpt2``: nanoGPT's own: GPT-2 block (LayerNorm, GELU MLP, learned positions, tied head),
  AdamW lr 1e-3 (beta2 0.99), 100 warmup steps, cosine to 1e-4.
* ``llama``: neoformer's default decoder (RMSNorm, SwiGLU, RoPE, untied head) at a higher lr
  (1.5e-3, cosine to 1e-4; 2e-3 gave 1.693, 3e-3 1.705, 4e-3 1.712).

A recipe name may carry switches, ``llama+qk_norm+muon``: each ``+name`` applies one entry of
``TWEAKS`` (the modern-recipe options, one at a time or together); ``modern`` is the combination kept.

``--nanogpt PATH`` also runs the real nanoGPT (a checkout the user provides; nothing of it is copied
here): its ``train.py`` in a child process with the README's CPU command line, on the same split of
the same text (written as its ``train.bin``/``val.bin``/``meta.pkl`` in a temporary folder). Its
"time to val" is taken from process start to the line that prints the val loss; the in-process
recipes' times include this script's start-up (torch import) as well. The target loss is then
nanoGPT's final val loss. Without ``--nanogpt`` the ``gpt2`` recipe (nanoGPT's model and
optimizer, trained by neoformer) stands in for it.

Val loss is measured every ``--eval-every`` steps on a fixed subset of the validation windows
(for the time-to-target column) and on the whole validation split at the end. Usage::

    python benchmarks/shakespeare.py path/to/tinyshakespeare.txt [--steps 2000] [--threads 2] [--nanogpt PATH]
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before torch is imported: the recipes' clocks include start-up

import argparse
import os
import pickle
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from neoformer import ModelConfig, build_model
from neoformer.data import CausalWindows, make_sampler, sequential_batches
from neoformer.tokenizer import CharTokenizer
from neoformer.train import TrainConfig, causal_lm, evaluate, fit

B, T = 12, 64
TARGET = 1.886

RECIPES = {
    "gpt2": (dict(norm="layernorm", activation="gelu", position="learned", bias=True, tie_embeddings=True,
                  ffn_hidden=512), dict(lr=1e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1)),
    "llama": (dict(norm="rmsnorm", activation="swiglu", position="rope", bias=False, tie_embeddings=False,
                   ffn_hidden=344), dict(lr=1.5e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1)),
}

# the modern-recipe switches (sources in neoformer/config.py, neoformer/train/optim.py); ffn_hidden keeps the
# parameter count of the SwiGLU FFN (3 x 344 ~ 2 x 512)
TWEAKS = {
    "qk_norm": (dict(qk_norm=True), {}),
    "relu2": (dict(activation="relu2", ffn_hidden=512), {}),
    "softcap": (dict(logit_softcap=15.0), {}),
    "zero_init": (dict(zero_init_residual=True), {}),
    "muon": ({}, dict(optimizer="muon")),
}
MODERN = "llama+muon+qk_norm+lr=3e-3+precision=bf16"  # the best measured here (BENCHMARKS.md keeps every tried switch)


def recipe(name: str) -> tuple[dict, dict]:
    """Model and train fields of ``base+switch+...`` (``modern`` = MODERN); a switch may also be ``field=value``
    for any ModelConfig or TrainConfig field (``llama+muon+lr=3e-3+n_layers=6``), for sweeps."""
    import dataclasses

    base, *switches = (MODERN if name == "modern" else name).replace("modern+", MODERN + "+").split("+")
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = [s for s in switches if s not in TWEAKS and s.partition("=")[0] not in model_names | train_names]
    if base not in RECIPES or bad:
        raise SystemExit(f"unknown recipe {name!r}: a base of {', '.join(RECIPES)} with +switches of "
                         f"{', '.join(TWEAKS)} or field=value, or modern")
    model_fields, train_fields = dict(RECIPES[base][0]), dict(RECIPES[base][1])
    for switch in switches:
        if switch in TWEAKS:
            model_fields.update(TWEAKS[switch][0])
            train_fields.update(TWEAKS[switch][1])
            continue
        key, _, text = switch.partition("=")
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = yaml.safe_load(text)
        (model_fields if key in model_names else train_fields)[key] = value
    return model_fields, train_fields


def run_nanogpt(checkout: Path, tok, train, val, steps: int, eval_every: int, threads: int | None) -> dict:
    """nanoGPT's train.py, README CPU settings, in a child; val losses with seconds since its start."""
    with tempfile.TemporaryDirectory() as work:
        data = Path(work, "data", "shakespeare_char")
        data.mkdir(parents=True)
        train.astype(np.uint16).tofile(data / "train.bin")
        val.astype(np.uint16).tofile(data / "val.bin")
        with open(data / "meta.pkl", "wb") as f:  # written for nanoGPT to read (it takes vocab_size from it)
            pickle.dump({"vocab_size": tok.vocab_size}, f)
        os.symlink(checkout / "configurator.py", Path(work, "configurator.py"))  # train.py reads it from its cwd
        command = [sys.executable, str(checkout / "train.py"), str(checkout / "config/train_shakespeare_char.py"),
                   "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=100",
                   f"--block_size={T}", f"--batch_size={B}", "--n_layer=4", "--n_head=4", "--n_embd=128",
                   f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
                   f"--eval_interval={eval_every}", f"--out_dir={Path(work, 'out')}"]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        history, params = [], None
        started = time.perf_counter()
        with subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as child:
            for line in child.stdout:
                if m := re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line):
                    history.append((int(m[1]), float(m[2]), time.perf_counter() - started))
                elif m := re.match(r"number of parameters: ([\d.]+)M", line):
                    params = float(m[1]) * 1e6
        wall = time.perf_counter() - started
    if child.returncode or not history:
        raise SystemExit(f"nanoGPT at {checkout} failed (exit {child.returncode}); run its train.py by hand to see why")
    return {"params": params, "val": history[-1][1], "wall": wall, "history": history, "steps": history[-1][0]}


def load(path: Path):
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    tok = CharTokenizer.from_texts([text])
    train = np.asarray(tok.encode(text[:cut]), dtype=np.int64)
    val = np.asarray(tok.encode(text[cut:]), dtype=np.int64)
    return tok, train, val


def run(name: str, tok, train, val, steps: int, eval_every: int, eval_batches: int, precision: str) -> dict:
    model_fields, train_fields = recipe(name)
    cfg = ModelConfig(**{"name": "shakespeare", "vocab_size": tok.vocab_size, "d_model": 128, "n_layers": 4,
                         "n_heads": 4, "max_seq_len": T, **model_fields})
    torch.manual_seed(1337)
    model = build_model(cfg)
    windows, val_windows = CausalWindows(train, T), CausalWindows(val, T)
    sampler = make_sampler(windows, B, "random", seed=1337)
    history: list[tuple[int, float, float]] = []
    started = time.perf_counter()
    startup = started - PROCESS_START if not STARTUP else STARTUP[0]  # this process's start-up, counted once
    STARTUP[:] = [startup]

    def on_event(event, info):
        if event == "eval":
            history.append((info["step"], info["val_loss"], time.perf_counter() - started + startup))

    train_cfg = TrainConfig(**{"max_steps": steps, "batch_size": B, "seq_len": T, "warmup_steps": 100, "grad_clip": 1.0,
                               "eval_every": eval_every, "eval_batches": eval_batches, "progress": False, "plot": False,
                               "save_every": 0, "log_every": 10**9, "precision": precision, **train_fields})
    result = fit(model, causal_lm, sampler, train_cfg, val_batches=lambda: sequential_batches(val_windows, B),
                 callbacks=[on_event], log=lambda *_: None)
    wall = time.perf_counter() - started + startup
    full_val = evaluate(model, causal_lm, sequential_batches(val_windows, B))
    return {"params": model.num_parameters(), "val": full_val, "subset_val": result.val_loss, "wall": wall,
            "history": history, "steps": result.step}


STARTUP: list[float] = []


def reached(history, target: float):
    """(step, seconds) of the first eval at or below ``target``, or None."""
    return next(((step, seconds) for step, loss, seconds in history if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="tinyshakespeare.txt (1,115,394 bytes)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=40, help="validation batches per periodic eval")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--recipes", default="gpt2,llama",
                        help=f"comma-separated: {', '.join(RECIPES)}, modern, or base+switch+... ({', '.join(TWEAKS)})")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: run its train.py side by side")
    args = parser.parse_args()
    if not args.path.is_file():
        parser.error(f"{args.path} not found")
    if args.nanogpt and not (args.nanogpt / "train.py").is_file():
        parser.error(f"{args.nanogpt} is not a nanoGPT checkout (no train.py)")
    names = args.recipes.split(",")
    for name in names:
        recipe(name)  # unknown names fail before anything runs
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, train, val = load(args.path)
    print(f"tinyshakespeare: {len(train):,} train / {len(val):,} val characters, vocab {tok.vocab_size}; "
          f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.precision}")
    results = {name: run(name, tok, train, val, args.steps, args.eval_every, args.eval_batches, args.precision)
               for name in names}
    target, anchor = TARGET, "gpt2" if "gpt2" in results else None
    if args.nanogpt:
        results["nanoGPT (real)"] = run_nanogpt(args.nanogpt.resolve(), tok, train, val, args.steps, args.eval_every,
                                               args.threads)
        anchor, target = "nanoGPT (real)", results["nanoGPT (real)"]["val"]
    elif anchor:
        target = results[anchor]["val"]
    source = f"{anchor}'s final" if anchor else "fixed"
    print(f"target: val {target:.4f} ({source}); load {os.getloadavg()[0]:.1f}")
    print(f"| recipe | params | steps | wall time | final val loss | time to val {target:.3f} | share of {anchor} wall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        hit = reached(r["history"], target)
        share = f"{hit[1] / results[anchor]['wall']:.2f}" if hit and anchor else "-"
        hit_text = f"{hit[1]:.0f} s (step {hit[0]})" if hit else "not reached"
        params = f"{r['params']:,.0f}" if r["params"] else "?"
        print(f"| {name} | {params} | {r['steps']} | {r['wall']:.0f} s | {r['val']:.4f} | {hit_text} | {share} |")


if __name__ == "__main__":
    main()
