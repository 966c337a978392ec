"""The contract every method fulfils, and the registry that maps ``method.name`` to a method.

A method is built from three things only: its own hyper-parameters (a :class:`~selfsup.config.MethodConfig`
subclass), a backbone factory, and a frozen :class:`RunInfo`. It never sees the run configuration, the
trainer, the loader or the labels. The trainer drives it through :meth:`Method.training_step` and the hooks
below; state that must survive a restart (teachers, queues, pseudo-labels) lives in parameters, buffers or
``get_extra_state`` and so travels with ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from selfsup.config import MethodConfig
from selfsup.data.recipes import ViewLayout
from selfsup.errors import check_choice
from selfsup.registry import METHODS

BackboneFactory = Callable[[], tuple[nn.Module, int]]  # a fresh, seeded backbone and the width of its features


@dataclass(frozen=True)
class RunInfo:
    """What a method may know about the run: sizes and lengths, never the data or its labels."""

    num_samples: int  # training images
    num_classes: int | None  # classes of the training set when known (None: unlabelled)
    global_batch: int  # images per optimiser step over all processes
    steps_per_epoch: int
    total_steps: int  # planned at the start; a time budget re-plans it (hooks receive the current plan)
    seed: int = 0  # the run seed, for a method's own seeded draws (e.g. SeLa's initial labels)


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``step`` optimiser steps done, of ``total_steps`` planned."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> int:
        """The 0-indexed epoch that ``step`` lies in."""
        return self.step // self.steps_per_epoch

    @property
    def fraction(self) -> float:
        """``step / total_steps`` in [0, 1]."""
        return min(self.step / max(self.total_steps, 1), 1.0)


@dataclass
class Batch:
    """One step's input on the training device: the views and the dataset indices of its images. No labels."""

    views: list[torch.Tensor]  # one (B, C, H, W) tensor per view, in the order of the method's ``views``
    indices: torch.Tensor  # (B,) int64 dataset indices
    choices: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) bool per choice of the layout (Mugs)

    def split(self, parts: int) -> list[Batch]:
        """``parts`` consecutive micro-batches (gradient accumulation); the batch itself when ``parts`` is 1."""
        if parts == 1:
            return [self]
        views = [view.tensor_split(parts) for view in self.views]
        indices = self.indices.tensor_split(parts)
        choices = {name: value.tensor_split(parts) for name, value in self.choices.items()}
        return [Batch([v[i] for v in views], indices[i], {name: c[i] for name, c in choices.items()})
                for i in range(parts)]


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, read every N steps
    # (B, k) dataset indices of the neighbours the loss used (-1: an empty slot); the engine scores their purity
    # against the labels when the data has labels (ISD, MSF)
    neighbours: torch.Tensor | None = None


@dataclass
class ParamGroup:
    """Optimiser options of a set of parameters: a multiple of the scheduled lr, and whether weight decay applies."""

    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: bool = True  # False: never decayed (biases and norms in ViT recipes)


@dataclass(frozen=True)
class EmbedRequest:
    """Ask the engine to embed the whole training set with ``module`` (one pass, sharded over processes)."""

    module: nn.Module
    transform: str = "train"  # train: the method's first training view | eval: the deterministic eval transform
    train_mode: bool = True  # run ``module`` in train mode (batch statistics, dropout)
    shuffle: bool = True  # visit the images in a seeded random order (else by index)
    seed: int = 0  # the order and the augmentations
    storage: str = "auto"  # features: auto (the device when they fit, else host memory) | device | host


class Embedding(NamedTuple):
    features: torch.Tensor  # (n, D) float32 features of this process's shard
    indices: torch.Tensor  # (n,) int64 dataset indices of those rows


class MethodEntry(NamedTuple):
    method: type[Method]
    config: type[MethodConfig]


# view names are recipe names of selfsup.data.recipes
AUGMENTATIONS = ("weak/strong", "weak/weak", "strong/weak", "strong/strong")
_VIEW = {"weak": "weak", "strong": "aug+"}


def augmentation_views(augmentation: str) -> ViewLayout:
    """UMBC ``--augmentation target/query`` → the views in our order (query view, target view).

    ``weak/strong`` (the seeds' ``--weak_strong``): the key/target/teacher view is WEAK, the query
    view AUG+.
    """
    check_choice("method.augmentation", augmentation, AUGMENTATIONS)
    target, query = augmentation.split("/")
    return ViewLayout.of(_VIEW[query], _VIEW[target])


class Method(nn.Module):
    """Base class: subclasses set ``views`` and implement :meth:`training_step` and :attr:`backbone`.

    ``views`` is the method's :class:`~selfsup.data.recipes.ViewLayout` (recipes or recipe names, and per-image
    choices); every data route produces them in this order.
    """

    views: ViewLayout = ViewLayout.of("aug+", "aug+")

    def __init__(self, cfg: MethodConfig, run: RunInfo):
        super().__init__()
        self.cfg = cfg
        self.run = run
        self._reports: list[dict] = []

    def forward(self, batch: Batch) -> StepOutput:
        # DDP calls forward: route to the method's step so gradients are synchronised.
        return self.training_step(batch)

    def training_step(self, batch: Batch) -> StepOutput:
        """One step's loss on ``batch``."""
        raise NotImplementedError

    @property
    def backbone(self) -> nn.Module:
        """The encoder that evaluation and export use."""
        raise NotImplementedError

    def parameter_groups(self) -> list[ParamGroup]:
        """Optimiser parameter groups. Default: every trainable parameter, weight decay on all of them
        (as the MoCo and UMBC code do, BN and biases included)."""
        return [ParamGroup([p for p in self.parameters() if p.requires_grad])]

    # ------------------------------------------------------------------ hooks (all optional)

    def on_step_start(self, progress: Progress) -> None:
        """Before the step after ``progress.step`` steps: e.g. read a per-epoch schedule."""

    def embedding_request(self, progress: Progress) -> EmbedRequest | None:
        """Before that step: an :class:`EmbedRequest` to have the training set embedded first (SeLa)."""
        return None

    def on_embedding(self, embedding: Embedding) -> None:
        """The answer to :meth:`embedding_request`: this process's shard of the embedded training set."""

    def on_before_optimizer_step(self, progress: Progress) -> None:
        """After backward, before the optimiser step: e.g. gradient clipping, freezing a layer's update."""

    def on_after_step(self, progress: Progress) -> None:
        """After the optimiser step (``progress.step`` counts it): teacher EMA, schedules."""

    def cluster_assignments(self) -> torch.Tensor | None:
        """(N,) cluster of every training image by dataset index, for the engine to score against the labels
        when they are known (SeLa: the pseudo-labels of head 0); None when the method has none."""
        return None

    def report(self, record: dict) -> None:
        """Hand the engine a record to log and show (e.g. what a label update did)."""
        self._reports.append(record)

    def take_reports(self) -> list[dict]:
        """The records reported since the last call (the engine logs them)."""
        reports, self._reports = self._reports, []
        return reports


def register_method(*configs: type[MethodConfig]) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``method.name=<config.name>`` selects the decorated method with ``config``'s fields, for
    each config given (one class may serve several named variants, as ISD and ISD+)."""

    def wrap(cls: type[Method]) -> type[Method]:
        for config in configs:
            METHODS.add(config.name, MethodEntry(cls, config))
        return cls

    return wrap


def build_method(cfg: MethodConfig, backbone: BackboneFactory, run: RunInfo) -> Method:
    """The method ``cfg.name`` with its hyper-parameters ``cfg``."""
    return METHODS[cfg.name].method(cfg, backbone, run)
