"""The Python API: what ``selfsup train`` runs, callable from a script or a notebook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfsup.config import Config
from selfsup.engine.trainer import Trainer
from selfsup.eval.callback import Evaluation
from selfsup.nn import distributed


def build_trainer(cfg: Config, resume: str | Path | None = None) -> Trainer:
    """A :class:`Trainer` for ``cfg`` with the run's evaluation (``eval`` section) attached."""
    return Trainer(cfg, callbacks=[Evaluation(cfg)], resume=resume)


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train (and evaluate) one run; the process group is torn down afterwards. Returns the evaluation scores."""
    try:
        return build_trainer(cfg, resume).fit()
    finally:
        distributed.shutdown()
