"""The one check for paths read from a checkpoint or run folder: they must stay inside it.

A checkpoint is data someone else may have written. Every name it holds (the ``latest``
pointer, manifest entries, ``tokenizer_meta.json``'s ``file``, the ``RUN/latest`` symlink) goes
through :func:`inside` before anything is opened, stat'ed or hashed, so a crafted folder cannot
make neoformer read, write or delete elsewhere (``../../other-run``, ``/etc/hostname``, a
symlink that leaves the folder). No third-party imports: the tokenizer module uses it too.
"""
from __future__ import annotations

import os
from pathlib import Path


def inside(root: str | os.PathLike, name: str | os.PathLike, *, what: str = "path",
           error: type[Exception] = ValueError, child: bool = False) -> Path:
    """``root / name``, or ``error`` (one line) unless it resolves inside ``root``.

    Symlinks are followed, so a link inside ``root`` that points out of it is refused too.
    ``child=True`` also requires ``name`` to be one plain entry of ``root`` (no ``/``, ``..``).
    The returned path is the unresolved ``root / name`` (messages stay readable).
    """
    text = os.fspath(name) if isinstance(name, (str, os.PathLike)) else None
    if not text or "\0" in text or Path(text).is_absolute() or (child and Path(text).name != text) \
            or (child and text in (".", "..")):
        raise error(f"{what} {name!r} in {root} is not a name inside that folder; refused")
    candidate = Path(root) / text
    base, real = Path(root).resolve(), candidate.resolve()
    if real != base and base not in real.parents:
        raise error(f"{what} {text!r} in {root} points outside that folder; refused "
                    "(a checkpoint or run folder may only refer to files inside itself)")
    return candidate


__all__ = ["inside"]
