"""`neoformer ablate`: train every cell of a grid through `neoformer train`, then write a report."""
from __future__ import annotations

import argparse
import json


def _seconds(text: str) -> float:
    """--budget 120 or 120s or 2m."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:].lower(), None)
    try:
        value = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds such as 120, 120s or 2m, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the budget must be positive, got {text!r}")
    return value


def _count(text: str) -> int:
    from ..config import ConfigError

    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--parallel {text!r}: expected a number of cells at once or auto") from None


def add_parser(subparsers) -> None:
    text = "train an ablation grid (each cell through `neoformer train`) and write a report"
    p = subparsers.add_parser(
        "ablate", help=text, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=text + ".\n\nExample:\n  neoformer ablate --base configs/ablate/seed0.yaml "
        "--grid model.nsb=true,false --grid model.n_kv_heads=1,3 --seeds 2 --max-steps 300 --out runs/ablate\n"
        "Rerunning the same command skips finished cells and resumes a killed one (docs/ablations.md).")
    p.add_argument("--base", required=True, metavar="CONFIG_OR_PRESET", help="run config YAML or preset name")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.FIELD=V1,V2",
                   help="one axis of the grid (repeat for more axes)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default 1)")
    p.add_argument("--one-at-a-time", action="store_true", default=None,
                   help="the base plus one axis changed at a time (default: every combination)")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--max-steps", type=int, help="optimizer steps per cell (same tokens for every cell)")
    limit.add_argument("--budget", type=_seconds, metavar="SECONDS", help="wall time per cell (e.g. 120s)")
    p.add_argument("--tasks", metavar="NAME,...", help="score each finished cell on these tasks (as eval --tasks)")
    p.add_argument("--threads", default="auto", metavar="N|auto", help="CPU threads per cell (default auto)")
    p.add_argument("--parallel", default="1", metavar="N|auto",
                   help="cells trained at once: one per GPU (auto: every visible GPU) or N CPU processes that split "
                        "the cores (default 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for cells, results.csv, report.md and PNGs")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their commands, train nothing")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN FLAGS",
                   help="further `neoformer train` flags for every cell, after --")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import ConfigError
    from ..eval.ablate import cell_command, make_plan, read_base, run_grid
    from ..eval.report import write_report

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder")
    base, saved = read_base(args.base, out)  # flags win over the base YAML's ablate section

    def pick(flag, key, default=None):
        return flag if flag is not None else saved.get(key, default)

    max_steps = pick(args.max_steps, "max_steps")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"--max-steps ({max_steps}) must be >= 1")
    budget = pick(args.budget, "budget")
    if max_steps is not None and budget is not None:
        raise ConfigError("--max-steps and --budget both set (flags or the ablate section); pass one")
    extra = [a for a in args.train_args if a != "--"] or [str(a) for a in saved.get("train_args", [])]
    grid = args.grid or saved.get("grid") or []
    plan = make_plan(base, [str(g) for g in grid], seeds=pick(args.seeds, "seeds", 1), max_steps=max_steps,
                     budget=budget, tasks=pick(args.tasks, "tasks"), extra=extra,
                     one_at_a_time=bool(pick(args.one_at_a_time, "one_at_a_time", False)))
    if args.dry_run:
        for cell in plan.cells:
            command = " ".join(cell_command(plan, cell, out / "cells" / cell.name))
            print(f"{cell.name}{' (base)' if cell.base else ''}: neoformer {command}")
        return 0
    parallel = args.parallel if args.parallel == "auto" else _count(args.parallel)
    results = run_grid(plan, out, threads=str(args.threads), parallel=parallel)
    info = json.loads((out / "plan.json").read_text())
    for kind, path in write_report(results, out, info).items():
        print(f"{kind}: {path}")
    return 0


__all__ = ["add_parser", "run"]
