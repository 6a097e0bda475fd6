"""Saving and loading the resumable state of a generation."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` (from ``generate``'s ``on_state``) to ``path`` atomically.

    The data goes to a temporary file in the same directory, is flushed to disk,
    and then replaces ``path`` in one rename, so a crash leaves either the old
    file or the new one, never a partial file. The directory entry is flushed too.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a state written by ``save_state``, with tensors on the CPU.

    Uses ``torch.load(weights_only=True)``, so the file cannot run code.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        found = type(state).__name__
        raise ValueError(f"{path} does not contain a generation state (found {found}).")
    return state


def _fsync_directory(directory: Path) -> None:
    # Windows cannot open a directory for fsync.
    if os.name == "nt":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
