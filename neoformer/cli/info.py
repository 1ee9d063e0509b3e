"""`neoformer info TARGET`: exact parameter count and memory plan of a preset, checkpoint or config file."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="exact parameter count and memory plan (no model is built)",
        description="Exact parameters per component, weight / training / KV-cache memory and per-rank "
                    "estimates of a preset, checkpoint directory or config file. See docs/planner.md.")
    p.add_argument("target", nargs="?", help="preset name, checkpoint directory or config .json/.yaml")
    p.add_argument("--batch", type=int, default=1, help="KV-cache batch size (default 1)")
    p.add_argument("--seq", type=int, default=None, help="KV-cache length (default max_seq_len)")
    p.add_argument("--world-size", type=int, default=1, help="ranks for the per-rank estimate (default 1)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="data parallelism (default ddp)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--list", action="store_true", help="list all presets with their exact parameter counts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..planner import format_plan, format_presets, list_presets, load_config, plan
    from ..presets import PRESETS, format_run_defaults, run_defaults

    if args.list:
        items = list_presets()
        print(json.dumps(items, indent=2) if args.json else format_presets(items))
        return 0
    if not args.target:
        raise ValueError("give a preset name, checkpoint directory or config file (or --list)")
    cfg = load_config(args.target)
    result = plan(cfg, args.batch, args.seq, args.world_size, args.parallel, source=args.target)
    preset = args.target if args.target in PRESETS else None
    quantized = _quantized(args.target)
    if args.json:
        print(json.dumps({**result, "run_defaults": run_defaults(preset),
                          **({"quantized": quantized} if quantized else {})}, indent=2))
        return 0
    print(format_plan(result))
    if quantized:
        q = quantized
        group = f" g{q['group_size']}" if q["group_size"] else ""
        print(f"\nQuantized checkpoint: {q['scheme']}{group}, {q['quantized']}, skip "
              f"{','.join(q['skip']) or '-'}: tensors {q['tensor_bytes']:,} bytes in model.safetensors "
              f"(planner, rest at {q['float_bytes']} B: {q['planned_bytes']:,})")
    if format_run_defaults(preset):  # training settings the preset brings to `neoformer train --preset`
        print(f"\n{format_run_defaults(preset)}")
    return 0


def _quantized(target: str) -> dict | None:
    """The quantization summary of a quantized checkpoint (exact file bytes), else None."""
    from pathlib import Path

    if not Path(target).is_dir():
        return None
    from ..checkpoint import CheckpointError, read_config, resolve_checkpoint

    try:
        path = resolve_checkpoint(target)
        config = read_config(path)
    except CheckpointError:
        return None
    if config.get("contents") != "quantized":
        return None
    from ..quantize import quantized_summary

    return quantized_summary(path, config)


__all__ = ["add_parser"]
