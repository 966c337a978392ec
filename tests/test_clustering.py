"""Clustering metrics and k-means on known cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.eval.clustering import (
    _nearest,
    cluster_alignment,
    clustering_scores,
    hungarian_accuracy,
    inertia,
    kmeans,
)


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


TEN_BLOBS = dict(centres=torch.eye(10) * 10, n_per=20, noise=0.5, seed=0)  # 10 blobs, 14 noise-stds apart


def test_one_plain_kmeans_plus_plus_start_lands_in_a_local_optimum_on_some_seeds():
    """What the restarts fix: a single plain k-means++ start puts two centres in one blob on 3 of 50 seeds."""
    x, y = _blobs(**TEN_BLOBS)
    failing = [seed for seed in range(50)
               if hungarian_accuracy(kmeans(x, 10, seed=seed, n_init=1, local_trials=1)[1].numpy(), y.numpy()) < 100]
    assert failing == [12, 23, 47]
    centroids, _ = kmeans(x, 10, seed=12, n_init=1, local_trials=1)
    optimum = inertia(x, torch.stack([x[y == c].mean(0) for c in range(10)]))
    assert inertia(x, centroids) > 1.5 * optimum


def test_kmeans_finds_the_optimum_of_separated_blobs_on_every_seed_and_is_deterministic():
    x, y = _blobs(**TEN_BLOBS)
    optimum = inertia(x, torch.stack([x[y == c].mean(0) for c in range(10)]))
    for seed in range(50):
        centroids, assign = kmeans(x, 10, seed=seed)
        assert hungarian_accuracy(assign.numpy(), y.numpy()) == 100.0, seed
        assert inertia(x, centroids) == pytest.approx(optimum, rel=1e-5)
        again, assign_again = kmeans(x, 10, seed=seed)
        assert torch.equal(assign, assign_again) and torch.equal(centroids, again)


def test_more_starts_never_end_worse_than_their_first():
    """The first of n_init starts draws what a single start draws (one seeded generator): keeping the lowest
    inertia can only improve on it, and it does on some seeds of overlapping blobs."""
    x, _ = _blobs(15, torch.randn(12, 4, generator=torch.Generator().manual_seed(1)) * 2, 0.8, 2)
    single = [inertia(x, kmeans(x, 12, seed=seed, n_init=1)[0]) for seed in range(10)]
    several = [inertia(x, kmeans(x, 12, seed=seed, n_init=4)[0]) for seed in range(10)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(single, several, strict=True))
    assert any(b < a * (1 - 1e-3) for a, b in zip(single, several, strict=True))


def test_nearest_centroid_in_chunks_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x, centroids = torch.randn(101, 6, generator=g), torch.randn(7, 6, generator=g)
    index, distance = _nearest(x, centroids, chunk_size=16)
    brute = torch.cdist(x, centroids).pow(2)
    assert torch.equal(index, brute.argmin(1))
    torch.testing.assert_close(distance, brute.min(1).values, rtol=1e-4, atol=1e-4)
    assert inertia(x, centroids) == pytest.approx(float(brute.min(1).values.sum()), rel=1e-5)


def test_kmeans_rejects_bad_arguments_with_a_clear_message():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="n_init must be at least 1"):
        kmeans(x, 2, n_init=0)
    with pytest.raises(ValueError, match="local_trials must be at least 1"):
        kmeans(x, 2, local_trials=0)
    with pytest.raises(ValueError, match="0 < k <= number of points"):
        kmeans(x, 11)


def test_kmeans_with_more_clusters_than_distinct_points_stays_finite():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)  # two distinct points, k = 3: the seeding's draws all
    centroids, assign = kmeans(x, 3, seed=0)  # have zero weight from the third centre on (uniform fallback)
    assert torch.isfinite(centroids).all() and inertia(x, centroids) == pytest.approx(0.0, abs=1e-6)
    assert set(assign.tolist()) <= {0, 1, 2} and len(set(assign[[0, 5]].tolist())) == 2


def test_cluster_alignment_uses_the_train_map():
    centres = torch.eye(3) * 5
    train_x, train_y = _blobs(20, centres, 0.05, 0)
    val_x, val_y = _blobs(10, centres, 0.05, 1)
    assert cluster_alignment(train_x, train_y, val_x, val_y, seed=0)["align"] == pytest.approx(100.0)
    # val labels permuted relative to train: the map learned on train now gets every val image wrong
    assert cluster_alignment(train_x, train_y, val_x, (val_y + 1) % 3, seed=0)["align"] == pytest.approx(0.0)
