"""A crafted checkpoint or run folder never runs code, never makes neoformer read or write outside
it, and `--data hf:NAME` never reaches the network unless asked (issue 16, items 1-3 and 8)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neoformer import build_model
from neoformer.checkpoint import CheckpointError, load_model, resolve_checkpoint, save_checkpoint, verify_checkpoint
from neoformer.checkpoint.plain import _manifest
from neoformer.checkpoint.sharded import load_sharded, save_sharded
from neoformer.cli import main
from neoformer.tokenizer import CharTokenizer, TokenizerError, load_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-steps", "2", "--batch", "2", "--seq", "16", "--no-progress", "--threads", "1", "--eval-every", "0",
        "--train.plot", "false"]


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def run(tmp_path, word_corpus) -> Path:
    """A finished tiny run (char tokenizer, plain checkpoints at steps 1 and 2)."""
    corpus = word_corpus(tmp_path / "corpus", docs=3, lines=40, words_per_line=7)
    out = tmp_path / "run"
    assert main(["train", "--preset", "neoformer-x-debug", "--data", str(corpus), "--tokenizer", "char",
                 "--out", str(out), "--save-every", "1", *TINY]) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def tiny_model():
    torch.manual_seed(0)
    return build_model("neoformer-x-debug", vocab_size=32, max_seq_len=32)


# ---- 1. nothing is unpickled -------------------------------------------------------------------
class _CreatesMarker:
    """Unpickling this object calls open(marker, "w"): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _craft_pickled_sharded(checkpoint: Path, marker: Path) -> None:
    """Turn a plain checkpoint into a first-format sharded one whose .metadata runs code when unpickled;
    the manifest is rewritten so that every file checks out."""
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "sharded.json").write_text(json.dumps({
        "format": "neoformer-sharded", "version": 1, "world_size": 1, "parallel": "fsdp", "optimizer": True,
        "rank_states": False}))
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_CreatesMarker(marker)))
    (checkpoint / "manifest.json").unlink()
    (checkpoint / "manifest.json").write_text(json.dumps(_manifest(checkpoint)))


def test_pickled_sharded_metadata_never_runs(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _craft_pickled_sharded(resolve_checkpoint(run), marker)
    capsys.readouterr()
    assert main(["checkpoint", "consolidate", str(run), str(tmp_path / "merged")]) == 2
    assert "pickle" in one_error_line(capsys) and not marker.exists()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--threads", "1"]) == 2
    assert "pickle" in one_error_line(capsys) and not marker.exists()


def test_sharded_save_and_load_never_use_pickle(tmp_path, monkeypatch):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 32, (2, 8)))[0].sum().backward()
    optimizer.step()
    path = save_sharded(tmp_path / "ck", model, optimizer, extra={"step": 1})
    assert not (path / ".metadata").exists() and not list(path.rglob("*.distcp"))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during a checkpoint load")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    fresh = tiny_model()
    torch.nn.init.zeros_(fresh.decoder.norm.weight)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert load_sharded(path, fresh, fresh_optimizer)["extra"] == {"step": 1}
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


# ---- 2. every path stays inside the checkpoint / run folder -----------------------------------
def test_latest_pointing_into_another_run_is_refused(tmp_path, run, capsys):
    victim = tmp_path / "victim"
    save_checkpoint(victim / "checkpoints", 7, tiny_model())
    before = sorted(p.name for p in (victim / "checkpoints").iterdir())
    (run / "checkpoints" / "latest").write_text("../../victim/checkpoints/step-000007\n")
    with pytest.raises(CheckpointError, match="refused"):
        resolve_checkpoint(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress", "--threads", "1"]) == 2
    assert "refused" in one_error_line(capsys)
    assert sorted(p.name for p in (victim / "checkpoints").iterdir()) == before
    assert not (victim / "metrics.jsonl").exists()


def test_run_latest_symlink_leaving_the_run_is_refused(tmp_path, run):
    (run / "latest").unlink()
    other = save_checkpoint(tmp_path / "other", 1, tiny_model())
    (run / "latest").symlink_to(other, target_is_directory=True)
    with pytest.raises(CheckpointError, match="outside"):
        resolve_checkpoint(run / "latest")


@pytest.mark.parametrize("entry", ["../secret.txt", "ABSOLUTE", "link"])
def test_manifest_entries_outside_are_never_read(tmp_path, entry):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"s" * 987_654)  # a size that cannot appear by chance in the tmp path
    path = save_checkpoint(tmp_path / "ck", 1, tiny_model())
    if entry == "link":  # a file inside that is a symlink to the outside
        (path / "link").symlink_to(secret)
    name = str(secret) if entry == "ABSOLUTE" else entry
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0" * 64}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path)
    message = str(err.value).replace(str(tmp_path), "TMP")  # the message may name paths; sizes must not leak
    assert "refused" in message and "bytes" not in message and "987654" not in message


