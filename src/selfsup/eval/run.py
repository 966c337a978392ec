"""Evaluate a saved run or checkpoint (rebuild its method from the saved config, load the weights), or a backbone
file written by ``selfsup export`` / ``selfsup import`` (the data set then comes from ``key=value`` overrides)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from selfsup.config import Config, apply_overrides, config_from_dict
from selfsup.data.datasets import build_dataset
from selfsup.engine.checkpoint import CheckpointError, atomic_write, load_checkpoint, resolve_checkpoint
from selfsup.engine.trainer import method_for, resolve_device, seed_everything
from selfsup.eval.protocols import check_protocols, evaluate_backbone, format_scores
from selfsup.methods import Method


class TornFileWarning(UserWarning):
    """A run file (``metrics.jsonl``, ``eval.json``) is partly unreadable, e.g. cut short by a crash or a full
    disk; what is readable is used."""


def read_scores(path: Path) -> dict[str, dict[str, Any]] | None:
    """The scores an ``eval.json`` holds, ``{column: {score: value}}``; None when it is no such JSON (torn by a
    crash or a full disk, or edited into another shape)."""
    try:
        scores = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):  # json.JSONDecodeError is a ValueError
        return None
    if not isinstance(scores, dict) or not all(isinstance(column, dict) for column in scores.values()):
        return None
    return scores


def load_run(path: str | Path, overrides: list[str] | None = None, state: dict | None = None,
             ) -> tuple[Path, dict, Config, Method, nn.Module]:
    """(checkpoint file, its state, the run's config with ``overrides``, the method with the saved weights,
    the backbone at its seeded initial weights) for a run folder or checkpoint (``state``: already loaded)."""
    checkpoint = resolve_checkpoint(path)
    state = state if state is not None else load_checkpoint(checkpoint)
    if "config" not in state or "method" not in state:
        raise CheckpointError(f"{checkpoint} has no 'config'/'method' entries: it is not a selfsup run checkpoint")
    cfg = config_from_dict(apply_overrides(copy.deepcopy(state["config"]), overrides))
    train_set = build_dataset(cfg.data, cfg.data.train_split)
    seed_everything(cfg.train.seed)
    method = method_for(cfg, len(train_set), train_set.num_classes)
    initial = copy.deepcopy(method.backbone)
    method.load_state_dict(state["method"])
    return checkpoint, state, cfg, method, initial


def load_backbone_file(path: str | Path, overrides: list[str] | None = None, state: dict | None = None,
                       ) -> tuple[Config, nn.Module, nn.Module]:
    """(config: defaults + the file's model + ``overrides``, the loaded backbone, the same one freshly seeded;
    ``state``: a ``.pt`` file's contents, already loaded)."""
    from selfsup.export import build_from_info, load_strict, read_backbone

    tensors, info = read_backbone(path, state)
    cfg = config_from_dict(apply_overrides({"model": dataclasses.asdict(info.model_config())}, overrides))
    seed_everything(cfg.train.seed)
    initial = build_from_info(info).eval()
    backbone = copy.deepcopy(initial)
    load_strict(backbone, tensors, f"{path} does not fit {info.backbone}")
    return cfg, backbone, initial


def evaluate_checkpoint(path: str | Path, protocols: list[str], overrides: list[str] | None = None, *,
                        random_init: bool = False, device: str | None = None) -> dict[str, Any]:
    """Score a run, a checkpoint or a backbone file; scores merge into the run's ``eval.json`` (for a backbone
    file: ``<file>.eval.json`` beside it)."""
    check_protocols(protocols)
    state = None if Path(path).suffix == ".safetensors" else load_checkpoint(path)
    if state is None or "selfsup" in state:  # a backbone file (export/import metadata)
        cfg, backbone, initial = load_backbone_file(path, overrides, state)
        what, out = f"{path} (backbone file, data {cfg.data.name})", Path(f"{path}.eval.json")
    else:
        checkpoint, state, cfg, method, initial = load_run(path, overrides, state)
        backbone = method.backbone
        what = f"{checkpoint} (epoch {state.get('epoch')}, step {state.get('step')})"
        out = checkpoint.parent / "eval.json"
    target = resolve_device(device or cfg.train.device)
    results = {"trained": evaluate_backbone(backbone, cfg, target, protocols, progress=True)}
    if random_init:
        results["random_init"] = evaluate_backbone(initial, cfg, target, protocols, progress=True, note_skipped=False)
    print(what)
    print(format_scores(results))
    previous = read_scores(out) if out.is_file() else {}
    if previous is None:  # torn or not ours: keep it aside rather than lose it, start a new one with these scores
        aside = out.with_name(out.name + ".unreadable")
        os.replace(out, aside)
        warnings.warn(f"{out} is not readable JSON scores (cut short by a crash or a full disk?); it is kept as "
                      f"{aside.name} and {out.name} now holds these scores only", TornFileWarning, stacklevel=2)
        previous = {}
    for column, scores in results.items():  # keep scores of other protocols from earlier evaluations
        previous.setdefault(column, {}).update(scores)
    atomic_write(out, lambda handle: handle.write(json.dumps(previous, indent=2).encode()))  # never torn itself
    return results

