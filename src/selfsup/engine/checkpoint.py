"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``.

A checkpoint is untrusted input: torch's weights-only unpickler admits tensors and plain containers and nothing
that runs code, and the zip archive is checked before torch reads it (entries stored uncompressed, as torch writes
them, and no larger than the file), so no file can make us execute code or allocate more than its own size.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
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
    except OSError as error:  # a full or read-only disk: name the file we meant to write (write() names none)
        raise type(error)(error.errno, error.strerror, str(path)) from error
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
    check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused:
            raise CheckpointError(
                f"{path} contains code: it names the Python object {refused.group(1)}, which selfsup does not "
                "execute, so the file must not be loaded (selfsup refuses it). A checkpoint of your own can be saved "
                "again as tensors only (torch.save(model.state_dict(), path))") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt, or not a checkpoint: "
                              f"{_torch_reason(error)})") from None
    except Exception as error:  # zip reader, legacy reader, tensor rebuild: RuntimeError, EOFError, ValueError ...
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt: "
                              f"{type(error).__name__}: {_torch_reason(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict of state")
    return state


def check_archive(path: Path) -> None:
    """Refuse a zip checkpoint whose entries are compressed or claim more bytes than the file holds, before torch
    reads it: torch stores every entry uncompressed, and a compressed one can expand a thousandfold. (The pre-1.6
    format is no zip; torch reserves a storage's claimed size there but fills it only from the file.)"""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (a damaged zip archive: {error})") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise CheckpointError(
                f"{path} is not a checkpoint as torch writes them: its entry {entry.filename[:80]!r} is compressed "
                f"or its sizes disagree ({entry.compress_size} bytes stored, {entry.file_size} declared), and "
                "selfsup refuses to expand it (a decompression bomb hides this way)")
    declared, size = sum(entry.file_size for entry in entries), path.stat().st_size
    if declared > size:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: its entries declare {declared} bytes, "
                              f"more than the file's {size} (corrupt archive)")


_TORCH_ADVICE = ("weights_only", "Weights only load failed", "trust", "torch.load", "file an issue",
                 "can still be loaded", "add_safe_globals")


def _torch_reason(error: BaseException) -> str:
    """The line of torch's error that says what is wrong, without its advice to load the file unsafely."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not any(advice in line for advice in _TORCH_ADVICE)]
    return (useful[0].split(". ")[0] if useful else type(error).__name__)[:200]  # its first sentence
