"""Shared fixtures: a tiny, fast configuration (digits at 16 px, ResNet-mini, few steps)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from selfsup.config import Config, load_config
from selfsup.engine.trainer import method_for
from selfsup.methods import Batch, Method, Progress, StepOutput

TINY = [
    "data.name=digits", "data.image_size=16", "data.subset=256", "data.blur=false", "data.eval_crop_ratio=1.0",
    "model.backbone=resnet_mini", "method.queue_size=256", "method.dim=16", "method.momentum=0.99",
    "optim.lr=0.05", "train.batch_size=32", "train.epochs=2", "train.progress_bar=false",
    "train.run_name=run", "train.log_every_steps=1", "eval.at_end=false",
]


def load_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` as a module (they are scripts, not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_config(tmp_path, *overrides: str, method: str = "moco") -> Config:
    words = [w for w in TINY if method == "moco" or not w.startswith("method.")]
    return load_config(None, [f"method={method}", *words, f"train.output_dir={tmp_path}", *overrides])


def build(cfg: Config, num_samples: int = 256, num_classes: int | None = 10) -> Method:
    """The method of ``cfg`` for a training set of that size, as the trainer builds it."""
    return method_for(cfg, num_samples, num_classes)


def step(method: Method, views: list[torch.Tensor], indices: torch.Tensor, **choices: torch.Tensor) -> StepOutput:
    """One ``training_step`` on a hand-made batch."""
    return method.training_step(Batch(list(views), indices, choices))


def at(fraction: float, steps_per_epoch: int = 100, total_steps: int = 1000) -> Progress:
    """The training position ``fraction`` of the way through a 1000-step run (exact for multiples of 0.001)."""
    return Progress(round(fraction * total_steps), total_steps, steps_per_epoch)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
