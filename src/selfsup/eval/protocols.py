"""Evaluation protocols run on a frozen backbone, memory/fit = the training split, queries = the held-out split.

Label-based (skipped with a one-line note when the data set has no labels, i.e. every target is -1; a partly
labelled split is scored on its labelled images):

- ``knn``: weighted k-NN (k, T from ``eval``) and the unweighted majority vote;
- ``nn``: 1-NN;
- ``cluster``: k-means (k = number of classes) on the held-out features → NMI, adjusted NMI, ARI, label accuracy;
- ``align``: MSF/CompRess cluster alignment (k-means on train, Hungarian map from train, accuracy on held-out);
- ``linear``: linear probe (``eval.linear_mode``: fast on cached features, or standard as the papers) → top-1/top-5.
  A ViT's probe sees the CLS tokens of its last ``eval.linear_vit_blocks`` blocks (:func:`linear_probe_features`).

Label-free (:mod:`selfsup.eval.embedding_stats`, :mod:`selfsup.eval.retrieval`), on the training split:

- ``rankme``: RankMe effective rank of the features, and the per-dimension std of the L2-normalised features
  (``feature_std``, and times √D: ≈ 1 when spread evenly, 0 when collapsed) — no percentages;
- ``duplicates``: the number of near-duplicate pairs of training images (cosine ≥ ``eval.duplicate_threshold``)
  and of held-out images with a near duplicate in the training split (``duplicates_val_in_train``) — counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from selfsup.config import Config, ConfigError, check_choice
from selfsup.data.datasets import build_dataset
from selfsup.data.loader import EvalDataset
from selfsup.data.transforms import transform_from_config
from selfsup.eval.clustering import cluster_alignment, clustering_scores, kmeans
from selfsup.eval.embedding_stats import collapse_scores
from selfsup.eval.features import extract_features, pooled_on_grid
from selfsup.eval.knn import knn_sweep
from selfsup.eval.linear import LINEAR_MODES, linear_probe_fast, linear_probe_standard
from selfsup.eval.retrieval import duplicated_in, near_duplicates
from selfsup.models.vit import LastBlocksCLS, ViT

LABEL_PROTOCOLS = ("knn", "nn", "cluster", "align", "linear")  # need class labels
LABEL_FREE_PROTOCOLS = ("rankme", "duplicates")
PROTOCOLS = LABEL_PROTOCOLS + LABEL_FREE_PROTOCOLS


def check_protocols(protocols: list[str]) -> None:
    for name in protocols:
        if name not in PROTOCOLS:
            raise ConfigError(f"unknown evaluation protocol {name!r}; choose from {list(PROTOCOLS)}")


def has_labels(dataset: Any) -> bool:
    """Whether any image of ``dataset`` carries a class label (its ``targets`` hold a value >= 0)."""
    targets = getattr(dataset, "targets", None)
    return targets is not None and len(targets) > 0 and bool((np.asarray(targets) >= 0).any())


def feature_loader(cfg: Config, split: str) -> tuple[DataLoader, int]:
    data = cfg.data
    dataset = build_dataset(data, split)
    return _loader(cfg, dataset), dataset.num_classes


def _loader(cfg: Config, dataset: Any) -> DataLoader:
    return DataLoader(EvalDataset(dataset, transform_from_config(cfg.data, "eval")), batch_size=cfg.eval.batch_size,
                      num_workers=cfg.data.num_workers, shuffle=False)


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
                      protocols: list[str], *, progress: bool = False, note_skipped: bool = True) -> dict[str, float]:
    """Scores, e.g. ``{"knn20_T0.07": …, "knn20_vote": …, "nn": …, "linear_top1": …}`` (accuracies in percent),
    ``{"rankme": …, "duplicate_pairs": …}``, of the backbone's features (pooled on an ``eval.pool_grid`` grid when
    set). Label-based protocols on a data set without labels are left out with a one-line note (unless
    ``note_skipped`` is false: the second backbone scored on the same data)."""
    check_protocols(protocols)
    check_choice("eval.linear_mode", cfg.eval.linear_mode, LINEAR_MODES)
    if "duplicates" in protocols and not -1.0 <= cfg.eval.duplicate_threshold <= 1.0:
        raise ConfigError(f"eval.duplicate_threshold is a cosine similarity in [-1, 1], got "
                          f"{cfg.eval.duplicate_threshold}")
    splits = build_dataset(cfg.data, cfg.data.train_split), build_dataset(cfg.data, cfg.data.val_split)
    protocols = _runnable(protocols, cfg, *splits, note=note_skipped)
    with pooled_on_grid(backbone, cfg.eval.pool_grid):
        return _scores(backbone, cfg, device, protocols, splits, progress)


def _runnable(protocols: list[str], cfg: Config, train_set: Any, val_set: Any, note: bool = True) -> list[str]:
    """The protocols that can run: without labels on both splits, the label-based ones are dropped with a note."""
    labelled = has_labels(train_set) and has_labels(val_set) and train_set.num_classes > 0
    skipped = [p for p in protocols if p in LABEL_PROTOCOLS and not labelled]
    if skipped and note:
        free = ",".join(LABEL_FREE_PROTOCOLS)
        print(f"note: {', '.join(skipped)} skipped: data set {cfg.data.name!r} has no labels "
              f"({cfg.data.train_split}/{cfg.data.val_split}); label-free protocols: {free} "
              f"(selfsup eval --protocol {free}, or eval.protocols=[{free}])", flush=True)
    return [p for p in protocols if p not in skipped]


def _scores(backbone: nn.Module, cfg: Config, device: torch.device | str, protocols: list[str],
            splits: tuple[Any, Any], progress: bool) -> dict[str, float]:
    scores: dict[str, float] = {}
    standard_linear = "linear" in protocols and cfg.eval.linear_mode == "standard"
    if any(p != "linear" or not standard_linear for p in protocols):
        scores.update(_feature_scores(backbone, cfg, device, protocols, splits, progress))
    if standard_linear:
        e = cfg.eval
        result = linear_probe_standard(linear_probe_features(backbone, cfg), cfg, device, recipe=e.linear_recipe,
                                       epochs=e.linear_epochs, ten_crop=e.linear_ten_crop, progress=progress)
        scores.update(result.scores())
    return scores


def _feature_scores(backbone: nn.Module, cfg: Config, device: torch.device | str, protocols: list[str],
                    splits: tuple[Any, Any], progress: bool) -> dict[str, float]:
    """The protocols that work on eval-transform features, extracted once (raw; L2-normalised for kNN/k-means).
    A ViT probed on its last blocks gives both in that one pass: the probe's features and, inside them, the CLS."""
    fast_linear = "linear" in protocols and cfg.eval.linear_mode == "fast"
    probed = linear_probe_features(backbone, cfg) if fast_linear else backbone
    train_set, val_set = splits
    probe_train_x, train_y = extract_features(probed, _loader(cfg, train_set), device, normalize=False,
                                              progress=progress)
    probe_val_x, val_y = extract_features(probed, _loader(cfg, val_set), device, normalize=False, progress=progress)
    raw_train_x, raw_val_x = probe_train_x, probe_val_x
    if isinstance(probed, LastBlocksCLS):
        raw_train_x, raw_val_x = probed.final_cls(probe_train_x), probed.final_cls(probe_val_x)
    train_x, val_x = F.normalize(raw_train_x, dim=1), F.normalize(raw_val_x, dim=1)
    scores: dict[str, float] = {}
    if "rankme" in protocols:
        scores.update(collapse_scores(raw_train_x.to(device), seed=cfg.train.seed))
    if "duplicates" in protocols:
        scores.update(_duplicate_counts(cfg, train_x.to(device), val_x.to(device)))
    if any(p in LABEL_PROTOCOLS for p in protocols):
        # label-based protocols see the labelled images only (all of them, unless the set is partly labelled)
        train_kept, val_kept = train_y >= 0, val_y >= 0
        labelled = (*_rows(train_kept, train_x, train_y), *_rows(val_kept, val_x, val_y))
        probed_xy = (*_rows(train_kept, probe_train_x, train_y), *_rows(val_kept, probe_val_x, val_y))
        scores.update(_label_scores(cfg, device, protocols, labelled, probed_xy, train_set.num_classes))
    return scores


