"""Ablation grids: every cell trained through ``neoformer train``, resumable, summarised in a report.

    neoformer ablate --base neoformer-x-demo --grid model.nsb=true,false --grid model.n_kv_heads=1,3 \\
        --seeds 2 --max-steps 300 --tasks builtin:addition --out runs/ablate

Each cell (one value per ``--grid`` axis, times ``--seeds``) is a ``neoformer train`` run in
``OUT/cells/NAME`` (a child process: the exact training path, data and token budget of the command;
a crash in one cell cannot take the grid down). A cell is finished when its ``result.json`` exists:
a rerun skips it; a cell that was killed mid-run resumes from its last checkpoint (``--resume``).
With ``parallel`` > 1 several cells train at once: one per CUDA device (``CUDA_VISIBLE_DEVICES``
of each child), or N CPU processes that split the cores between them (``--threads auto`` becomes
cores // N per cell).
``report.write_report`` then writes ``results.csv``, ``report.md`` and the PNGs.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, did_you_mean

SECTIONS = ("model", "train", "data", "tokenizer")
RESULT = "result.json"


@dataclass(frozen=True)
class Axis:
    field: str  # dotted: model.nsb
    values: tuple[Any, ...]


@dataclass
class Cell:
    settings: dict[str, Any]  # field -> value of this cell
    seed: int
    base: bool = False  # every setting equals the base config's

    @property
    def label(self) -> str:
        return ", ".join(f"{k.partition('.')[2]}={_show(v)}" for k, v in self.settings.items()) or "base"

    @property
    def name(self) -> str:
        parts = [f"{k.partition('.')[2]}-{_show(v)}" for k, v in self.settings.items()] or ["base"]
        return "__".join(parts + [f"seed{self.seed}"]).replace("/", "_")


@dataclass
class Plan:
    base: str  # preset name or config path
    axes: list[Axis]
    cells: list[Cell]
    train_flags: list[str]
    tasks: str | None = None
    base_values: dict[str, Any] = field(default_factory=dict)


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def parse_axis(spec: str) -> Axis:
    """``"model.n_kv_heads=1,3"`` -> Axis; one :class:`ConfigError` line when it is malformed."""
    name, eq, values = spec.partition("=")
    name = name.strip()
    if not eq or not name or not values.strip():
        raise ConfigError(f"--grid {spec!r}: expected SECTION.FIELD=V1,V2,... (e.g. model.nsb=true,false)")
    section, dot, attr = name.partition(".")
    if section not in SECTIONS or not dot or not attr:
        raise ConfigError(f"--grid {spec!r}: the field must be SECTION.FIELD with SECTION one of {', '.join(SECTIONS)}")
    known = _fields(section)
    if attr not in known:
        raise ConfigError(f"--grid {spec!r}: {section} has no field {attr!r}{did_you_mean(attr, known)}")
    parsed = []
    for item in values.split(","):
        if not item.strip():
            raise ConfigError(f"--grid {spec!r}: an empty value")
        try:
            parsed.append(yaml.safe_load(item.strip()))
        except yaml.YAMLError:
            raise ConfigError(f"--grid {spec!r}: cannot read value {item.strip()!r}") from None
    parsed = [_number(v) for v in parsed]
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"--grid {spec!r}: a value is listed twice")
    return Axis(name, tuple(parsed))


def _number(value: Any) -> Any:
    """YAML reads ``1e4`` as a string; a grid means the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _fields(section: str) -> list[str]:
    import dataclasses

    from ..config import ModelConfig
    from ..train.run_config import DataConfig, TokenizerConfig, TrainConfig

    cls = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "tokenizer": TokenizerConfig}[section]
    return [f.name for f in dataclasses.fields(cls)]


def _base_flag(base: str) -> list[str]:
    if Path(base).is_file():
        return ["--config", str(base)]
    from ..presets import PRESETS

    if base not in PRESETS:
        raise ConfigError(f"--base {base!r} is neither a config file nor a preset{did_you_mean(base, list(PRESETS))}")
    return ["--preset", base]


def _resolved_config(base: str, overrides: dict[str, Any]):
    """The run config of a cell, validated as `neoformer train` would (one line naming the cell)."""
    from ..train.run_config import load_run_config

    flag, value = _base_flag(base)
    return load_run_config(value if flag == "--config" else None, value if flag == "--preset" else None, overrides)


ABLATE_KEYS = {"grid", "seeds", "max_steps", "budget", "tasks", "one_at_a_time", "train_args"}