def test_manifest_files_must_be_a_mapping(tmp_path):
    path = save_checkpoint(tmp_path / "ck", 1, tiny_model())
    (path / "manifest.json").write_text(json.dumps({"files": ["model.safetensors"]}))
    with pytest.raises(CheckpointError, match="corrupt"):
        verify_checkpoint(path)


def test_symlinked_weights_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ck", 1, tiny_model())
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside"):
        load_model(path)


def test_tokenizer_meta_cannot_name_a_file_outside(tmp_path):
    outside = tmp_path / "outside"
    train_bpe(["the cat sat on the mat"] * 50, vocab_size=280).save(outside)
    crafted = tmp_path / "ck" / "tokenizer"
    CharTokenizer.from_texts(["abc"]).save(crafted)
    meta = json.loads((outside / "tokenizer_meta.json").read_text())
    for name in (str(outside / meta["file"]), f"../../outside/{meta['file']}"):
        (crafted / "tokenizer_meta.json").write_text(json.dumps({**meta, "file": name}))
        with pytest.raises(TokenizerError, match="refused"):
            load_tokenizer(crafted)


# ---- 3. no network for hf: ----------------------------------------------------------------------
FAKE_DATASETS = '''
import os, json
SEEN = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
open(os.environ["FAKE_DATASETS_LOG"], "w").write(json.dumps(SEEN))
class DatasetDict(dict): pass
def load_from_disk(path): raise FileNotFoundError(path)
def load_dataset(path, *args, **kwargs):
    raise ConnectionError(f"Couldn't reach {path} on the Hub (offline={SEEN})")
'''


@pytest.mark.parametrize("allow", [False, True])
def test_hf_data_runs_datasets_offline_unless_allowed(tmp_path, allow):
    fake = tmp_path / "fake" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_DATASETS)
    log = tmp_path / "seen.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NEOFORMER_ALLOW"))}
    env.update(PYTHONPATH=f"{fake.parent}{os.pathsep}{REPO}", FAKE_DATASETS_LOG=str(log))
    if allow:
        env["NEOFORMER_ALLOW_DOWNLOAD"] = "1"
    code = "from neoformer.data.sources import hf_corpus\ntry:\n    hf_corpus('someone/corpus')\n" \
           "except ValueError as err:\n    print(err)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(log.read_text())
    if allow:
        assert seen == {"HF_DATASETS_OFFLINE": None, "HF_HUB_OFFLINE": None}
        assert "could not load" in out.stdout
    else:
        assert seen == {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        assert "provide it locally" in out.stdout and "NEOFORMER_ALLOW_DOWNLOAD=1" in out.stdout
        assert len(out.stdout.strip().splitlines()) == 1


# ---- 8. export never overwrites the checkpoint -----------------------------------------------------
def test_export_refuses_the_checkpoint_itself_and_a_file(run, tmp_path, capsys):
    checkpoint = resolve_checkpoint(run)
    capsys.readouterr()
    for out in (checkpoint, run, checkpoint / "hf"):
        assert main(["export", str(run), "--out", str(out)]) == 2
        assert "overlaps the checkpoint" in one_error_line(capsys)
    verify_checkpoint(checkpoint)
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    assert main(["export", str(run), "--out", str(a_file)]) == 2
    assert "is a file" in one_error_line(capsys) and a_file.read_text() == "keep"
    other = save_checkpoint(tmp_path / "other", 1, tiny_model())
    assert main(["export", str(run), "--out", str(other)]) == 2
    assert "holds a neoformer checkpoint" in one_error_line(capsys)
    verify_checkpoint(other)
