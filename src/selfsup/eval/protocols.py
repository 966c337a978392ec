"""Evaluation protocols run on a frozen backbone, memory/fit = the training split, queries = the held-out split:

- ``knn``: weighted k-NN (k, T from ``eval``) and the unweighted majority vote;
- ``nn``: 1-NN;
- ``cluster``: k-means (k = number of classes) on the held-out features → NMI, adjusted NMI, ARI, label accuracy;
- ``align``: MSF/CompRess cluster alignment (k-means on train, Hungarian map from train, accuracy on held-out);
- ``linear``: linear probe (``eval.linear_mode``: fast on cached features, or standard as the papers) → top-1/top-5.
  A ViT's probe sees the CLS tokens of its last ``eval.linear_vit_blocks`` blocks (:func:`linear_probe_features`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from selfsup.config import Config, ConfigError, check_choice
from selfsup.data.datasets import build_dataset
from selfsup.data.loader import EvalDataset
from selfsup.data.transforms import transform_from_config
from selfsup.eval.clustering import cluster_alignment, clustering_scores, kmeans
from selfsup.eval.features import extract_features, pooled_on_grid
from selfsup.eval.knn import knn_sweep
from selfsup.eval.linear import LINEAR_MODES, linear_probe_fast, linear_probe_standard
from selfsup.models.vit import LastBlocksCLS, ViT

PROTOCOLS = ("knn", "nn", "cluster", "align", "linear")


def check_protocols(protocols: list[str]) -> None:
    for name in protocols:
        if name not in PROTOCOLS:
            raise ConfigError(f"unknown evaluation protocol {name!r}; choose from {list(PROTOCOLS)}")


def feature_loader(cfg: Config, split: str) -> tuple[DataLoader, int]:
    data = cfg.data
    dataset = build_dataset(data, split)
    transform = transform_from_config(data, "eval")
    loader = DataLoader(EvalDataset(dataset, transform), batch_size=cfg.eval.batch_size,
                        num_workers=data.num_workers, shuffle=False)
    return loader, dataset.num_classes


def linear_probe_features(backbone: nn.Module, cfg: Config) -> nn.Module:
    """What the linear probe reads: for a ViT the normed CLS tokens of its last ``eval.linear_vit_blocks`` blocks
    (all blocks of a shallower ViT; with ``eval.linear_vit_avgpool`` also the mean patch token), as Mugs/DINO
    evaluate; otherwise the backbone."""
    if isinstance(backbone, ViT):
        if cfg.eval.linear_vit_blocks < 1:
            raise ConfigError(f"eval.linear_vit_blocks must be at least 1, got {cfg.eval.linear_vit_blocks}")
        blocks = min(cfg.eval.linear_vit_blocks, len(backbone.blocks))
        return LastBlocksCLS(backbone, blocks, cfg.eval.linear_vit_avgpool)
    return backbone


def evaluate_backbone(backbone: nn.Module, cfg: Config, device: torch.device | str,
                      protocols: list[str], *, progress: bool = False) -> dict[str, float]:
    """Scores in percent, e.g. ``{"knn20_T0.07": …, "knn20_vote": …, "nn": …, "linear_top1": …}``, of the
    backbone's features (pooled on an ``eval.pool_grid`` grid when set)."""
    check_protocols(protocols)
    check_choice("eval.linear_mode", cfg.eval.linear_mode, LINEAR_MODES)
    with pooled_on_grid(backbone, cfg.eval.pool_grid):
        return _scores(backbone, cfg, device, protocols, progress)


def _scores(backbone: nn.Module, cfg: Config, device: torch.device | str, protocols: list[str],
            progress: bool) -> dict[str, float]:
    scores: dict[str, float] = {}
    standard_linear = "linear" in protocols and cfg.eval.linear_mode == "standard"
    if any(p != "linear" or not standard_linear for p in protocols):
        scores.update(_feature_scores(backbone, cfg, device, protocols, progress))
    if standard_linear:
        e = cfg.eval
        result = linear_probe_standard(linear_probe_features(backbone, cfg), cfg, device, recipe=e.linear_recipe,
                                       epochs=e.linear_epochs, ten_crop=e.linear_ten_crop, progress=progress)
        scores.update(result.scores())
    return scores