def read_base(base: str, out: Path) -> tuple[str, dict[str, Any]]:
    """A base YAML may carry an ``ablate:`` section (grid, seeds, max_steps, budget, tasks,
    one_at_a_time, train_args): it is split off, and the cells train on the rest (``OUT/base.yaml``)."""
    path = Path(base)
    if not path.is_file():
        return base, {}
    data = yaml.safe_load(path.read_text()) or {}
    settings = data.pop("ablate", None) if isinstance(data, dict) else None
    if not settings:
        return base, {}
    unknown = set(settings) - ABLATE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in the ablate section "
                          f"(known: {', '.join(sorted(ABLATE_KEYS))})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "base.yaml").write_text(f"# the run config of {path} without its ablate section\n" + yaml.safe_dump(data))
    return str(out / "base.yaml"), settings


def _cell_settings(base: str, axes: list[Axis], base_values: dict[str, Any], one_at_a_time: bool):
    """Settings of every cell: the full product of the axes, or the base plus one axis changed at a time."""
    if not one_at_a_time:
        return [dict(zip((a.field for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]
    cells: list[dict[str, Any]] = [{}]
    for a in axes:
        cells += [{a.field: v} for v in a.values if not _same(v, base_values[a.field])]
    return cells


def make_plan(base: str, grid: list[str], *, seeds: int = 1, max_steps: int | None = None,
              budget: float | None = None, tasks: str | None = None, extra: list[str] | None = None,
              one_at_a_time: bool = False) -> Plan:
    if not grid:
        raise ConfigError("pass at least one --grid SECTION.FIELD=V1,V2")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds ({seeds}) must be >= 1")
    axes = [parse_axis(g) for g in grid]
    if len({a.field for a in axes}) != len(axes):
        raise ConfigError("a --grid field is given twice; list all its values in one --grid")
    base_run = _resolved_config(base, {})
    base_values = {a.field: _get(base_run, a.field) for a in axes}
    every = _cell_settings(base, axes, base_values, one_at_a_time)
    for settings in every:
        try:
            _resolved_config(base, settings)
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"grid cell {settings}: {err}") from None
    # seed-major order: a grid stopped early has every cell at least once
    cells = [Cell(settings, seed, all(_same(settings[k], base_values[k]) for k in settings))
             for seed in range(seeds) for settings in every]
    if not any(c.base for c in cells):  # the base config is not in the grid: compare against the first cell
        for c in cells:
            c.base = c.settings == cells[0].settings
    flags = _base_flag(base)
    if max_steps is not None:
        flags += ["--max-steps", str(max_steps)]
    if budget is not None:
        flags += ["--time-budget", str(budget)]
    return Plan(base, axes, cells, flags + list(extra or []), tasks, base_values)


def _get(run, dotted: str):
    section, _, attr = dotted.partition(".")
    return getattr(getattr(run, section), attr)


def _same(a, b) -> bool:
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))


# ---- running cells -------------------------------------------------------------------------------
def cell_command(plan: Plan, cell: Cell, out: Path, threads: str = "auto") -> list[str]:
    """The ``neoformer`` arguments that train one cell (``train --preset ... --out ... [--resume]``)."""
    cmd = ["train", *plan.train_flags, "--out", str(out), "--seed", str(cell.seed), "--no-progress",
           "--threads", threads, "--samples", "0"]
    for key, value in cell.settings.items():
        cmd += [f"--{key}", _show(value)]
    if (out / "checkpoints" / "latest").exists():  # a killed cell continues where it stopped
        cmd.append("--resume")
    elif out.exists():
        cmd.append("--overwrite")  # a cell killed before its first checkpoint starts over
    return cmd


def read_metrics(run: Path) -> dict[str, Any]:
    """Final numbers and the validation curve of one training run."""
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    vals = [r for r in records if "val_loss" in r]
    trains = [r for r in records if "loss" in r]
    end = next((r for r in reversed(records) if r.get("event") == "end"), {})
    return {"val_loss": vals[-1]["val_loss"] if vals else None, "train_loss": trains[-1]["loss"] if trains else None,
            "steps": max((r.get("step", 0) for r in records), default=0), "tokens": end.get("tokens"),
            "seconds": end.get("elapsed"), "curve": [[r["step"], r["val_loss"], r.get("elapsed")] for r in vals]}


