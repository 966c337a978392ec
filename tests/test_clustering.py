"""Clustering metrics and k-means on known cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.eval.clustering import cluster_alignment, clustering_scores, hungarian_accuracy, kmeans


def test_permuted_labels_score_perfectly():
    labels = np.repeat(np.arange(5), 20)
    permuted = (labels * 3 + 1) % 5  # a relabelling of the same partition
    scores = clustering_scores(permuted, labels)
    for key in ("nmi", "nmi_geometric", "ami", "ari", "label_acc"):
        assert scores[key] == pytest.approx(100.0)


def test_hungarian_accuracy_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([1, 1, 0, 0, 0, 0])  # best map: 1->0 (2 right), 0->1 (3 right)
    assert hungarian_accuracy(pred, labels) == pytest.approx(100 * 5 / 6)
    # more clusters than classes: the unmatched cluster counts as wrong
    assert hungarian_accuracy(np.array([0, 0, 2, 1, 1, 1]), labels) == pytest.approx(100 * 5 / 6)


def test_random_partition_has_chance_level_adjusted_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    pred = rng.integers(0, 10, 5000)
    scores = clustering_scores(pred, labels)
    assert abs(scores["ami"]) < 1 and abs(scores["ari"]) < 1


def _blobs(n_per: int, centres: torch.Tensor, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = centres.repeat_interleave(n_per, 0) + noise * torch.randn(len(centres) * n_per, centres.shape[1], generator=g)
    return x, torch.arange(len(centres)).repeat_interleave(n_per)


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    centres = torch.eye(4) * 10
    x, y = _blobs(30, centres, 0.1, 0)
    centroids, assign = kmeans(x, 4, niter=10, seed=1)
    assert hungarian_accuracy(assign.numpy(), y.numpy()) == 100.0
    assert torch.allclose(centroids[assign], centres[y], atol=0.1)
    again, assign2 = kmeans(x, 4, niter=10, seed=1)
    assert torch.equal(assign, assign2) and torch.equal(centroids, again)


def test_cluster_alignment_uses_the_train_map():
    centres = torch.eye(3) * 5
    train_x, train_y = _blobs(20, centres, 0.05, 0)
    val_x, val_y = _blobs(10, centres, 0.05, 1)
    assert cluster_alignment(train_x, train_y, val_x, val_y, seed=0)["align"] == pytest.approx(100.0)
    # val labels permuted relative to train: the map learned on train now gets every val image wrong
    assert cluster_alignment(train_x, train_y, val_x, (val_y + 1) % 3, seed=0)["align"] == pytest.approx(0.0)
