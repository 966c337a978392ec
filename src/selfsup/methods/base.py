"""The contract every method fulfils, and the registry that maps ``method.name`` to a class.

The trainer knows nothing about any method; a method knows nothing about devices, logging,
checkpoint files or launchers. State that must survive a restart (teachers, queues, pseudo-labels)
lives in parameters, buffers or ``get_extra_state`` and so travels with ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selfsup.config import Config, DataConfig, MethodConfig, check_choice
from selfsup.data.loader import MultiView
from selfsup.data.transforms import transform_from_config
from selfsup.models.backbones import build_backbone


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, read every N steps


@dataclass(frozen=True)
class DataInfo:
    """What a method may know about the training data (never the labels for its loss)."""

    num_samples: int
    num_classes: int


# view names are transform names of selfsup.data.transforms
AUGMENTATIONS = ("weak/strong", "weak/weak", "strong/weak", "strong/strong")
_VIEW = {"weak": "weak", "strong": "aug+"}


def augmentation_views(augmentation: str) -> tuple[str, str]:
    """UMBC ``--augmentation target/query`` → transform names in our order (query view, target view).

    ``weak/strong`` (the seeds' ``--weak_strong``): the key/target/teacher view is WEAK, the query
    view AUG+.
    """
    check_choice("method.augmentation", augmentation, AUGMENTATIONS)
    target, query = augmentation.split("/")
    return _VIEW[query], _VIEW[target]


class Method(nn.Module):
    """Base class: subclasses set ``views`` and implement :meth:`training_step`.

    ``views`` names one transform per view; the loader produces them in this order.
    """

    views: tuple[str, ...] = ("aug+", "aug+")

    def __init__(self, cfg: MethodConfig, full: Config, data: DataInfo):
        super().__init__()
        self.cfg = cfg
        self.data = data

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        # DDP calls forward: route to the method's step so gradients are synchronised.
        return self.training_step(views, indices, labels)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      labels: torch.Tensor) -> StepOutput:
        """One step's loss. ``labels`` are for monitoring only (e.g. neighbour purity), never the loss."""
        raise NotImplementedError

    def build_views(self, data: DataConfig) -> Callable[..., list[torch.Tensor]]:
        """``image -> list of view tensors`` for the data pipeline. Default: one transform per name in
        ``views``. Multi-crop methods override it (views of several sizes, per-image flags as 0-d tensors)."""
        return MultiView([transform_from_config(data, name) for name in self.views])

    def on_before_optimizer_step(self) -> None:
        """After backward, before the optimiser step: e.g. gradient clipping, freezing a layer's update."""

    def on_after_step(self, progress: float) -> None:
        """After the optimiser step: teacher EMA, schedules. ``progress`` in [0, 1] over the whole run."""

    def on_epoch_start(self, epoch: int, loader: Any) -> None:
        """Before each epoch (0-indexed), e.g. to recompute pseudo-labels."""

    @property
    def backbone(self) -> nn.Module:
        """The encoder that evaluation and export use."""
        raise NotImplementedError

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups. Default: every trainable parameter, weight decay on all of them
        (as the MoCo and UMBC code do, BN and biases included)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


class Encoder(nn.Module):
    """backbone → head, with the backbone reachable for evaluation."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def new_backbone(full: Config) -> tuple[nn.Module, int]:
    return build_backbone(full.model)


MethodFactory = Callable[[MethodConfig, Config, DataInfo], Method]
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        METHODS[name] = cls
        return cls

    return wrap


def build_method(cfg: Config, data: DataInfo) -> Method:
    check_choice("method.name", cfg.method.name, METHODS)
    return METHODS[cfg.method.name](cfg.method, cfg, data)
