"""An ablation grid's results as ``results.csv``, a markdown report and PNGs.

Per cell (settings shared by its seeds): mean ± sample standard deviation over seeds of the final
validation loss, train loss, wall time and every task metric, and the difference of the means
against the base cell. With one seed there is no spread: the report says so instead of implying
precision it does not have.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

METRICS = ("val_loss", "train_loss", "seconds")


def _by_cell(results: list[dict]) -> dict[str, list[dict]]:
    cells: dict[str, list[dict]] = {}
    for r in results:
        cells.setdefault(r["cell"], []).append(r)
    return cells


def _metric_names(results: list[dict]) -> list[str]:
    names = [m for m in METRICS if any(r.get(m) is not None for r in results)]
    tasks = sorted({k for r in results for k in (r.get("tasks") or {})})
    return names + tasks


def _value(r: dict, name: str):
    return r.get(name) if name in METRICS else (r.get("tasks") or {}).get(name)


def summarize(results: list[dict]) -> list[dict[str, Any]]:
    """One row per cell: ``{"cell", "base", "n", metric: (mean, std or None)}``."""
    rows = []
    for label, runs in _by_cell(results).items():
        row: dict[str, Any] = {"cell": label, "base": runs[0]["base"], "n": len(runs)}
        for name in _metric_names(results):
            values = [v for v in (_value(r, name) for r in runs) if v is not None]
            if values:
                row[name] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
        rows.append(row)
    return rows


def write_csv(results: list[dict], path: Path) -> None:
    fields = sorted({k for r in results for k in r.get("settings", {})})
    metrics = _metric_names(results)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "seed", "base", *fields, *metrics, "steps", "tokens"])
        for r in results:
            w.writerow([r["cell"], r["seed"], r["base"], *(r["settings"].get(k) for k in fields),
                        *(_value(r, m) for m in metrics), r.get("steps"), r.get("tokens")])


def _fmt(stat, digits: int = 4) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _delta(stat, base_stat, digits: int = 4) -> str:
    if stat is None or base_stat is None:
        return "-"
    return f"{stat[0] - base_stat[0]:+.{digits}f}"


def markdown(results: list[dict], plan_info: dict[str, Any]) -> str:
    rows = summarize(results)
    metrics = _metric_names(results)
    base = next((r for r in rows if r["base"]), rows[0])
    seeds = max(r["n"] for r in rows)
    grid = ", ".join(f"`{k}` in {{{', '.join(map(str, v))}}}" for k, v in plan_info.get("grid", {}).items())
    lines = [f"# Ablation: {plan_info.get('base')}", "",
             f"Grid: {grid}; "
             f"{seeds} seed{'s' if seeds > 1 else ''} per cell; training flags `{' '.join(plan_info.get('train_flags', []))}`.",
             f"Base cell: **{base['cell']}**. Values are mean ± standard deviation over seeds"
             + ("" if seeds > 1 else " (one seed: no spread measured, so small differences may be noise)")
             + "; Δ is the difference of means against the base.", ""]
    compared = [m for m in metrics if m != "seconds" and "@" not in m and m != "train_loss"]  # the Δ columns
    header = ["cell", "runs"] + [f"{m}" for m in metrics] + [f"Δ {m}" for m in compared]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [("**" + r["cell"] + "**") if r["base"] else r["cell"], str(r["n"])]
        cells += [_fmt(r.get(m), 1 if m == "seconds" else 4) for m in metrics]
        cells += [_delta(r.get(m), base.get(m)) for m in compared]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![validation loss curves](loss_curves.png)", "", "![final validation loss per cell](final_metric.png)",
              "", "![final validation loss vs wall time](metric_vs_time.png)", ""]
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> list[Path]:
    """loss_curves.png, final_metric.png, metric_vs_time.png; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    cells = _by_cell(results)
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(cells)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in cells.items():
        for i, r in enumerate(runs):
            curve = [p for p in r.get("curve", []) if p[1] is not None]
            if curve:
                ax.plot([p[0] for p in curve], [p[1] for p in curve], color=colors[label], alpha=0.8,
                        label=label if i == 0 else None)
    ax.set(xlabel="step", ylabel="validation loss", title="validation loss per cell (one line per seed)")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "loss_curves.png"))
    rows = summarize(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    means = [r["val_loss"][0] if r.get("val_loss") else math.nan for r in rows]
    errs = [r["val_loss"][1] or 0.0 if r.get("val_loss") else 0.0 for r in rows]
    ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color=[colors[r["cell"]] for r in rows])
    ax.set_xticks(range(len(rows)), [r["cell"] for r in rows], rotation=30, ha="right", fontsize=7)
    finite = [m for m in means if not math.isnan(m)]
    if finite:
        ax.set_ylim(min(finite) - 0.1 * (max(finite) - min(finite) + 0.05), max(finite) + 0.1 * (max(finite) - min(finite) + 0.05))
    ax.set(ylabel="final validation loss", title="final validation loss (mean ± std over seeds)")
    written.append(_save(fig, out / "final_metric.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in cells.items():
        pts = [(r["seconds"], r["val_loss"]) for r in runs if r.get("seconds") and r.get("val_loss") is not None]
        if pts:
            ax.scatter(*zip(*pts), color=colors[label], label=label)
    ax.set(xlabel="wall time (s)", ylabel="final validation loss", title="final validation loss vs wall time")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "metric_vs_time.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(results: list[dict], out: str | Path, plan_info: dict[str, Any]) -> dict[str, Path]:
    out = Path(out)
    write_csv(results, out / "results.csv")
    (out / "report.md").write_text(markdown(results, plan_info))
    pngs = plot(results, out)
    return {"csv": out / "results.csv", "report": out / "report.md", **{p.stem: p for p in pngs}}


__all__ = ["summarize", "write_csv", "markdown", "plot", "write_report"]
