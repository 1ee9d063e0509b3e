"""`neoformer checkpoint inspect|list`: what a checkpoint holds, and a run's checkpoints."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("checkpoint", help="inspect checkpoints",
                              description="Inspect a checkpoint (verifies every file's sha256) or list a run's.")
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    i = sub.add_parser("inspect", help="model, step, size, training settings; verifies file checksums")
    i.add_argument("path", metavar="CKPT", help="checkpoint directory or run directory (uses its latest)")
    i.add_argument("--json", action="store_true", help="print the full config.json after the summary")
    i.set_defaults(func=run_inspect)
    ls = sub.add_parser("list", help="the checkpoints of a run directory")
    ls.add_argument("path", metavar="RUN", help="run directory or checkpoints directory")
    ls.set_defaults(func=run_list)
    c = sub.add_parser("consolidate", help="merge a sharded (FSDP) checkpoint into a normal single-file one",
                       description="Merge a sharded checkpoint (written by `neoformer train --parallel fsdp`) into a "
                       "normal checkpoint directory that `neoformer generate` / `load_model` read. One process; "
                       "needs memory for the whole model. Resume training from the sharded directory itself.")
    c.add_argument("sharded", metavar="SHARDED_DIR", help="sharded checkpoint, or a run directory (uses its latest)")
    c.add_argument("out", metavar="OUT_DIR", help="new checkpoint directory to write")
    c.set_defaults(func=run_consolidate)  # parallel: implemented in neoformer.checkpoint.sharded
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def run_inspect(args: argparse.Namespace) -> int:
    from ..checkpoint.plain import STATE_JSON, CheckpointError, inspect_checkpoint
    from ..safepath import inside

    info = inspect_checkpoint(args.path)
    cfg, model = info.config, info.config["model"]
    tok = cfg.get("tokenizer") or {}
    train = cfg.get("train") or {}
    print(f"checkpoint: {info.path}  (files verified)")
    print(f"step:       {info.step:,}")
    print(f"model:      {cfg.get('preset') or model.get('name')} ({model['kind']}), {info.num_parameters:,} values "
          f"stored (weights + buffers), d_model {model['d_model']}, {model['n_layers']} layers, {model['n_heads']} heads, "
          f"vocab {model['vocab_size']:,}")
    if tok:
        print(f"tokenizer:  {tok.get('kind')}, vocab {tok.get('vocab_size', '?'):,}")
    if train:
        print(f"training:   {train.get('optimizer')} lr {train.get('lr')}, batch {train.get('batch_size')} x "
              f"{train.get('seq_len') or model.get('max_seq_len')}, max {train.get('max_steps'):,} steps")
    state_file = inside(info.path, STATE_JSON, what="file", error=CheckpointError)
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        losses = [f"{name} {state[key]:.4f}" for name, key in (("train loss", "train_loss"), ("val loss", "val_loss"))
                  if isinstance(state.get(key), (int, float))]
        print(f"state:      resumable; {state.get('tokens', 0):,} tokens seen" + (f"; {', '.join(losses)}" if losses else ""))
    else:
        print("state:      weights only (not resumable)")
    print(f"size:       {_size(info.size_bytes)}")
    if args.json:
        print(json.dumps(cfg, indent=2))
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..checkpoint.plain import LATEST, CheckpointError, list_checkpoints

    root = Path(args.path)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"no checkpoints in {args.path}")
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    for path in found:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        print(f"{path}  {_size(size)}" + ("  <- latest" if path.name == latest else ""))
    return 0


def run_consolidate(args: argparse.Namespace) -> int:
    from ..checkpoint.sharded import consolidate

    out = consolidate(args.sharded, args.out)
    print(f"consolidated {args.sharded} -> {out}")
    return 0


__all__ = ["add_parser"]
