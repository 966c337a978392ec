"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the fix."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file, fsync, then rename it over ``path``: a crash at any moment
    leaves either the previous file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (the previous checkpoint survives any crash)."""
    return atomic_write(path, lambda handle: torch.save(state, handle))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the ``checkpoint.pt`` inside a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: pass a run folder (runs/<name>) or a .pt file")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load safely: tensors and plain containers only. A file that needs pickle execution is refused."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        globals_needed = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
        if not globals_needed:
            raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt?): {error}".split("\n")[0]) \
                from None
        raise CheckpointError(
            f"{path} needs arbitrary pickle code to load ({globals_needed[0]}), which selfsup refuses "
            "(weights_only=True). If you trust the file, re-save its tensors with torch.save(state_dict)."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict of state")
    return state
