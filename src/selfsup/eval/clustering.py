"""Clustering evaluation: k-means, NMI / adjusted NMI / ARI, Hungarian label accuracy, and the
MSF/CompRess cluster alignment (k-means on train, Hungarian map learned on train, accuracy on val).

k-means is our own exact Lloyd iteration in torch (any device, chunked assignment), so the numbers do
not depend on whether faiss is installed. It keeps the best of several greedy k-means++ starts, seeded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn import metrics

# k-means starts kept the best of: greedy k-means++ alone (scikit-learn's default, n_init="auto" = 1) still lands in a
# local optimum on some seeds of noisy blobs, three greedy starts did not in our checks (tests/test_clustering.py)
N_INIT = 3


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 8192,
             x_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centroid, squared L2 distance to it) of every row, in chunks of rows: memory
    O(chunk_size x k), never N x N or a copy of ``x``. ``x_sq``: the rows' squared norms, if already known."""
    c_sq = (centroids * centroids).sum(1)
    x_sq = (x * x).sum(1) if x_sq is None else x_sq
    index, distance = [], []
    for start in range(0, x.shape[0], chunk_size):
        part = x[start:start + chunk_size]
        best, arg = (c_sq - 2 * part @ centroids.T).min(1)  # ‖x‖² is the same for every centroid
        index.append(arg)
        distance.append((best + x_sq[start:start + chunk_size]).clamp_min_(0))
    return torch.cat(index), torch.cat(distance)


