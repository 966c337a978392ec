"""The Python API: what the command line runs, callable from a script or a notebook.

    from selfsup import load_config, train, evaluate, load_backbone, embed

    result = train("quickstart", ["train.epochs=1"])        # a packaged recipe (or a YAML path, or a Config)
    scores = evaluate(result, ["knn", "rankme"])            # a run, a checkpoint, a backbone file or a module
    features, paths = embed(result, "my_images/")           # every image of a folder, one row each

``train`` also takes a backbone of your own (an ``nn.Module``, or ``(module, feature width)``) and a torch
``Dataset`` of your own (items: PIL images, or ``(image, label)`` pairs). They are registered for this Python
process under generated ``python:`` names, which the run's config records: this process can evaluate, embed, export
and report the run afterwards; another process would need them registered again (or, to name them in a recipe, a
module with ``@register_backbone`` / ``@register_dataset`` under ``imports``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.config import Config, ConfigError, apply_overrides, config_from_dict
from selfsup.config import load_config as load_config_file
from selfsup.data.datasets import ImageDataset, TorchImageDataset, folder_images, register_torch_dataset
from selfsup.engine.trainer import Trainer, resolve_device
from selfsup.eval.callback import Evaluation
from selfsup.eval.embed import embed_images, load_frozen_backbone
from selfsup.export import load_backbone
from selfsup.models.backbones import register_backbone
from selfsup.nn import distributed
from selfsup.recipe_files import find_recipe

__all__ = ["RunResult", "build_trainer", "embed", "evaluate", "load_backbone", "load_config", "train"]

DEFAULT_PROTOCOLS = ("knn", "nn", "rankme")  # evaluate()'s default: without labels, knn and nn are skipped
_names = itertools.count(1)  # the generated python:<name>-<n> of the modules and data sets given to train()


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path  # the run folder: config.yaml, metrics.jsonl, checkpoint.pt, eval.json
    scores: dict[str, dict[str, Any]]  # the end-of-training evaluation, as eval.json: {"trained": {...}, ...}
    backbone: nn.Module  # the trained backbone (on the training device)
    config: Config  # the run's configuration (with the generated names of a module or data set given to train)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A :class:`Config` from a packaged recipe name (``"quickstart"``, as ``selfsup train`` takes it) or a YAML
    path, plus dotted ``key=value`` overrides; no recipe: the library's defaults."""
    return load_config_file(find_recipe(recipe) if recipe is not None else None, overrides)


def build_trainer(cfg: Config, resume: str | Path | None = None) -> Trainer:
    """A :class:`Trainer` for ``cfg`` with the run's evaluation (``eval`` section) attached."""
    return Trainer(cfg, callbacks=[Evaluation(cfg)], resume=resume)


def _with_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    if not overrides:
        return copy.deepcopy(cfg)
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def _as_config(cfg_or_recipe: Config | str | Path | None, overrides: list[str] | None) -> Config:
    if isinstance(cfg_or_recipe, Config):
        return _with_overrides(cfg_or_recipe, overrides)
    return load_config(cfg_or_recipe, overrides)


