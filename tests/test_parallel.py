"""neoformer.parallel on CPU with Gloo: DDP and FSDP2 at world size 2 train exactly like one
process on the same global batch (float64, so differences are rounding only); a sharded save at
world size 2 resumes at world size 2 and 1 with identical continuations; consolidation gives
a normal checkpoint. One torchrun launch (tests/_parallel_worker.py) serves all 2-rank checks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _parallel_worker as worker  # noqa: E402

from neoformer import parallel  # noqa: E402
from neoformer.model import build_model  # noqa: E402
from neoformer.cli import main as cli_main  # noqa: E402
from neoformer.checkpoint import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
TOL = dict(rtol=0, atol=1e-10)  # float64


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Results of the 2-rank worker: DDP, DDP with accumulation, FSDP with a sharded save, resume."""
    out = tmp_path_factory.mktemp("parallel")
    torchrun([str(ROOT / "tests" / "_parallel_worker.py"), str(out)])
    return out, torch.load(out / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference():
    """One process, no wrapping, the whole global batch: 4 steps."""
    ctx = parallel.ParallelContext()
    model, opt = worker.make(ctx, "none")
    losses = worker.train(model, opt, ctx, 0, 4)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m: f"{key}: {m}")


# ---- single process --------------------------------------------------------------------------
def test_single_process_context(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    ctx = parallel.setup()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.any(True) and not ctx.any(False)
    assert ctx.mean(torch.tensor(2.5)) == 2.5
    assert ctx.gather_objects({"a": 1}) == [{"a": 1}]
    assert parallel.default_mode(ctx) == "none"
    model = build_model("nima-debug")
    assert parallel.apply(model, ctx, "fsdp") is model and model.parallel_mode == "none"
    parallel.teardown(ctx)
    with pytest.raises(ValueError, match="parallel"):
        parallel.apply(model, ctx, "zero3")
    with pytest.raises(ValueError, match="unsynchronised"):
        parallel.apply(model, parallel.ParallelContext(rank=0, world_size=2), "none")


def test_shard_batch_is_disjoint_and_complete():
    rows = torch.arange(12).reshape(6, 2)
    for world in (1, 2, 3, 6):
        pieces = [parallel.shard_batch((rows, {"y": rows + 100}), parallel.ParallelContext(rank=r, world_size=world))
                  for r in range(world)]
        assert torch.equal(torch.cat([x for x, _ in pieces]), rows)  # in order, nothing lost or repeated
        assert torch.equal(torch.cat([d["y"] for _, d in pieces]), rows + 100)
    with pytest.raises(ValueError, match="divisible"):
        parallel.shard_batch(rows, parallel.ParallelContext(rank=0, world_size=4))

    @dataclasses.dataclass
    class Pairs:  # like data.Seq2SeqBatch
        src: torch.Tensor
        tgt: torch.Tensor
        note: str = "kept"

    half = parallel.shard_batch(Pairs(rows, rows * 2), parallel.ParallelContext(rank=1, world_size=2))
    assert torch.equal(half.src, rows[3:]) and torch.equal(half.tgt, rows[3:] * 2) and half.note == "kept"

    class Source:  # resumable batch source: state passes through the wrapper
        def __init__(self):
            self.step = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.step += 1
            return rows + self.step

        def state_dict(self):
            return {"step": self.step}

    sharded = parallel.ShardedBatches(Source(), parallel.ParallelContext(rank=1, world_size=3))
    assert torch.equal(next(iter(sharded)), rows[2:4] + 1) and sharded.state_dict() == {"step": 1}
    assert not hasattr(parallel.ShardedBatches(iter([rows]), parallel.ParallelContext()), "state_dict")


def test_activation_checkpointing_keeps_keys_and_gradients():
    torch.manual_seed(0)
    plain = build_model("neoformer-x-debug", dtype=torch.float64)
    wrapped = build_model("neoformer-x-debug", dtype=torch.float64)
    wrapped.load_state_dict(plain.state_dict())
    parallel.apply(wrapped, parallel.ParallelContext(), activation_checkpointing=True)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    x, y = worker.global_batch(0, plain.config.vocab_size)
    for model in (plain, wrapped):
        model.loss(x, y)[0].backward()
    grads = dict(plain.named_parameters())
    for name, p in wrapped.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(p.grad, grads[name].grad, **TOL)


def test_sharded_checkpoint_single_process(tmp_path):
    ctx = parallel.ParallelContext()
    model, opt = worker.make(ctx, "none")
    worker.train(model, opt, ctx, 0, 1)
    path = parallel.save_sharded(tmp_path / "ck", model, opt, extra={"step": 1, "sampler": {"epoch": 0, "batch": 1}})
    parallel.save_sharded(path, model, opt, extra={"step": 1})  # overwriting is atomic and allowed
    assert parallel.is_sharded_checkpoint(path) and [p.name for p in tmp_path.iterdir()] == ["ck"]
    fresh, fresh_opt = worker.make(ctx, "none")
    info = parallel.load_sharded(path, fresh, fresh_opt)
    assert info["extra"] == {"step": 1} and info["world_size"] == 1
    assert_same_weights(fresh.state_dict(), model.state_dict())
    assert worker.train(fresh, fresh_opt, ctx, 1, 2) == worker.train(model, opt, ctx, 1, 2)

    (path / "sharded.json").unlink()  # an interrupted save is refused, with a clear message
    with pytest.raises(ValueError, match="interrupted"):
        parallel.load_sharded(path, fresh)
    with pytest.raises(FileNotFoundError):
        parallel.load_sharded(tmp_path / "missing", fresh)


def test_sharded_save_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from neoformer.checkpoint import CheckpointError

    model, opt = worker.make(parallel.ParallelContext(), "none")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", disk_full)  # what DCP's safetensors writer calls
    with pytest.raises(CheckpointError, match="could not save checkpoint ck in .*: the disk is full"):
        parallel.save_sharded(tmp_path / "ck", model, opt)
    assert list(tmp_path.iterdir()) == []


# ---- two ranks (one torchrun launch) -----------------------------------------------------------
def test_ranks_agree_on_stopping(two_ranks):
    _, res = two_ranks
    assert res["any"] == [True, False]  # rank 1's flag reaches rank 0
    assert res["agree"] == "time_budget"
    assert res["gathered"] == [{"rank": 0}, {"rank": 1}]


def test_ddp_matches_single_process(two_ranks, reference):
    _, res = two_ranks
    assert res["world_size"] == 2
    assert res["ddp_losses"] == pytest.approx(reference[0], abs=1e-6)
    assert_same_weights(res["ddp"], reference[1])


def test_ddp_with_unequal_targets_per_rank_matches_single_process(two_ranks):
    """Ranks weighted by their share of targets (``token_share``) give the global token mean."""
    _, res = two_ranks
    ctx = parallel.ParallelContext()
    model, opt = worker.make(ctx, "none")
    losses = worker.train(model, opt, ctx, 0, 4, masked=True)
    assert res["ddp_masked_losses"] == pytest.approx(losses, abs=1e-6)
    # gradients agree to ~1e-17, but here AdamW turns the rounding of a few near-zero gradients
    # into ~1e-8 weight differences by step 3 (the same happens between two one-process runs that
    # sum the rows in a different order), so the weights are compared at 1e-6
    for key, want in model.state_dict().items():
        torch.testing.assert_close(res["ddp_masked"][key], want, rtol=0, atol=1e-6)


def test_ddp_gradient_accumulation_matches_single_process(two_ranks, reference):
    _, res = two_ranks
    assert_same_weights(res["ddp_accum"], reference[1])


def test_fsdp_matches_single_process(two_ranks, reference):
    _, res = two_ranks
    assert res["fsdp_losses"] == pytest.approx(reference[0], abs=1e-6)
    assert_same_weights(res["fsdp"], reference[1])


def test_resume_at_world_size_2_continues_identically(two_ranks, reference):
    _, res = two_ranks
    assert res["resumed_losses"] == pytest.approx(reference[0][2:], abs=1e-6)
    assert_same_weights(res["resumed"], reference[1])


@pytest.mark.slow
def test_fsdp_with_compile_and_checkpointing_matches_single_process(tmp_path, reference):
    torchrun([str(ROOT / "tests" / "_parallel_worker.py"), str(tmp_path), "compiled"], timeout=600)
    res = torch.load(tmp_path / "compiled.pt", weights_only=True)
    assert res["losses"] == pytest.approx(reference[0], abs=1e-6)
    for key, want in reference[1].items():  # inductor may reorder float64 sums
        torch.testing.assert_close(res["weights"][key], want, rtol=1e-7, atol=1e-9)


def test_resume_at_world_size_1_continues_identically(two_ranks, reference):
    out, _ = two_ranks
    ctx = parallel.ParallelContext()
    model, opt = worker.make(ctx, "none")
    info = parallel.load_sharded(out / "ckpt", model, opt, ctx)
    assert info["world_size"] == 2 and info["parallel"] == "fsdp" and info["rank_state"] is None
    losses = worker.train(model, opt, ctx, info["extra"]["step"], 4)
    assert losses == pytest.approx(reference[0][2:], abs=1e-6)
    assert_same_weights(model.state_dict(), reference[1])


def test_consolidate_gives_a_normal_checkpoint(two_ranks, tmp_path):
    out, _ = two_ranks
    full = parallel.read_full_state(out / "ckpt")["model"]
    target = parallel.consolidate(out / "ckpt", tmp_path / "plain")
    model, _ = load_model(target)  # the normal loader builds fp32 models
    assert_same_weights(model.state_dict(), {k: v.to(torch.float32) for k, v in full.items()})
    with pytest.raises(ValueError, match="different"):
        parallel.consolidate(out / "ckpt", out / "ckpt")



# ---- `neoformer train` under torchrun ------------------------------------------------------------
# fp32: these runs are compared to 1e-5 (`--precision auto` is bf16 on CPUs with native bf16)
TINY = ["--preset", "neoformer-x-debug", "--tokenizer", "char", "--max-steps", "3", "--batch", "4", "--seq", "16",
        "--no-progress", "--eval-every", "2", "--save-every", "2", "--train.eval_batches", "2", "--train.plot", "false",
        "--train.log_every", "1", "--precision", "fp32"]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """An FSDP run at world size 2 (torchrun) and the same run in one process."""
    base = tmp_path_factory.mktemp("cli")
    corpus = base / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran past small red houses".split()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(7)) for _ in range(60)))
    cache = {"NEOFORMER_CACHE": str(base / "cache")}
    args = [*TINY, "--data", str(corpus)]
    torchrun(["-m", "neoformer.cli", "train", *args, "--out", str(base / "fsdp"), "--parallel", "fsdp"], env=cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEOFORMER_CACHE", cache["NEOFORMER_CACHE"])
        threads = torch.get_num_threads()
        assert cli_main(["train", *args, "--out", str(base / "single"), "--threads", "1"]) == 0
        torch.set_num_threads(threads)
    return base


def test_cli_fsdp_run_matches_single_process(cli_runs):
    fsdp, single = _losses(cli_runs / "fsdp"), _losses(cli_runs / "single")
    assert sorted(fsdp) == [1, 2, 3]
    assert fsdp == pytest.approx(single, rel=1e-5)
    step = cli_runs / "fsdp" / "checkpoints" / "step-000003"
    assert parallel.is_sharded_checkpoint(step) and (cli_runs / "fsdp" / "checkpoints" / "latest").is_file()


def test_cli_resume_fsdp_checkpoint_in_one_process(cli_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("NEOFORMER_CACHE", str(cli_runs / "cache"))
    run = tmp_path / "resumed"
    shutil.copytree(cli_runs / "fsdp", run)
    shutil.rmtree(run / "checkpoints" / "step-000003")
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    threads = torch.get_num_threads()
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress", "--threads", "1"]) == 0
    torch.set_num_threads(threads)
    assert _losses(run)[3] == pytest.approx(_losses(cli_runs / "single")[3], rel=1e-5)


def test_cli_consolidate_then_generate(cli_runs, tmp_path, capsys):
    with pytest.raises(Exception, match="consolidate"):  # the normal loader points at the fix
        load_model(cli_runs / "fsdp")
    out = tmp_path / "merged"
    assert cli_main(["checkpoint", "consolidate", str(cli_runs / "fsdp"), str(out)]) == 0
    merged, tokenizer = load_model(out)
    single, _ = load_model(cli_runs / "single")
    for (name, a), (_, b) in zip(merged.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert cli_main(["checkpoint", "consolidate", str(cli_runs / "fsdp"), str(out)]) == 2  # never overwrites
    capsys.readouterr()
    assert cli_main(["generate", str(out), "--prompt", "the cat", "-n", "4", "--greedy", "--no-stream"]) == 0
    assert "the cat" in capsys.readouterr().out
