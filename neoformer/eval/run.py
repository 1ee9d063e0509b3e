"""What ``neoformer eval --tasks`` does: run built-in and lm-eval tasks, flatten their metrics,
print them as a table, and append them to the run's ``metrics.jsonl``.

Task names: ``builtin:NAME`` (neoformer's own offline tasks, no lm-eval needed; ``builtin:all``
for every one) or any lm-eval task / group name (local YAML tasks with ``include_path``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks needs at least one task name (e.g. builtin:addition or hellaswag)")
    return names


def _metric_name(key: str) -> str | None:
    """lm-eval's ``"acc,none"`` -> ``"acc"``; ``"acc_stderr,none"`` and ``"alias"`` -> None."""
    metric, _, filt = key.partition(",")
    if metric == "alias" or metric.endswith("_stderr"):
        return None
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def evaluate_tasks(model, tokenizer, names: list[str], *, include_path=None, limit: int | None = None,
                   batch_size: int = 32, num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every task named (built-in ones first, then one lm-eval run)."""
    results: dict[str, dict[str, float]] = {}
    builtin = [n[len(BUILTIN_PREFIX):] for n in names if n.startswith(BUILTIN_PREFIX)]
    harness = [n for n in names if not n.startswith(BUILTIN_PREFIX)]
    if builtin:
        from .builtin import expand_names, score_task

        for name in expand_names(builtin):
            results[BUILTIN_PREFIX + name] = score_task(model, tokenizer, name, n=limit, batch_size=batch_size)
    if harness:
        try:
            from .harness import run_tasks
        except ImportError as err:
            raise ValueError(f"{err} (or use the built-in tasks: --tasks builtin:all)") from None
        out = run_tasks(model, tokenizer, harness, include_path=include_path, limit=limit, batch_size=batch_size,
                        num_fewshot=num_fewshot)
        for task, metrics in out["results"].items():
            clean = {_metric_name(k): v for k, v in metrics.items() if isinstance(v, (int, float))}
            results[task] = {k: float(v) for k, v in clean.items() if k is not None}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = [(task, metric, f"{value:.4f}") for task, metrics in results.items() for metric, value in metrics.items()]
    widths = [max(len(r[i]) for r in rows + [("task", "metric", "value")]) for i in range(3)]
    line = "  ".join("{:<%d}" % w for w in widths)
    out = [line.format("task", "metric", "value"), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    return "\n".join(out)


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder that holds ``checkpoint`` (RUN/checkpoints/step-N), if it is one."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return None


def record_in_run(checkpoint: Path, step: int | None, results: dict[str, dict[str, float]],
                  extra: dict[str, Any] | None = None) -> Path | None:
    """Append ``{"step": step, "eval/TASK/METRIC": value, ...}`` to the run's metrics.jsonl."""
    run = run_dir_of(checkpoint)
    if run is None:
        return None
    record: dict[str, Any] = {"step": step or 0, "event": "eval"}
    record.update({f"eval/{task}/{metric}": value for task, metrics in results.items()
                   for metric, value in metrics.items()})
    record.update(extra or {})
    path = run / "metrics.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return path


__all__ = ["parse_tasks", "evaluate_tasks", "format_table", "record_in_run", "run_dir_of", "BUILTIN_PREFIX"]