def _rows(kept: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The ``kept`` rows of each tensor (the tensors themselves, not copies, when every row is kept)."""
    return tensors if bool(kept.all()) else tuple(t[kept] for t in tensors)


def _duplicate_counts(cfg: Config, train_x: torch.Tensor, val_x: torch.Tensor) -> dict[str, int]:
    threshold = cfg.eval.duplicate_threshold
    pairs = near_duplicates(train_x, threshold, max_pairs=0).count
    in_train, _ = duplicated_in(val_x, train_x, threshold)
    return {"duplicate_pairs": pairs, "duplicates_val_in_train": int(in_train.sum())}


def _label_scores(cfg: Config, device: torch.device | str, protocols: list[str], features: tuple,
                  probe_features: tuple, num_classes: int) -> dict[str, float]:
    train_x, train_y, val_x, val_y = features
    scores: dict[str, float] = {}
    if "knn" in protocols or "nn" in protocols:
        scores.update(_knn_scores(cfg, protocols, train_x, train_y, val_x, val_y, num_classes))
    if "cluster" in protocols:
        _, assign = kmeans(val_x.to(device), num_classes, seed=cfg.train.seed)
        scores.update({f"cluster_{k}": v for k, v in clustering_scores(assign.cpu().numpy(), val_y.numpy()).items()})
    if "align" in protocols:
        scores.update(cluster_alignment(train_x.to(device), train_y, val_x, val_y, seed=cfg.train.seed))
    if "linear" in protocols and cfg.eval.linear_mode == "fast":
        e = cfg.eval
        result = linear_probe_fast(*probe_features, num_classes, device=device, standardize=e.linear_standardize,
                                   weight_decays=e.linear_weight_decays, holdout=e.linear_holdout,
                                   seed=cfg.train.seed)
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


def format_score(value: Any) -> str:
    """A score as shown: counts as integers, everything else with two decimals."""
    return str(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else f"{value:.2f}"


def format_scores(results: dict[str, dict[str, Any]]) -> str:
    """A small table: one row per score, one column per evaluated model (trained, random_init …); accuracies in %,
    counts as integers."""
    columns, keys = list(results), score_names(results)
    width = max([len(k) for k in keys] + [12])
    lines = ["score".ljust(width) + "".join(c.rjust(14) for c in columns)]
    for key in keys:
        row = "".join(format_score(results[c][key]).rjust(14) if key in results[c] else " " * 14 for c in columns)
        lines.append(key.ljust(width) + row)
    return "\n".join(lines)
