"""Clustering evaluation: k-means, NMI / adjusted NMI / ARI, Hungarian label accuracy, and the
MSF/CompRess cluster alignment (k-means on train, Hungarian map learned on train, accuracy on val).

k-means is our own exact Lloyd iteration in torch (any device, chunked assignment), so the numbers do
not depend on whether faiss is installed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn import metrics


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) of every row, in chunks of rows."""
    c_sq = (centroids * centroids).sum(1)
    out = []
    for start in range(0, x.shape[0], chunk_size):
        part = x[start:start + chunk_size]
        out.append((c_sq - 2 * part @ centroids.T).argmin(1))  # ‖x‖² is the same for every centroid
    return torch.cat(out)


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability ∝ squared distance to the nearest one."""
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centroids = [x[first]]
    nearest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        weights = nearest.double().cpu()
        pick = int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(x.shape[0], (1,), generator=generator))
        centroids.append(x[pick])
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(1))
    return torch.stack(centroids)


@torch.no_grad()
def kmeans(features: torch.Tensor, k: int, *, niter: int = 20, seed: int = 0,
           init: str = "k-means++") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means (L2), ``niter`` iterations, seeded: ``init`` is ``k-means++`` or ``random`` (k distinct
    rows, as faiss). An empty cluster is re-seeded with the point farthest from its centroid.
    Returns (centroids, assignments).
    """
    x = features.float()
    n = x.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k-means needs 0 < k <= number of points, got k={k}, n={n}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"k-means init must be 'k-means++' or 'random', got {init!r}")
    generator = torch.Generator().manual_seed(seed)
    if init == "random":
        centroids = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    else:
        centroids = _kmeans_plus_plus(x, k, generator)
    assign = _nearest(x, centroids)
    for _ in range(niter):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        for empty in torch.nonzero(~filled).flatten().tolist():
            distance = (x - centroids[assign]).pow(2).sum(1)
            far = int(distance.argmax())
            centroids[empty] = x[far]
            assign[far] = empty
        assign = _nearest(x, centroids)
    return centroids, assign


def contingency(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """counts[c, y] = number of samples in cluster c with label y."""
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    table = np.zeros((pred.max() + 1, labels.max() + 1), dtype=np.int64)
    np.add.at(table, (pred, labels), 1)
    return table


def hungarian_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Label accuracy (%) under the one-to-one cluster→class map that maximises matches; clusters left
    unmatched (more clusters than classes) count as wrong."""
    table = contingency(pred, labels)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return 100.0 * table[rows, cols].sum() / len(labels)


def clustering_scores(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """NMI (arithmetic averaging, scikit-learn's default since 0.22), NMI with geometric averaging (as
    older papers), adjusted NMI, ARI — all in % — and Hungarian label accuracy."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return {
        "nmi": 100.0 * metrics.normalized_mutual_info_score(labels, pred, average_method="arithmetic"),
        "nmi_geometric": 100.0 * metrics.normalized_mutual_info_score(labels, pred, average_method="geometric"),
        "ami": 100.0 * metrics.adjusted_mutual_info_score(labels, pred),
        "ari": 100.0 * metrics.adjusted_rand_score(labels, pred),
        "label_acc": hungarian_accuracy(pred, labels),
    }


def alignment_map(train_clusters: np.ndarray, train_labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """CompRess: cost[i, j] = −|C_i ∩ Y_j| / |C_i| solved by Hungarian; returns class of each cluster (−1 if none)."""
    table = np.zeros((k, num_classes), dtype=np.float64)
    np.add.at(table, (np.asarray(train_clusters), np.asarray(train_labels)), 1)
    cost = -table / np.maximum(table.sum(1, keepdims=True), 1)
    rows, cols = linear_sum_assignment(cost)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def cluster_alignment(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                      val_labels: torch.Tensor, *, k: int | None = None, niter: int = 20,
                      seed: int = 0) -> dict[str, float]:
    """MSF/CompRess cluster alignment (%): k-means (k = number of classes by default) on L2-normalised
    train features, Hungarian map learned on train, accuracy of the mapped val assignments."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    k = k or num_classes
    train = torch.nn.functional.normalize(train_features.float(), dim=1)
    val = torch.nn.functional.normalize(val_features.float().to(train.device), dim=1)
    centroids, train_clusters = kmeans(train, k, niter=niter, seed=seed)
    val_clusters = _nearest(val, centroids)
    mapping = alignment_map(train_clusters.cpu().numpy(), train_labels.cpu().numpy(), k, num_classes)
    predicted = mapping[val_clusters.cpu().numpy()]
    return {"align": 100.0 * float((predicted == val_labels.cpu().numpy()).mean())}


def pseudo_label_scores(labels: np.ndarray, targets: np.ndarray) -> dict[str, dict[str, float]]:
    """NMI (arithmetic and geometric averaging), aNMI, ARI and Hungarian label accuracy (%) of every head's
    pseudo-labels (``labels``: (heads, N)) against the true ``targets`` (N,), over the samples with a
    target ≥ 0; keys ``head0``, ``head1``, …, then ``mean`` (over heads)."""
    labels, targets = np.asarray(labels), np.asarray(targets)
    known = targets >= 0
    scores = {f"head{h}": clustering_scores(head[known], targets[known]) for h, head in enumerate(labels)}
    scores["mean"] = {name: float(np.mean([s[name] for s in scores.values()])) for name in scores["head0"]}
    return scores
