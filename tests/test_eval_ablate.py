"""`neoformer ablate`: a 2x1 grid of tiny cells runs, a rerun skips finished cells and resumes a
killed one, the report has mean ± std and deltas, bad grid specs are one line."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neoformer.cli import main
from neoformer.config import ConfigError
from neoformer.eval.ablate import make_plan, parse_axis, run_grid
from neoformer.eval.report import write_report

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--data", "task:addition", "--tokenizer", "char", "--batch", "2", "--seq", "24", "--eval-every", "2",
         "--save-every", "2", "--train.eval_batches", "1", "--train.plot", "false", "--precision", "fp32"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))


def in_process(calls):
    """A cell runner that calls `neoformer train` in this process (the same argv the child gets)."""
    def run(args, logfile, env):
        calls.append(args)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(args)
        logfile.write(out.getvalue())
        return code
    return run


def test_grid_runs_resumes_a_killed_cell_and_skips_done_ones(tmp_path):
    plan = make_plan("nexus-debug", ["model.n_kv_heads=1,4"], max_steps=4, extra=TRAIN, tasks="builtin:copy")
    assert [c.label for c in plan.cells] == ["n_kv_heads=1", "n_kv_heads=4"]
    calls: list[list[str]] = []
    results = run_grid(plan, tmp_path / "abl", log=lambda *a: None, threads="1", runner=in_process(calls))
    assert len(calls) == 2 and all(r["steps"] == 4 and r["val_loss"] is not None for r in results)
    assert "builtin:copy/exact_match" in results[0]["tasks"]
    before = json.loads((tmp_path / "abl/cells/n_kv_heads-4__seed0/result.json").read_text())

    # cell 2 "killed" after its step-2 checkpoint: no result, latest -> step 2, later files gone
    cell = tmp_path / "abl/cells/n_kv_heads-4__seed0"
    (cell / "result.json").unlink()
    shutil.rmtree(cell / "checkpoints/step-000004")
    (cell / "checkpoints/latest").write_text("step-000002\n")
    (cell / "latest").unlink()
    calls.clear()
    again = run_grid(plan, tmp_path / "abl", log=lambda *a: None, threads="1", runner=in_process(calls))
    assert len(calls) == 1 and "--resume" in calls[0] and str(cell) in calls[0]  # cell 1 skipped
    assert again[1]["steps"] == 4 and again[0] == results[0]
    # an exact resume (fp32, pinned thread) ends where the uninterrupted cell ended
    assert again[1]["val_loss"] == pytest.approx(before["val_loss"], abs=1e-6)

    paths = write_report(again, tmp_path / "abl", {"base": "nexus-debug", "grid": {"model.n_kv_heads": [1, 4]}})
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["model.n_kv_heads"] for r in rows] == ["1", "4"]
    report = paths["report"].read_text()
    assert "Δ val_loss" in report and "one seed: no spread" in report and "**n_kv_heads=1**" in report
    assert {"loss_curves", "final_metric", "metric_vs_time"} <= set(paths)


def finished_run(args) -> int:
    """What a finished `neoformer train ARGS` leaves behind for the grid: metrics.jsonl in --out."""
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 2.0, "val_loss": 1.5}) + "\n")
    return 0


def test_parallel_cells_run_at_once_split_the_cores_and_resume(tmp_path):
    """--parallel 2 on CPU: both cells are inside their runner at the same time (a barrier that
    only two concurrent cells can pass), each with half the cores; a rerun skips both; a failing
    cell raises after the other one has finished and kept its result."""
    plan = make_plan("nexus-debug", ["model.n_kv_heads=1,4"], max_steps=4, extra=TRAIN)
    both_running = threading.Barrier(2, timeout=20)
    calls: list[tuple[list[str], dict]] = []

    def fake_train(args, logfile, env):
        calls.append((args, env))
        both_running.wait()
        return finished_run(args)

    results = run_grid(plan, tmp_path / "abl", log=lambda *a: None, runner=fake_train, parallel=2)
    assert [r["cell"] for r in results] == ["n_kv_heads=1", "n_kv_heads=4"]  # plan order
    cores = len(os.sched_getaffinity(0))
    assert [a[a.index("--threads") + 1] for a, _ in calls] == [str(max(1, cores // 2))] * 2
    assert all(env == {} for _, env in calls)  # no GPUs: CPU workers
    calls.clear()
    assert run_grid(plan, tmp_path / "abl", log=lambda *a: None, runner=fake_train, parallel=2) == results
    assert calls == []  # finished cells are skipped, in parallel mode too

    for cell in ("n_kv_heads-1__seed0", "n_kv_heads-4__seed0"):
        (tmp_path / "abl/cells" / cell / "result.json").unlink()
    second_started, first_failed = threading.Event(), threading.Event()

    def first_fails(args, logfile, env):
        if args[args.index("--model.n_kv_heads") + 1] == "1":
            assert second_started.wait(20)
            first_failed.set()
            return 3
        second_started.set()
        assert first_failed.wait(20)  # the second cell is still running when the first one fails
        return finished_run(args)

    with pytest.raises(RuntimeError, match="cell n_kv_heads-1__seed0 failed"):
        run_grid(plan, tmp_path / "abl", log=lambda *a: None, runner=first_fails, parallel=2)
    assert (tmp_path / "abl/cells/n_kv_heads-4__seed0/result.json").is_file()  # the other cell finished


def test_parallel_flag_and_gpu_slots(monkeypatch):
    import torch

    from neoformer.eval.ablate import split_threads, worker_slots

    assert worker_slots("auto") == [{}] and worker_slots(3) == [{}, {}, {}]  # no GPU here
    with pytest.raises(ConfigError, match="--parallel"):
        worker_slots(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    slots = worker_slots("auto")
    assert slots == [{"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "6"}]
    assert split_threads("auto", slots) == "auto"  # GPU cells keep their own thread setting
    assert worker_slots(3)[2] == {"CUDA_VISIBLE_DEVICES": "4"}


def test_report_mean_std_and_delta(tmp_path):
    def result(cell, seed, loss, base):
        return {"cell": cell, "seed": seed, "base": base, "settings": {"model.nsb": cell == "nsb=true"},
                "val_loss": loss, "train_loss": loss, "seconds": 1.0, "curve": [[0, 3.0, 0.1], [4, loss, 1.0]]}
    results = [result("nsb=true", 0, 2.0, True), result("nsb=true", 1, 2.2, True),
               result("nsb=false", 0, 2.5, False), result("nsb=false", 1, 2.7, False)]
    paths = write_report(results, tmp_path, {"base": "x", "grid": {"model.nsb": [True, False]}})
    report = paths["report"].read_text()
    assert "2.1000 ± 0.1414" in report and "2.6000 ± 0.1414" in report and "+0.5000" in report


@pytest.mark.parametrize("spec, message", [
    ("model.nsb", "expected SECTION.FIELD=V1,V2"),
    ("nsb=true,false", "SECTION one of model, train"),
    ("model.n_kv_head=1,2", "did you mean 'n_kv_heads'"),
    ("model.nsb=true,,false", "an empty value"),
    ("model.n_kv_heads=1,1", "listed twice"),
])
def test_bad_grid_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_axis(spec)


def test_bad_input_through_the_cli_is_one_line(tmp_path, capsys):
    for args, message in (
        (["--grid", "model.nsb"], "expected SECTION.FIELD"),
        (["--grid", "model.n_kv_heads=1,5"], "grid cell {'model.n_kv_heads': 5}"),
        (["--grid", "model.nsb=true", "--seeds", "0"], "--seeds (0)"),
        (["--grid", "model.nsb=true", "--base", "no-such-preset"], "neither a config file nor a preset"),
    ):
        base = [] if "--base" in args else ["--base", "nexus-debug"]
        assert main(["ablate", *base, *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


def test_dry_run_prints_every_cell(tmp_path, capsys):
    assert main(["ablate", "--base", "nexus-debug", "--grid", "model.nsb=true,false", "--grid",
                 "model.rope_base=1e4,5e5", "--seeds", "2", "--max-steps", "3", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and all("--max-steps 3" in line for line in lines)
    assert "--model.rope_base 500000" in "\n".join(lines)


@pytest.mark.slow
def test_a_real_kill_resumes(tmp_path):
    """SIGKILL the grid (and its training child) mid-run; the rerun skips the done cell and resumes."""
    out = tmp_path / "abl"
    cmd = [sys.executable, "-m", "neoformer.cli", "ablate", "--base", "nexus-debug", "--grid", "model.n_kv_heads=1,4",
           "--max-steps", "400", "--out", str(out), "--threads", "1", "--", *TRAIN, "--save-every", "20"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cell2 = out / "cells/n_kv_heads-4__seed0/checkpoints/latest"
    deadline = time.time() + 300
    while not cell2.exists() and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "cells/n_kv_heads-1__seed0/result.json").exists()
    assert not (out / "cells/n_kv_heads-4__seed0/result.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "skip n_kv_heads-1__seed0" in done.stdout and "run  n_kv_heads-4__seed0 (resume)" in done.stdout
    assert json.loads((out / "cells/n_kv_heads-4__seed0/result.json").read_text())["steps"] == 400


@pytest.mark.slow
def test_parallel_children_give_the_sequential_results(tmp_path):
    """`neoformer ablate --parallel 2`: two real training children at once end exactly where the
    same cells end when trained one after another in this process (fp32, one thread each)."""
    grid = ["model.n_kv_heads=1,4"]
    cmd = [sys.executable, "-m", "neoformer.cli", "ablate", "--base", "nexus-debug", "--grid", grid[0],
           "--max-steps", "4", "--out", str(tmp_path / "par"), "--threads", "1", "--parallel", "2", "--", *TRAIN]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "2 cells at a time, 1 thread(s) each" in done.stdout
    plan = make_plan("nexus-debug", grid, max_steps=4, extra=TRAIN)
    one_by_one = run_grid(plan, tmp_path / "seq", log=lambda *a: None, threads="1", runner=in_process([]))
    for cell, want in zip(plan.cells, one_by_one):
        got = json.loads((tmp_path / "par/cells" / cell.name / "result.json").read_text())
        assert got["steps"] == want["steps"] == 4
        assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-6)


def test_the_shipped_seed0_config_plans_its_three_ablations(tmp_path, capsys):
    assert main(["ablate", "--base", str(REPO / "configs/ablate/seed0.yaml"), "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split(":")[0] for line in lines]
    assert names[:6] == ["base__seed0 (base)", "nsb-false__seed0", "n_kv_heads-1__seed0", "n_kv_heads-8__seed0",
                         "rope_base-1000__seed0", "rope_base-500000__seed0"] and len(names) == 12
    assert "--max-steps 250" in lines[0] and (tmp_path / "base.yaml").is_file()