def feature_width(module: nn.Module, image_size: int) -> int:
    """The width of ``module``'s flattened output for a batch of two ``image_size`` RGB images (eval mode, no
    gradient; the module's training flag is restored)."""
    was_training = module.training
    parameter = next(itertools.chain(module.parameters(), module.buffers()), None)
    probe = torch.zeros(2, 3, image_size, image_size, device=parameter.device if parameter is not None else "cpu")
    module.eval()
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as error:
        raise ConfigError(f"the backbone {type(module).__name__} fails on a batch of {image_size}-px images "
                          f"({type(error).__name__}: {error}); pass backbone=(module, feature_width) or set "
                          "data.image_size to a size it takes") from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ConfigError(f"the backbone {type(module).__name__} must map images (B, 3, H, W) to features (B, D); "
                          f"it returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    return int(out.flatten(1).shape[1])


def register_module(module: nn.Module, width: int | None = None, image_size: int = 32) -> str:
    """Register ``module`` as a backbone of this process under a new ``python:<class>-<n>`` name: every build (the
    online network, the momentum teacher, the random-init baseline, an evaluation) gets a fresh deep copy of it
    as it is now. ``width``: its feature width, else found by a forward pass at ``image_size``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"backbone must be an nn.Module or (nn.Module, feature width), got {type(module).__name__}")
    template = copy.deepcopy(module).cpu()
    width = int(width) if width is not None else feature_width(template, image_size)
    name = f"python:{type(module).__name__}-{next(_names)}"
    register_backbone(name)(lambda _cfg: (copy.deepcopy(template), width))
    return name


def register_dataset_object(dataset: Any, val_dataset: Any | None = None) -> str:
    """Register a torch Dataset (and its validation set) under a new ``python:<class>-<n>`` data-set name."""
    name = f"python:{type(dataset).__name__}-{next(_names)}"
    register_torch_dataset(name, dataset, val_dataset)
    return name


def train(cfg_or_recipe: Config | str | Path, overrides: list[str] | None = None, *,
          backbone: nn.Module | tuple[nn.Module, int] | None = None, dataset: Any | None = None,
          val_dataset: Any | None = None, resume: str | Path | None = None) -> RunResult:
    """Train (and evaluate, per the ``eval`` section) one run, as ``selfsup train`` does.

    ``cfg_or_recipe``: a :class:`Config`, a packaged recipe name or a YAML path; ``overrides``: dotted
    ``key=value`` words on top. ``backbone``: your own ``nn.Module`` (or ``(module, feature width)``; otherwise the
    width comes from a forward pass at ``data.image_size``), used by every method through its backbone factory.
    ``dataset``: your own torch Dataset of PIL images or ``(image, label)`` pairs; ``val_dataset`` its held-out set
    (default: ``data.val_fraction`` of ``dataset``, chosen by ``data.split_seed``). The process group is torn down
    afterwards."""
    cfg = _as_config(cfg_or_recipe, overrides)
    if backbone is not None:
        module, width = backbone if isinstance(backbone, tuple) else (backbone, None)
        cfg.model.backbone = register_module(module, width, cfg.data.image_size)
    if dataset is not None:
        cfg.data.name = register_dataset_object(dataset, val_dataset)
    try:
        trainer = build_trainer(cfg, resume)
        scores = trainer.fit()
    finally:
        distributed.shutdown()
    return RunResult(trainer.run_dir, scores, trainer.method.backbone, cfg)


def _source(model: Any) -> Any:
    return model.run_dir if isinstance(model, RunResult) else model


def evaluate(model: RunResult | str | Path | nn.Module, protocols: list[str] | tuple[str, ...] | None = None,
             overrides: list[str] | None = None, *, random_init: bool = False, device: str | None = None,
             dataset: Any | None = None, val_dataset: Any | None = None) -> dict[str, dict[str, Any]]:
    """Scores of a run (a :class:`RunResult`, run folder or checkpoint), a backbone file, or an ``nn.Module``:
    ``{"trained": {...}}`` (and ``"random_init"`` with ``random_init=True``, not for a module), as ``eval.json``
    holds them; a run's and a file's scores are merged into their ``eval.json``, as ``selfsup eval`` does.

    ``protocols`` default to knn, nn and rankme (label-based ones are skipped with a note on a data set without
    labels). The data come from the run's config plus ``overrides`` (a module or file: the defaults plus
    ``overrides``), or from ``dataset`` (and ``val_dataset``), a torch Dataset as :func:`train` takes it."""
    from selfsup.eval.protocols import evaluate_backbone
    from selfsup.eval.run import evaluate_checkpoint

    protocols = list(protocols or DEFAULT_PROTOCOLS)
    words = list(overrides or [])
    if dataset is not None:
        words.append(f"data.name={register_dataset_object(dataset, val_dataset)}")
    source = _source(model)
    if not isinstance(source, nn.Module):
        return evaluate_checkpoint(source, protocols, words, random_init=random_init, device=device)
    if random_init:
        raise ConfigError("random_init=True needs a run or a backbone file (a module has no recorded initialisation)")
    cfg = load_config(None, words)
    return {"trained": evaluate_backbone(source, cfg, resolve_device(device or cfg.train.device), protocols)}


def embed(model: RunResult | str | Path | nn.Module, images: str | Path | Any, overrides: list[str] | None = None, *,
          batch_size: int | None = None, workers: int | None = None, device: str | None = None,
          normalize: bool = True, skip_corrupt: bool = False, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """``(features, paths)``: one float32 row per image (L2-normalised unless ``normalize=False``) of a folder
    (recursive) or of a torch Dataset (the "paths" then name its items), embedded by a run's, a backbone file's or
    a module's backbone with the eval transform and ``eval.pool_grid``, as ``selfsup embed`` and the evaluation
    protocols compute them. A module's eval transform comes from the defaults plus ``overrides``."""
    source = _source(model)
    if isinstance(source, nn.Module):
        cfg, backbone = load_config(None, overrides), source
    else:
        cfg, backbone, _ = load_frozen_backbone(source, overrides)
    if isinstance(images, (str, Path)):
        images = folder_images(images)
    elif not isinstance(images, ImageDataset):  # a torch Dataset: its labels are not needed here
        images = TorchImageDataset(images, type(images).__name__, "all", np.arange(len(images)),
                                   np.full(len(images), -1), [])
    result = embed_images(backbone, cfg, images, batch_size=batch_size, workers=workers, device=device,
                          normalize=normalize, skip_corrupt=skip_corrupt, progress=progress)
    return result.features, result.paths

