"""A run folder belongs to one process at a time: a lock file that a crashed run does not leave stuck, and the
bookkeeping that keeps a resumed run's files as if it had never stopped.

The lock (``RUN/.lock``) holds the owner's host, pid and start time; the owner refreshes its time stamp every
``HEARTBEAT_S`` seconds. A lock is stale, and is taken over with a note, when its process is gone (same host) or its
heartbeat is older than ``STALE_S`` (another host: a crashed node). The same process may take its own lock again
(a second Trainer in one script).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from selfsup.engine.checkpoint import atomic_write
from selfsup.errors import ConfigError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunFolderBusy(ConfigError):
    """Another live process owns the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """Owns ``run_dir`` until :meth:`release`; a heartbeat thread keeps the lock fresh."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        """The recorded owner, or None when there is no lock (an unreadable lock counts as stale: None too)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == self.owner["host"]:
            return holder.get("pid") == self.owner["pid"] or not _alive(int(holder.get("pid", -1)))
        with contextlib.suppress(OSError):
            return time.time() - self.path.stat().st_mtime > STALE_S
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock removed by its owner between our reads: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and not self._stale(holder):
                    raise RunFolderBusy(
                        f"run folder {self.path.parent} is in use by process {holder.get('pid')} on "
                        f"{holder.get('host')} (since {time.ctime(holder.get('started', 0))}); wait for it, or choose "
                        "another train.run_name (delete its .lock only if you are sure that process is gone)"
                    ) from None
                if holder is not None and holder.get("pid") != self.owner["pid"]:
                    warnings.warn(f"taking over the stale lock of {self.path.parent} (process {holder.get('pid')} "
                                  f"on {holder.get('host')} is gone)", RuntimeWarning, stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self.owner, handle)
            break
        else:
            raise RunFolderBusy(f"could not take the lock of run folder {self.path.parent}")
        self._thread = threading.Thread(target=self._beat, name="selfsup-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if (self.holder() or {}).get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)


def check_run_name(name: str) -> str:
    """A run name is a folder name under ``train.output_dir``, never a path."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise ConfigError(f"train.run_name={name!r} is not a name: use a plain folder name (no '/' or '..'); the "
                          "folder goes under train.output_dir")
    return name


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed run left behind (``.checkpoint.pt.tmp-<pid>`` and the like)."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def truncate_metrics(path: Path, step: int, epoch: int) -> int:
    """Drop the records a resumed run will write again: steps after ``step`` and epoch ends after ``epoch``.
    Returns how many were dropped (the file is rewritten atomically)."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1  # a torn line of a killed run
            continue
        later = (isinstance(record, dict) and (
            ("step" in record and "epoch_end" not in record and record["step"] > step)
            or record.get("epoch_end", 0) > epoch or record.get("budget_seconds") is not None))
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write(path, lambda handle: handle.write("".join(f"{line}\n" for line in kept).encode()))
    return dropped