def _feature_scores(backbone: nn.Module, cfg: Config, device: torch.device | str, protocols: list[str],
                    progress: bool) -> dict[str, float]:
    """The protocols that work on eval-transform features, extracted once (raw; L2-normalised for kNN/k-means).
    A ViT probed on its last blocks gives both in that one pass: the probe's features and, inside them, the CLS."""
    fast_linear = "linear" in protocols and cfg.eval.linear_mode == "fast"
    probed = linear_probe_features(backbone, cfg) if fast_linear else backbone
    train_loader, num_classes = feature_loader(cfg, cfg.data.train_split)
    val_loader, _ = feature_loader(cfg, cfg.data.val_split)
    probe_train_x, train_y = extract_features(probed, train_loader, device, normalize=False, progress=progress)
    probe_val_x, val_y = extract_features(probed, val_loader, device, normalize=False, progress=progress)
    raw_train_x, raw_val_x = probe_train_x, probe_val_x
    if isinstance(probed, LastBlocksCLS):
        raw_train_x, raw_val_x = probed.final_cls(probe_train_x), probed.final_cls(probe_val_x)
    train_x, val_x = F.normalize(raw_train_x, dim=1), F.normalize(raw_val_x, dim=1)
    scores: dict[str, float] = {}
    if "knn" in protocols or "nn" in protocols:
        scores.update(_knn_scores(cfg, protocols, train_x, train_y, val_x, val_y, num_classes))
    if "cluster" in protocols:
        _, assign = kmeans(val_x.to(device), num_classes, seed=cfg.train.seed)
        scores.update({f"cluster_{k}": v for k, v in clustering_scores(assign.cpu().numpy(), val_y.numpy()).items()})
    if "align" in protocols:
        scores.update(cluster_alignment(train_x.to(device), train_y, val_x, val_y, seed=cfg.train.seed))
    if fast_linear:
        e = cfg.eval
        result = linear_probe_fast(probe_train_x, train_y, probe_val_x, val_y, num_classes, device=device,
                                   standardize=e.linear_standardize, weight_decays=e.linear_weight_decays,
                                   holdout=e.linear_holdout, seed=cfg.train.seed)
        scores.update(result.scores())
    return scores


def _knn_scores(cfg: Config, protocols: list[str], train_x, train_y, val_x, val_y, num_classes: int) -> dict:
    k = cfg.eval.knn_k
    ks = sorted({1, k} if "knn" in protocols else {1})
    temperatures: list[float | None] = [cfg.eval.knn_temperature, None] if "knn" in protocols else [None]
    scores = knn_sweep(train_x, train_y, val_x, val_y, ks=ks, temperatures=temperatures,
                       num_classes=num_classes, seed=cfg.train.seed)
    wanted = {"nn"} if "nn" in protocols else set()
    if "knn" in protocols:
        wanted |= {f"knn{k}_T{cfg.eval.knn_temperature:g}", f"knn{k}_vote"}
    return {key: value for key, value in scores.items() if key in wanted}


def score_names(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every score name of every column, in first-seen order (the rows of a score table)."""
    return list(dict.fromkeys(name for scores in results.values() for name in scores))


def format_scores(results: dict[str, dict[str, Any]]) -> str:
    """A small table: one row per score, one column per evaluated model (trained, random_init …)."""
    columns, keys = list(results), score_names(results)
    width = max([len(k) for k in keys] + [10])
    lines = ["accuracy (%)".ljust(width) + "".join(c.rjust(14) for c in columns)]
    for key in keys:
        row = "".join(f"{results[c][key]:14.2f}" if key in results[c] else " " * 14 for c in columns)
        lines.append(key.ljust(width) + row)
    return "\n".join(lines)
