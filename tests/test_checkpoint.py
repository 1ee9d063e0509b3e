"""Checkpoints: round trip, atomic writes, keep-last-K, clear errors, and exact resume after SIGKILL."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from neoformer import build_model
from neoformer.tokenizer import CharTokenizer
from neoformer.train import CheckpointError, TrainConfig, causal_lm, fit, list_checkpoints, load_model, save_checkpoint
from neoformer.checkpoint import (
    capture_rng_state, decode_state, encode_state, load_training_state, load_weights, resolve_checkpoint,
    restore_rng_state,
)

REPO = Path(__file__).resolve().parents[1]


def tiny(preset="neoformer-x-debug", **overrides):
    torch.manual_seed(0)
    return build_model(preset, vocab_size=32, max_seq_len=32, **overrides)


def save(root, step, model=None, **kwargs):
    model = model or tiny()
    return save_checkpoint(root, step, model, training_state={"step": step, "rng": capture_rng_state()}, **kwargs)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ValueError)
    return message


def test_round_trip_with_tied_weights_and_tokenizer(tmp_path):
    from safetensors import safe_open

    model = tiny()
    model.rmc.apply_update(torch.ones_like(model.rmc.memory), lr=0.5)  # buffers travel too
    tok = CharTokenizer("abc")
    path = save_checkpoint(tmp_path, 7, model, tokenizer=tok, config={"train": {"lr": 1.0}})
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys, aliases = set(f.keys()), json.loads(f.metadata()["aliases"])
    assert "lm_head.weight" not in keys and aliases == {"lm_head.weight": "embed.tokens.weight"}
    loaded, loaded_tok = load_model(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.tokens.weight.data_ptr()  # still tied
    assert loaded_tok.encode("cab") == tok.encode("cab")
    x = torch.randint(0, 32, (2, 12))
    model.eval()
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    config = json.loads((path / "config.json").read_text())
    assert config["step"] == 7 and config["model"]["d_model"] == 64 and config["tokenizer"]["kind"] == "char"
    assert config["train"] == {"lr": 1.0}


def test_training_state_round_trip_without_pickle(tmp_path):
    model = tiny("nexus-debug")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randint(0, 32, (2, 8)))[0].sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "np": np.arange(3, dtype=np.int32), "t": (1, 2.5, None), "rng": capture_rng_state()}
    save_checkpoint(tmp_path, 1, model, training_state=state)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))
    back = load_training_state(tmp_path)
    assert back["t"] == (1, 2.5, None) and back["np"].dtype == np.int32
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    for key, value in opt.state_dict()["state"].items():  # int keys survive JSON
        for name, tensor in value.items():
            assert torch.equal(back["optimizer"]["state"][key][name], tensor)
    fresh = torch.optim.AdamW(tiny("nexus-debug").parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])


def test_rng_state_round_trip():
    state = decode_state(encode_state(capture_rng_state(), tensors := {}), tensors)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_atomic_write_failure_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    first = save(tmp_path, 1)
    real_save = safetensors.torch.save_file
    calls = []

    def fail_on_second(*args, **kwargs):  # the weights are written, then the save dies mid-way
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_second)
    with pytest.raises(CheckpointError, match="simulated.*step-000001 is intact"):  # one line, names what is kept
        save(tmp_path, 2)
    assert resolve_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]  # no half-written directory
    load_model(tmp_path)


def test_leftovers_of_a_killed_save_are_ignored_and_cleaned(tmp_path):
    save(tmp_path, 1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-step-000002-pid{dead.stdout.strip()}-deadbeef"
    (stale / "sub").mkdir(parents=True)
    partial = tmp_path / "step-000003"  # a directory without manifest is never a checkpoint
    partial.mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_model(partial)
    save(tmp_path, 4)
    assert not stale.exists()


def test_keep_last_k(tmp_path):
    model = tiny()
    for step in range(1, 6):
        save(tmp_path, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert (tmp_path / "latest").read_text().strip() == "step-000005"


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    path = save(tmp_path, 1)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert "truncated" in one_line(err)


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    path = save(tmp_path, 1)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "sha256" in one_line(err)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "corrupt" in one_line(err)


def test_corrupt_file_without_manifest_check(tmp_path):
    path = save(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "no manifest.json" in one_line(err)


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    save(tmp_path, 1, tiny())
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(d_model=32, n_heads=2), tmp_path)
    assert "does not fit the model" in one_line(err) and "shape" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny(rmc=False), tmp_path)
    assert "unexpected rmc" in one_line(err)


def test_edited_config_is_checked_against_the_weights(tmp_path):
    path = save(tmp_path, 1, tiny())
    config = json.loads((path / "config.json").read_text())
    config["model"]["max_seq_len"] = 48  # a harmless edit loads
    (path / "config.json").write_text(json.dumps(config))
    assert load_model(path)[0].config.max_seq_len == 48
    config["model"]["d_model"] = 32  # a mismatched config is one clear line
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "does not fit the model" in one_line(err)
    config["model"]["n_heads"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "invalid model config" in one_line(err)
    (path / "config.json").write_text('{"format": "neoformer-checkpoint", "model": ')  # truncated
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "corrupt" in one_line(err)


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "nope")
    assert "not found" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert "no checkpoint" in one_line(err)


def test_resolve_run_dir_checkpoints_dir_and_checkpoint(tmp_path):
    path = save(tmp_path / "run" / "checkpoints", 3)
    for spec in (tmp_path / "run", tmp_path / "run" / "checkpoints", path, path.parent / "latest",
                 tmp_path / "run" / "latest"):
        assert resolve_checkpoint(spec) == path
    assert (tmp_path / "run" / "latest" / "config.json").is_file()  # RUN/latest links the newest checkpoint
    newer = save(tmp_path / "run" / "checkpoints", 4)
    assert (tmp_path / "run" / "latest").resolve() == newer.resolve()
    (tmp_path / "run" / "latest").unlink()  # without the link, RUN/latest still resolves
    assert resolve_checkpoint(tmp_path / "run" / "latest") == newer


def test_resume_with_other_model_config_is_refused(tmp_path):
    model = tiny("nexus-debug")
    batches = iter([(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))] * 4)
    cfg = TrainConfig(max_steps=2, progress=False, plot=False, eval_every=0)
    fit(model, causal_lm, batches, cfg, out_dir=tmp_path, log=lambda m: None)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        fit(tiny("nexus-debug", d_model=32), causal_lm, batches, cfg, out_dir=tmp_path, resume=True, log=lambda m: None)


# ---- exact resume after SIGKILL ---------------------------------------------------------------
def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "neoformer.cli", "train", "--preset", "neoformer-x-debug", "--data", str(data),
            "--tokenizer", "char", "--out", str(out), "--max-steps", "40", "--batch", "4", "--seq", "32",
            "--save-every", "1", "--eval-every", "0", "--threads", "1", "--no-progress", "--lr", "3e-3",
            "--train.log_every", "1", "--train.plot", "false", "--train.deterministic", "true",
            "--model.hidden_dropout", "0.1", *extra]  # dropout: the torch RNG must be restored too


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}


def test_exact_resume_after_sigkill(tmp_path, word_corpus):
    data = word_corpus(tmp_path / "data", docs=4, lines=150, words_per_line=9)
    env = {**os.environ, "NEOFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # the uninterrupted run goes on beside the one to be killed (one thread each: 2 cores, half the wall time)
    straight = subprocess.Popen(_train_cmd(data, tmp_path / "a"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_train_cmd(data, tmp_path / "b"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step-000008":
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, straight_err = straight.communicate(timeout=120)
    assert straight.returncode == 0, straight_err
    killed_at = int(resolve_checkpoint(tmp_path / "b").name.split("-")[1])
    assert 8 <= killed_at < 40

    resumed = subprocess.run(_train_cmd(data, tmp_path / "b", "--resume"), env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert a == b  # bit-identical losses at every step, before and after the kill
    from safetensors.torch import load_file

    final_a = load_file(str(resolve_checkpoint(tmp_path / "a") / "model.safetensors"))
    final_b = load_file(str(resolve_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, word_corpus):
    data = word_corpus(tmp_path / "data", docs=4, lines=150, words_per_line=9)
    env = {**os.environ, "NEOFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = _train_cmd(data, tmp_path / "run", "--max-steps", "100000", "--save-every", "0")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out and "--resume" in out and "Traceback" not in err
    step = int(resolve_checkpoint(tmp_path / "run").name.split("-")[1])
    assert step >= 3 and load_training_state(tmp_path / "run")["step"] == step


# ---- a new run never destroys an old one (issue 16, items 4, 5, 9, 10) --------------------------
QUICK = ["--preset", "neoformer-x-debug", "--tokenizer", "char", "--max-steps", "2", "--batch", "2", "--seq", "16",
         "--save-every", "1", "--eval-every", "0", "--threads", "1", "--no-progress", "--train.plot", "false"]


@pytest.fixture
def quick_run(tmp_path, word_corpus, monkeypatch):
    """``quick_run(out, *flags)``: a 2-step CLI run (checkpoints at steps 1 and 2); returns the exit code."""
    from neoformer.cli import main

    monkeypatch.setenv("NEOFORMER_CACHE", str(tmp_path / "cache"))
    data = word_corpus(tmp_path / "data", docs=3, lines=40, words_per_line=7)
    threads = torch.get_num_threads()
    yield lambda out, *flags: main(["train", *QUICK, "--data", str(data), "--out", str(out), *flags])
    torch.set_num_threads(threads)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()
            and p.name != ".neoformer.lock"}


def test_new_run_refuses_a_foreign_folder_and_a_previous_run(tmp_path, quick_run, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    assert quick_run(foreign) == 2
    assert "holds no neoformer run" in _error_line(capsys) and _snapshot(foreign) == {"thesis.tex": 13}

    run = tmp_path / "run"
    assert quick_run(run) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert quick_run(run) == 2
    assert "--overwrite" in _error_line(capsys) and _snapshot(run) == before


def test_overwrite_deletes_only_the_old_runs_files_and_only_after_the_new_run_saved(tmp_path, quick_run, capsys):
    run = tmp_path / "run"
    assert quick_run(run, "--lr", "1e-3") == 0
    (run / "checkpoints" / "model_final.pt").write_text("not ours")
    (run / "tensorboard").mkdir(exist_ok=True)
    (run / "tensorboard" / "notes.txt").write_text("not ours either")
    before = _snapshot(run)
    capsys.readouterr()
    # the new run fails before its first checkpoint: the old run is back, byte for byte
    assert quick_run(run, "--overwrite", "--device", "cuda" if not torch.cuda.is_available() else "mps") == 2
    assert "not available" in _error_line(capsys)
    assert _snapshot(run) == before and not list(run.glob(".replaced-*"))
    load_model(run)
    # a valid new run replaces the old run's files, and only those
    assert quick_run(run, "--overwrite", "--lr", "2e-3") == 0
    after = _snapshot(run)
    assert after["checkpoints/model_final.pt"] and after["tensorboard/notes.txt"] and not list(run.glob(".replaced-*"))
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000001", "step-000002"]


def test_a_second_training_in_the_same_folder_is_refused(tmp_path, quick_run, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from neoformer.checkpoint.rundir import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert quick_run(run) == 2
        assert f"in use by another training (pid {holder.pid}" in _error_line(capsys)
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert quick_run(run) == 0  # the dead holder's lock is stale: taken over
    assert not (run / ".neoformer.lock").exists()  # released at the end


def test_torn_last_metrics_line_does_not_block_resume(tmp_path, quick_run, capsys):
    run = tmp_path / "run"
    assert quick_run(run) == 0
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 3, "lo')  # killed mid-append
    assert quick_run(run, "--resume", "--max-steps", "3") == 0
    assert all(json.loads(line) for line in metrics.read_text().splitlines())
    capsys.readouterr()
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    assert quick_run(run, "--resume", "--max-steps", "4") == 2
    assert f"{metrics} line 2" in _error_line(capsys)


def test_half_deleted_checkpoints_are_cleaned(tmp_path, monkeypatch):
    for step in (1, 2):
        save(tmp_path, step)
    half = tmp_path / "step-000000"  # killed while an older neoformer was pruning it
    (half / "tokenizer").mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"x")
    import neoformer.checkpoint.plain as plain

    monkeypatch.setattr(plain.shutil, "rmtree", lambda *a, **k: None)  # as if killed right after the rename
    save(tmp_path, 3, keep_last=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == ["step-000002", "step-000003"]


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, quick_run, capsys,
                                                                                monkeypatch):
    import errno

    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def disk_full_on_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # weights + training state of step 1 are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_second_checkpoint)
    run = tmp_path / "run"
    assert quick_run(run) == 2
    err = _error_line(capsys)
    assert "could not save checkpoint step-000002" in err and "the disk is full" in err
    assert "step-000001 is intact" in err
    monkeypatch.undo()
    assert resolve_checkpoint(run).name == "step-000001" and not list((run / "checkpoints").glob(".tmp-*"))
    load_model(run)


def test_owned_reads_equal_the_mapped_tensors_and_refuse_a_short_file(tmp_path):
    from safetensors.torch import save_file

    from neoformer.checkpoint.plain import _read_safetensors, read_owned_tensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randint(-128, 127, (7,), dtype=torch.int8),
               "c": torch.randn(4).to(torch.bfloat16), "empty": torch.zeros(0, 2)}
    save_file(tensors, tmp_path / "w.safetensors")
    mapped, _ = _read_safetensors(tmp_path / "w.safetensors")
    owned = read_owned_tensors(tmp_path / "w.safetensors", list(tensors))
    assert all(torch.equal(owned[k], mapped[k]) and owned[k].dtype == mapped[k].dtype for k in tensors)
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_owned_tensors(tmp_path / "short.safetensors", list(tensors))