def _sq_distances(x: torch.Tensor, x_sq: torch.Tensor, points: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """(N, m) squared L2 distances of every row to each of ``m`` (a few) points, in chunks of rows."""
    p_sq = (points * points).sum(1)
    out = torch.empty(x.shape[0], points.shape[0], device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        out[rows] = (x_sq[rows, None] - 2 * x[rows] @ points.T + p_sq).clamp_min_(0)
    return out


def _draw(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` row indices drawn with probability ∝ ``weights`` (uniformly when all are zero). The uniforms come
    from the CPU ``generator``, the search runs where ``weights`` are: seeded and device-independent draws."""
    uniforms = torch.rand(count, generator=generator, dtype=torch.float64).to(weights.device)
    cumulative = weights.double().cumsum(0)
    total = cumulative[-1]
    if total <= 0:
        return (uniforms * weights.shape[0]).long().clamp_(max=weights.shape[0] - 1)
    return torch.searchsorted(cumulative, uniforms * total, right=True).clamp_(max=weights.shape[0] - 1)


def _kmeans_plus_plus(x: torch.Tensor, x_sq: torch.Tensor, k: int, generator: torch.Generator,
                      local_trials: int) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability ∝ squared distance to
    the nearest centre so far. Greedy with ``local_trials`` > 1 (as scikit-learn): draw that many candidates and keep
    the one that lowers the potential (sum of those squared distances) most."""
    first = _draw(torch.zeros(x.shape[0], device=x.device), 1, generator)
    centroids = [x[first[0]]]
    nearest = _sq_distances(x, x_sq, x[first])[:, 0]
    for _ in range(1, k):
        candidates = _draw(nearest, local_trials, generator)
        updated = torch.minimum(nearest[:, None], _sq_distances(x, x_sq, x[candidates]))  # (N, trials)
        best = int(updated.double().sum(0).argmin())
        centroids.append(x[candidates[best]])
        nearest = updated[:, best].contiguous()
    return torch.stack(centroids)


def _reseed_empty(x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, empty: list[int],
                  chunk_size: int = 8192) -> None:
    """Move each empty cluster's centroid onto the point farthest from its own centroid (in place)."""
    distance = torch.cat([(x[s:s + chunk_size] - centroids[assign[s:s + chunk_size]]).pow(2).sum(1)
                          for s in range(0, x.shape[0], chunk_size)])
    for cluster in empty:
        far = int(distance.argmax())
        centroids[cluster] = x[far]
        assign[far] = cluster
        distance[far] = 0.0


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor,
           niter: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """At most ``niter`` Lloyd updates from ``centroids``, stopping early once the assignment is stable (further
    updates would change nothing). Returns (centroids, assignments, inertia = sum of squared distances)."""
    k = centroids.shape[0]
    assign, distance = _nearest(x, centroids, x_sq=x_sq)
    for _ in range(niter):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = torch.nonzero(~filled).flatten().tolist()
        if empty:
            _reseed_empty(x, centroids, assign, empty)
        previous = assign
        assign, distance = _nearest(x, centroids, x_sq=x_sq)
        if not empty and torch.equal(assign, previous):
            break
    return centroids, assign, float(distance.double().sum())


@torch.no_grad()
def kmeans(features: torch.Tensor, k: int, *, niter: int = 20, seed: int = 0, init: str = "k-means++",
           n_init: int = N_INIT, local_trials: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means (L2), seeded: the best (lowest inertia) of ``n_init`` starts, each of at most ``niter``
    iterations. ``init`` is ``k-means++`` — greedy, with ``local_trials`` candidates per centre (default
    2 + ⌊ln k⌋, as scikit-learn; 1: plain k-means++) — or ``random`` (k distinct rows, as faiss). An empty
    cluster is re-seeded with the point farthest from its centroid. Any device; memory O(N·k) for the
    assignment chunks, never N x N. Returns (centroids, assignments).
    """
    x = features.float()
    n = x.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k-means needs 0 < k <= number of points, got k={k}, n={n}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"k-means init must be 'k-means++' or 'random', got {init!r}")
    if n_init < 1:
        raise ValueError(f"k-means n_init must be at least 1, got {n_init}")
    trials = 2 + int(math.log(k)) if local_trials is None else local_trials
    if trials < 1:
        raise ValueError(f"k-means local_trials must be at least 1 (1: plain k-means++), got {local_trials}")
    generator = torch.Generator().manual_seed(seed)
    x_sq = (x * x).sum(1)
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for _ in range(n_init):
        if init == "random":
            start = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
        else:
            start = _kmeans_plus_plus(x, x_sq, k, generator, trials)
        result = _lloyd(x, x_sq, start, niter)
        if best is None or result[2] < best[2]:
            best = result
    return best[0], best[1]


def inertia(features: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum over the rows of the squared L2 distance to the nearest centroid (what k-means minimises)."""
    return float(_nearest(features.float(), centroids.float())[1].double().sum())


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
    val_clusters, _ = _nearest(val, centroids)
    mapping = alignment_map(train_clusters.cpu().numpy(), train_labels.cpu().numpy(), k, num_classes)
    predicted = mapping[val_clusters.cpu().numpy()]
    return {"align": 100.0 * float((predicted == val_labels.cpu().numpy()).mean())}


@torch.no_grad()
def cluster_tightness(features: torch.Tensor, assign: torch.Tensor, k: int, chunk_size: int = 65536) -> np.ndarray:
    """(k,) mean cosine similarity of each cluster's members to the cluster's centroid (the mean of its members),
    on L2-normalised ``features``: 1 for a cluster of identical directions; NaN for an empty cluster. Needs no
    labels: the report ranks clusters by it when there are none."""
    x = torch.nn.functional.normalize(features.float(), dim=1)
    assign = assign.to(x.device)
    directions = torch.nn.functional.normalize(torch.zeros(k, x.shape[1], device=x.device).index_add_(0, assign, x),
                                               dim=1)
    cosines = torch.cat([(x[s:s + chunk_size] * directions[assign[s:s + chunk_size]]).sum(1)
                         for s in range(0, x.shape[0], chunk_size)])
    sums = torch.bincount(assign, weights=cosines.double(), minlength=k)
    counts = torch.bincount(assign, minlength=k).double()
    return (sums / counts).cpu().numpy()  # 0/0 = NaN for empty clusters


def pseudo_label_scores(labels: np.ndarray, targets: np.ndarray) -> dict[str, dict[str, float]]:
    """NMI (arithmetic and geometric averaging), aNMI, ARI and Hungarian label accuracy (%) of every head's
    pseudo-labels (``labels``: (heads, N)) against the true ``targets`` (N,), over the samples with a
    target ≥ 0; keys ``head0``, ``head1``, …, then ``mean`` (over heads)."""
    labels, targets = np.asarray(labels), np.asarray(targets)
    known = targets >= 0
    scores = {f"head{h}": clustering_scores(head[known], targets[known]) for h, head in enumerate(labels)}
    scores["mean"] = {name: float(np.mean([s[name] for s in scores.values()])) for name in scores["head0"]}
    return scores