def _score_tasks(run: Path, tasks: str) -> dict[str, float]:
    from ..checkpoint import load_checkpoint
    from .run import evaluate_tasks, parse_tasks

    model, tokenizer, _ = load_checkpoint(run, device="cpu", kinds=("decoder",), command="ablate --tasks")
    results = evaluate_tasks(model, tokenizer, parse_tasks(tasks))
    return {f"{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items()}


def run_in_child(args: list[str], logfile, env: dict[str, str] | None = None) -> int:
    """``neoformer ARGS`` in a child process (the default runner of a cell); ``env``: extra variables."""
    return subprocess.run([sys.executable, "-m", "neoformer.cli", *args], stdout=logfile, stderr=subprocess.STDOUT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}).returncode


def worker_slots(parallel: int | str) -> list[dict[str, str]]:
    """The extra environment of each concurrent worker: ``"auto"`` is one worker per CUDA device
    (one worker without several GPUs); N workers take the devices in turn, or share the CPU."""
    import torch

    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if parallel == "auto":
        parallel = max(1, devices)
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel ({parallel}) must be a number >= 1 or auto")
    if devices > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(devices)]
        return [{"CUDA_VISIBLE_DEVICES": ids[i % devices]} for i in range(parallel)]
    return [{} for _ in range(parallel)]


def split_threads(threads: str, slots: list[dict[str, str]]) -> str:
    """CPU workers split the cores: ``auto`` becomes cores // workers per cell (OpenMP threads of
    several processes spinning on the same cores slow every one of them down)."""
    if threads != "auto" or len(slots) == 1 or any(slots):
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return str(max(1, cores // len(slots)))


def run_cell(plan: Plan, cell: Cell, root: Path, log=print, threads: str = "auto", runner=run_in_child,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train (or resume) one cell and write its result.json; a finished cell is read back.
    ``runner(args, logfile, env) -> exit code`` runs ``neoformer ARGS`` (tests run it in-process)."""
    out = root / "cells" / cell.name
    done = out / RESULT
    if done.is_file():
        log(f"skip {cell.name} (done)")
        return json.loads(done.read_text())
    cmd = cell_command(plan, cell, out, threads)
    log(f"run  {cell.name}{' (resume)' if '--resume' in cmd else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"{cell.name}.log").open("a") as logfile:
        code = runner(cmd, logfile, env or {})
    if code != 0:
        raise RuntimeError(f"cell {cell.name} failed (exit {code}); see {out.parent / (cell.name + '.log')}")
    result = {"cell": cell.label, "name": cell.name, "seed": cell.seed, "base": cell.base,
              "settings": cell.settings, **read_metrics(out)}
    if plan.tasks:
        result["tasks"] = _score_tasks(out, plan.tasks)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, done)  # atomic: a half-written result never marks a cell done
    return result


def run_grid(plan: Plan, root: str | os.PathLike, log=print, threads: str = "auto",
             runner=run_in_child, parallel: int | str = 1) -> list[dict[str, Any]]:
    """Every cell of ``plan`` (finished ones read back), ``parallel`` at a time (see :func:`worker_slots`);
    results in plan order. A failing cell stops new cells from starting; running ones finish."""
    slots = worker_slots(parallel)
    threads = split_threads(threads, slots)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"base": plan.base, "grid": {a.field: a.values for a in plan.axes},
                                                "seeds": len({c.seed for c in plan.cells}),
                                                "train_flags": plan.train_flags, "tasks": plan.tasks}, indent=1))
    started = time.perf_counter()
    free: queue.Queue = queue.Queue()
    for slot in slots:
        free.put(slot)

    def one(cell: Cell) -> dict[str, Any]:
        slot = free.get()  # a device (or a share of the CPU) for as long as the cell trains
        try:
            return run_cell(plan, cell, root, log, threads, runner, slot)
        finally:
            free.put(slot)

    if len(slots) == 1:
        results = [one(cell) for cell in plan.cells]
    else:
        log(f"{len(slots)} cells at a time{f', {threads} thread(s) each' if threads != 'auto' else ''}")
        with ThreadPoolExecutor(len(slots)) as pool:
            futures = [pool.submit(one, cell) for cell in plan.cells]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    log(f"grid of {len(plan.cells)} runs done in {time.perf_counter() - started:.0f} s")
    return results


__all__ = ["Axis", "Cell", "Plan", "make_plan", "parse_axis", "run_cell", "run_grid", "read_metrics", "cell_command", "run_in_child",
           "worker_slots", "split_threads"]
