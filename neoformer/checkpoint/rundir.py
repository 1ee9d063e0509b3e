"""Run folders (``neoformer train --out DIR``): one training at a time, and nothing lost by a new run.

* :class:`RunLock` — ``DIR/.neoformer.lock`` holds the pid and host of the training that owns
  the folder; a second training there is refused with one line. A lock whose process is gone
  (same host, dead pid) is stale and taken over.
* :func:`prepare_run_folder` — a new run (no ``--resume``) starts only in a new or empty folder;
  a folder that holds a previous run needs ``--overwrite``, and a non-empty folder that holds no
  run is refused. ``--overwrite`` first *moves* the previous run's own files (never anything
  else) into ``DIR/.replaced-*``; :class:`Replacement` deletes them once the new run has saved
  its first checkpoint, and puts them back if the new run fails before that.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from .plain import LATEST, _pid_alive

LOCK_FILE = ".neoformer.lock"
REPLACED_PREFIX = ".replaced-"
RUN_FILES = ("config.yaml", "metrics.jsonl", "loss_curve.png")  # written at the top of a run folder
_CORRUPT_LOCK_GRACE_S = 10.0  # an unreadable lock younger than this may be one being written


class RunFolderError(ValueError):
    """The run folder is in use, or holds something a new run must not touch. One line."""


# ---- the lock ------------------------------------------------------------------------------------
class RunLock:
    """Exclusive ownership of a run folder by this process (``with RunLock(out): ...``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False

    def _holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def _is_stale(self, holder: dict | None) -> bool:
        if holder is None:  # torn or foreign content: stale unless it may still be being written
            try:
                return time.time() - self.path.stat().st_mtime > _CORRUPT_LOCK_GRACE_S
            except FileNotFoundError:
                return True
        return holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"])

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # --out (or a folder above it) is a file
            raise RunFolderError(f"--out {self.folder} is a file; pass a folder for the run") from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._is_stale(holder):
                    who = f"pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}" \
                        if holder else "a process that is starting"
                    raise RunFolderError(f"{self.folder} is in use by another training ({who}); wait for it or "
                                         f"choose another --out (if none runs, delete {self.path})") from None
                self._break(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            return self
        raise RunFolderError(f"could not lock {self.folder}: another process keeps taking {self.path}")

    def _break(self, holder: dict | None) -> None:
        """Remove a stale lock, unless another process replaced it meanwhile."""
        moved = self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        try:
            current = json.loads(moved.read_text())
        except (OSError, ValueError):
            current = None
        if holder is not None and current != holder:  # a live process's fresh lock: put it back
            os.replace(moved, self.path)
            return
        moved.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- what a new run may touch --------------------------------------------------------------------
def run_entries(folder: Path) -> list[Path]:
    """The files and folders a run wrote in ``folder`` (only those: other files are left alone)."""
    entries = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    if (folder / LATEST).is_symlink():
        entries.append(folder / LATEST)
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        entries += [p for p in checkpoints.iterdir()
                    if p.name == LATEST or p.name.startswith(("step-", ".tmp-", f".{LATEST}."))]
    tensorboard = folder / "tensorboard"
    if tensorboard.is_dir() and not tensorboard.is_symlink():
        entries += list(tensorboard.glob("events.out.tfevents.*"))
    return entries


def holds_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / "metrics.jsonl").is_file() \
        or (folder / "checkpoints" / LATEST).is_file()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Replacement:
    """A previous run moved aside by ``--overwrite``: :meth:`discard` once the new run has a
    checkpoint, :meth:`restore` when it ends without one."""

    def __init__(self, folder: Path, aside: Path, moved: list[str]):
        self.folder, self.aside, self.moved, self.done = folder, aside, moved, False

    def discard(self) -> None:
        if not self.done:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.done = True

    def restore(self) -> None:
        if self.done:
            return
        for path in run_entries(self.folder):  # what the failed new run wrote
            _remove(path)
        for rel in self.moved:
            (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.aside / rel, self.folder / rel)
        shutil.rmtree(self.aside, ignore_errors=True)
        self.done = True
        print(f"note: the new run saved no checkpoint; the previous run in {self.folder} was put back")


def prepare_run_folder(folder: str | os.PathLike, *, resume: bool, overwrite: bool = False) -> Replacement | None:
    """Check (and create) the run folder before anything is written; see the module docstring.

    Returns the :class:`Replacement` when ``overwrite`` moved a previous run aside, else None.
    Deletes nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file; pass a folder for the run")
    leftovers = sorted(folder.glob(f"{REPLACED_PREFIX}*")) if folder.is_dir() else []
    for old in leftovers:
        print(f"note: {old} holds a run that an interrupted --overwrite moved aside; move its contents back "
              "to recover it, or delete it")
    if resume:
        return None
    others = [p for p in folder.iterdir() if p.name != LOCK_FILE and p not in leftovers] if folder.is_dir() else []
    if others and not holds_run(folder):
        raise RunFolderError(f"--out {folder} is not empty and holds no neoformer run; choose a new or empty folder")
    if others and not overwrite:
        raise RunFolderError(f"{folder} holds a previous run; continue it with --resume, replace it with --overwrite, "
                             "or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    entries = run_entries(folder) if others else []
    if not entries:
        return None
    aside = folder / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    moved = []
    for path in entries:
        rel = path.relative_to(folder).as_posix()
        (aside / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, aside / rel)
        moved.append(rel)
    print(f"note: --overwrite: the previous run in {folder} is kept in {aside.name}/ until this run saves its "
          "first checkpoint, then deleted")
    return Replacement(folder, aside, moved)


__all__ = ["LOCK_FILE", "Replacement", "RunFolderError", "RunLock", "holds_run", "prepare_run_folder", "run_entries"]
